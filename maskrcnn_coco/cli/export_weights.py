"""Command line of the weights export (``python scripts/export_weights.py --weights CKPT [--output FILE]``,
console ``maskrcnn-export-weights``).

Writes the model's weights alone, for deployment: the state dict, the class count, the classes and
the model config (``inference.export_weights``), without the optimizer state, RNG states, sampler and
history a training checkpoint carries (about half of a small-model checkpoint is SGD momentum).
``load_model``, ``maskrcnn-predict``, ``maskrcnn-eval`` and ``model.weights=...`` take the file. Says
both sizes and their ratio. Exit status: 0, or 2 with one ``Error:`` line on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from maskrcnn_coco.cli.evaluate import error_line
from maskrcnn_coco.inference import export_weights, read_weights
from maskrcnn_coco.utils.errors import UserError

SUFFIX = ".weights.pth"  # the default output: <checkpoint stem>.weights.pth beside it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a checkpoint's model weights alone (state dict, classes, model config; no optimizer, RNG "
        "or history) for deployment, and say how much smaller the file is. Exit status: 0, or 2 on bad input.",
    )
    p.add_argument("--weights", required=True, metavar="CKPT", help="a checkpoint (runs/maskrcnn/<run>/checkpoints/best.pth) "
                   "or any file maskrcnn-predict takes")
    p.add_argument("--output", default=None, metavar="FILE", help=f"the file to write (default: <CKPT stem>{SUFFIX} beside CKPT)")
    return p


def megabytes(path: Path) -> float:
    return path.stat().st_size / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.weights).expanduser()
    output = Path(args.output).expanduser() if args.output else source.with_name(source.stem + SUFFIX)
    try:
        written = export_weights(source, output)
        classes = read_weights(written).mapping
    except UserError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except OSError as err:
        print(f"Error: cannot write {output}: {err}", file=sys.stderr)
        return 2
    before, after = megabytes(source), megabytes(written)
    names = ", ".join(classes.names[:8]) + (", ..." if len(classes.names) > 8 else "") if classes else "?"
    print(f"Wrote {written}: {after:.1f} MB (weights, {len(classes.names) if classes else '?'} classes: {names}; model config), "
          f"{after / before:.2f}x the {before:.1f} MB of {source}")
    return 0


def cli() -> None:
    """Console script ``maskrcnn-export-weights``: ``main``'s return value is the exit status."""
    sys.exit(main())
