"""Errors that mean "the user asked for something wrong": printed as one line, no traceback."""


class UserError(Exception):
    """Base of the errors whose message alone tells the user what to fix."""


class ConfigError(UserError):
    """A config value out of its allowed range or set."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or belongs to another experiment."""


class ProbeError(UserError):
    """A probe that cannot run as asked (``moebench probe``, ``eval.probe``); the message says why and what is allowed."""


class RecordError(UserError):
    """A run's file that cannot be written (disk full, read-only dir); the files before it are intact."""
