"""Dataset checker: python scripts/check_dataset.py data=coco data.root=/data/coco [--no-decode] [hydra overrides].

Exit status 0: training can start; 1: training would fail on this data; 2: bad input.
"""

import sys

from maskrcnn_coco.cli.check_dataset import main

if __name__ == "__main__":
    sys.exit(main())
