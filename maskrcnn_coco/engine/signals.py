"""SIGTERM/SIGINT as a request to stop cleanly (what SLURM, ``docker stop``, Kubernetes and Ctrl-C send).

While an iteration runs the request is only recorded, and the loop stops after that iteration so
the checkpoint is at a step boundary; outside the training iterations (evaluation, writing) it
interrupts at once. A second signal aborts immediately with the signal's default action.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class StopRequested(Exception):
    """A stop signal arrived outside the training iterations."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into ``requested``; ``deferring`` marks the iterations."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: abort now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if not self.deferring:
            raise StopRequested(signum)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
