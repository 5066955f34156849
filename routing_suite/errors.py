"""Errors the entry points turn into one clear line."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


class RunFailure(RuntimeError):
    """Work that started and cannot go on (e.g. a remote service that stays down);
    the message says what failed and how to resume."""
