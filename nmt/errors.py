"""Errors that a user can cause and fix; the CLI prints them as one line and exits non-zero."""


class NmtError(Exception):
    """Base class: the message names the problem (and the file or key involved)."""


class ConfigError(NmtError):
    pass


class DataError(NmtError):
    pass


class CheckpointError(NmtError):
    pass


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
