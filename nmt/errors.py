"""Errors that a user can cause and fix; the CLI prints them as one line and exits non-zero."""


class NmtError(Exception):
    """Base class: the message names the problem (and the file or key involved)."""


class ConfigError(NmtError):
    pass


class DataError(NmtError):
    pass


class CheckpointError(NmtError):
    pass
