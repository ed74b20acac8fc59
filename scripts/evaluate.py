"""Evaluation: python scripts/evaluate.py --weights CKPT [--output DIR] [--split val|train] [hydra overrides].

Evaluates a checkpoint (ours, an exported weights file or a torchvision state dict) as training evaluates
after an epoch: val loss per component, box/mask AP, AP per class, confusion matrix, COCO results and the
images to check, under <run or --output>/eval/<timestamp>/ (docs/EVALUATE.md). Runs under torchrun too.
Exit status 0, or 2 on bad input.
"""

import sys

from maskrcnn_coco.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
