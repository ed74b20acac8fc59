"""Prediction: python scripts/predict.py --weights CKPT --input PATH... --output DIR [--score-threshold 0.5] [--batch-size N] [--device auto].

Draws each image's detections (masks, boxes, class names, scores), writes one COCO results JSON and a
contact sheet (docs/PREDICT.md). Exit status 0, 1 when an unreadable file was skipped, 2 on bad input.
"""

import sys

from maskrcnn_coco.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
