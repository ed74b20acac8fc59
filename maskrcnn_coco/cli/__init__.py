"""Command-line entry points: training (``maskrcnn-train``), the loss probe (``maskrcnn-probe``)."""
