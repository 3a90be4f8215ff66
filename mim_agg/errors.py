"""Errors the user can fix. The command line shows them as one message, without a traceback
(``HYDRA_FULL_ERROR=1`` still shows everything)."""


class UserError(Exception):
    """Bad input or a folder in the way: the message names the key or file and the fix."""


class ConfigError(UserError, ValueError):
    """A config value the code cannot use (out of range, unknown, or unfit for the model)."""


class MissingFile(UserError, FileNotFoundError):
    """A file the config names is not there (a checkpoint not yet downloaded, say)."""


def one_line(error: BaseException) -> str:
    """``ConfigError: backbone.block=99 is out of range ...``: how a run record and a sweep's
    report name a failure."""
    return f"{type(error).__name__}: {error}".splitlines()[0]
