"""Weights export: python scripts/export_weights.py --weights CKPT [--output FILE].

Writes the model's weights alone (state dict, classes, model config; no optimizer, RNG or history) for
deployment and prints the size ratio (docs/PREDICT.md). Exit status 0, or 2 on bad input.
"""

import sys

from maskrcnn_coco.cli.export_weights import main

if __name__ == "__main__":
    sys.exit(main())
