"""`LongerError`: the base of every error a user can fix — a bad flag or config value, a bad
input file or directory, an unusable run directory, checkpoint or bundle, a port already taken,
a store that cannot be reached.

The CLI (`longer_cli/main.py`) turns a LongerError, and only a LongerError, into one line
`longer CMD: error: MESSAGE` and exit status 2; anything else is a bug and ends with its
traceback and exit status 1. So a message must say what is wrong and where (file, column, row,
flag or variable), and a check of user input raises a LongerError subclass, never a bare
ValueError.

This module imports nothing, so every layer (model, data, trainer, serving, CLI) can use it.
"""


class LongerError(Exception):
    """An error the user can fix; the message names what is wrong and where."""


class UsageError(LongerError, ValueError):
    """A command-line argument, setting or environment variable with a bad value."""


class InputError(LongerError, ValueError):
    """An input file or directory that is missing or is not what the command reads."""


class MissingInputError(LongerError, FileNotFoundError):
    """An input file or directory that does not exist (or lacks the file that makes it one)."""
