"""Iteration progress of a loop: a tqdm bar in a terminal, plain log lines everywhere else.

In a terminal (stdout and stderr both TTYs) the bar redraws in place. Written to a file, a pipe, CI
or a SLURM log, a bar would leave a frame per redraw; there ``Progress`` draws nothing and instead
logs one line (logger ``maskrcnn_coco.engine.progress``) at each ``update``, which the training
loop calls at its read-back points only (every ``print_freq`` iterations), e.g.::

    Epoch 3 [40/250] cls=0.412 box=0.298 mask=0.334 obj=0.041 rpn=0.052 total=1.137 lr=0.02 | 0.48 s/it | ETA 0:01:41

``update`` is handed values the loop already read back: it never touches the device.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interactive() -> bool:
    """Whether a progress bar can redraw in place: stdout (the log lines) and stderr (tqdm's bar)
    are both terminals."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Iterate over ``iterable`` with a bar (terminal) or with log lines at ``update`` (elsewhere); with
    ``iterable=None`` the caller moves the bar itself (``advance``, once per iteration).

    ``enabled=False`` shows nothing (``progress=false``, or a rank other than 0). ``start`` is the
    iteration an interrupted epoch resumes at (the total stays the whole epoch's); ``bar=None``
    chooses by ``interactive()``.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        desc: str,
        *,
        enabled: bool = True,
        start: int = 0,
        total: int | None = None,
        bar: bool | None = None,
    ):
        self.desc = desc
        self.enabled = enabled
        self.use_bar = enabled and (interactive() if bar is None else bar)
        if total is None and iterable is not None:
            total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        self.total = total
        self.start = start
        self._t0 = time.perf_counter()
        self.bar = tqdm(iterable, desc=desc, total=total, initial=start, disable=not self.use_bar, dynamic_ncols=True, leave=False)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar)

    def advance(self) -> None:
        """One iteration done (``iterable=None``)."""
        self.bar.update(1)

    def update(self, postfix: Mapping[str, str], iteration: int) -> None:
        """``postfix`` (already formatted values) after ``iteration`` iterations of the epoch."""
        if not self.enabled:
            return
        if self.use_bar:
            self.bar.set_postfix(dict(postfix), refresh=False)
            return
        log.info("%s", self.line(postfix, iteration, time.perf_counter() - self._t0))

    def line(self, postfix: Mapping[str, str], iteration: int, elapsed: float) -> str:
        """``Epoch 3 [40/250] cls=0.412 ... total=1.137 lr=0.02 | 0.48 s/it | ETA 0:01:41``."""
        done = max(iteration - self.start, 1)
        per_it = elapsed / done
        where = f"{iteration}/{self.total}" if self.total is not None else str(iteration)
        text = f"{self.desc} [{where}] " + " ".join(f"{k}={v}" for k, v in postfix.items()) + f" | {per_it:.2f} s/it"
        if self.total is not None:
            text += f" | ETA {format_duration(per_it * max(self.total - iteration, 0))}"
        return text

    def close(self) -> None:
        self.bar.close()
