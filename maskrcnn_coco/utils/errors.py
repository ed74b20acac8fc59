"""Errors a user can fix from the command line: the entry points print their message, not a trace."""

import re
from typing import Any


class UserError(Exception):
    """Bad input (config, data, weights): the message names what is wrong and where."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (unknown choice, inconsistent sizes, ...)."""


# A DataLoader worker's exception comes back as ``type(err)("Caught DataError in DataLoader worker
# process 0.\nOriginal Traceback (most recent call last): ...\n<module>.DataError: <message>\n")``.
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


class DataError(UserError, ValueError):
    """A dataset that cannot be used as configured (missing files, no usable images, ...).

    Raised in a DataLoader worker, it reaches the main process with the worker's traceback as its
    message; that is cut back to the original one-line message, so the entry points still print
    one line.
    """

    def __init__(self, message: Any = "", *args: Any):
        if isinstance(message, str) and _WORKER_WRAPPED.match(message):
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message, *args)
