"""Benchmark: python scripts/benchmark.py [--iters N] [--repeats R] [--output run.json] [hydra overrides].

Our training loop and evaluation against bare torchvision, interleaved A/B in one process; see
maskrcnn_coco/benchmark/cli.py and the README's "Performance" section.
"""

import sys

from maskrcnn_coco.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
