"""Errors a user can cause, each with a one-line message that names what is wrong."""


class KtengineError(Exception):
    """Base of the errors ktengine reports to users (CLI: one line, exit 2)."""


class ConfigError(KtengineError):
    """An invalid option or config.json value."""


class ModelLoadError(KtengineError):
    """A checkpoint that cannot be loaded: missing directory, file or tensor; wrong shape."""
