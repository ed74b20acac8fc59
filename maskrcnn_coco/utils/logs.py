"""Human-readable output goes through ``logging`` (logger ``maskrcnn_coco``) with a rank-zero filter.

Under the training entry point Hydra configures the handlers (``conf/hydra/job_logging/maskrcnn.yaml``):
the console shows bare messages, the run folder's ``train.log`` the same lines with timestamps. A
library user who calls ``fit`` without configuring logging still sees the epoch block:
``ensure_console_logging`` adds one stdout handler when nothing would show INFO records.
"""

from __future__ import annotations

import logging
import sys

from maskrcnn_coco.utils.dist import RankZeroFilter

LOGGER_NAME = "maskrcnn_coco"


class ConsoleFormatter(logging.Formatter):
    """INFO lines as written; warnings and errors prefixed with their level, so they stand out."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {message}"
        return message


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest and notebooks replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _shows_info(logger: logging.Logger) -> bool:
    """Whether some handler on the logger's path would emit an INFO record of it."""
    if not logger.isEnabledFor(logging.INFO):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(h.level <= logging.INFO and not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def ensure_console_logging() -> None:
    """Give the package logger a rank-zero stdout handler unless INFO records already reach one."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if _shows_info(logger):
        return
    handler = _StdoutHandler()
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    handler.addFilter(RankZeroFilter())
    logger.addHandler(handler)
