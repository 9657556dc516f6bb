"""User-facing errors.

Anything raised as a `UserError` is a mistake in the user's input (a path, a flag, a corrupt file):
the CLI prints its message on one line and exits non-zero, without a traceback. Programming errors
stay ordinary exceptions and keep their tracebacks.
"""


class UserError(ValueError):
    """A problem with the user's input, reported as one line by the CLI."""


class DataError(UserError):
    """A missing, empty or unusable data source."""


class CheckpointError(UserError):
    """A run directory or checkpoint that cannot be loaded."""
