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


class ConfigTypeError(UserError, TypeError):
    """A config field of the wrong type. Also a TypeError, which callers that build configs from user
    mappings already catch to name the file it came from."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error.

    Libraries (torch.load, safetensors) explain their refusals over many lines; the first says what failed.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
