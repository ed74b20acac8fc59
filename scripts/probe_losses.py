"""Loss-component probe: python scripts/probe_losses.py --num-batches 2 [--verbose] [hydra overrides].

See docs/loss_probe.md.
"""

import sys

from maskrcnn_coco.cli.probe import main

if __name__ == "__main__":
    sys.exit(main())
