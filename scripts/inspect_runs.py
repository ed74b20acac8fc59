"""Read runs back: python scripts/inspect_runs.py PATH... [--plot out.png] [--csv out.csv] (see README "Inspect runs").
"""

import sys

from maskrcnn_coco.cli.inspect_runs import main

if __name__ == "__main__":
    sys.exit(main())
