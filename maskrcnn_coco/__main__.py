"""``python -m maskrcnn_coco [hydra overrides]``: train (same as ``maskrcnn-train``)."""

from maskrcnn_coco.cli.train import main

if __name__ == "__main__":
    main()
