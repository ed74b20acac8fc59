"""The benchmark's parts (setup, timing, sections, report); the command is ``maskrcnn_coco.benchmark.cli``."""
