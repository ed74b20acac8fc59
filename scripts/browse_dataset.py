"""Dataset browser: python scripts/browse_dataset.py --output DIR [--split val] [--augmented] [--model-input] [--ids 12,57] [hydra overrides].

Draws the ground truth on images as the training pipeline gives them to the model (docs/BROWSE.md).
Exit status 0, or 2 on bad input.
"""

import sys

from maskrcnn_coco.cli.browse import main

if __name__ == "__main__":
    sys.exit(main())
