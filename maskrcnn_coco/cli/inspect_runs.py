"""Command line of the run inspector (``python scripts/inspect_runs.py PATH... [--plot out.png] [--csv out.csv]``).

PATH is a run folder, a multirun folder (its job folders are runs) or any folder holding runs
(``runs/maskrcnn``). For each run it prints one table: every loss component (train and val), the
totals and the COCO metrics with their first, best (and its epoch) and last values, the trend from
first to last and the last epoch's change; then the run's diagnostics (``diagnostics.jsonl``). The
logic is ``maskrcnn_coco.analysis.inspect``.

Exit status: 0, or 2 with one ``Error:`` line when a PATH holds no run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maskrcnn_coco.analysis.inspect import DEFAULT_FLAT_TOL, format_run, legend, load_runs, plot_runs, write_csv
from maskrcnn_coco.utils.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Read finished runs back from their TensorBoard event files: per run, each loss component "
        "(train and val) and each COCO metric with its first, best and last value, the trend, and the run's "
        "diagnostics. Exit status: 0, or 2 when a PATH holds no run.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a run folder, a multirun folder, or a folder holding runs (e.g. runs/maskrcnn)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="write one panel per loss component (train solid, val dashed), totals and segm AP")
    p.add_argument("--csv", metavar="CSV", default=None, help="write every scalar as rows run,tag,epoch,value")
    p.add_argument("--flat-tol", type=float, default=DEFAULT_FLAT_TOL,
                   help=f"a relative change up to this is 'flat' (default {DEFAULT_FLAT_TOL})")
    p.add_argument("--all-tags", action="store_true", help="also list every other tag (per-class AP, lr, grad_norm, time)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.flat_tol < 1:
            raise UserError(f"--flat-tol={args.flat_tol}: use a value in [0, 1)")
        runs = load_runs(args.paths)
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print("\n\n".join(format_run(run, args.flat_tol, args.all_tags) for run in runs))
    print(f"\n{legend(args.flat_tol)}")
    if args.csv:
        n = write_csv(runs, args.csv)
        print(f"CSV: {args.csv} ({n} rows: run,tag,epoch,value)")
    if args.plot:
        title = plot_runs(runs, args.plot)
        print(f"Plot: {args.plot} ({title})")
    return 0


def cli() -> None:
    """Console script entry: ``main``'s return value is the exit status."""
    sys.exit(main())
