"""Command-line parsing shared by the tools that take Hydra overrides after their own flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The tool's flags and the rest as Hydra overrides (``key=value``); an unknown ``--flag`` is the
    parser's usual error (exit 2), not an override Hydra would reject with a traceback."""
    args, extra = parser.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    return args, list(extra)
