"""Train Mask R-CNN from a checkout: ``python maskrcnn_coco/main_mlops.py [hydra overrides]``.

The same as ``maskrcnn-train`` (``maskrcnn_coco.cli.train``). Running this file puts its own folder
first on ``sys.path``, where the package's sub-packages (``data``, ``utils``, ...) would shadow
top-level modules of those names; the repository root takes its place instead.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _here:
    sys.path[0] = str(_here.parent)

from maskrcnn_coco.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
