"""Errors a user can fix from the command line: the entry points print their message, not a trace."""


class UserError(Exception):
    """Bad input (config, data, weights): the message names what is wrong and where."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (unknown choice, inconsistent sizes, ...)."""
