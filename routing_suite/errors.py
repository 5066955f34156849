"""Errors the entry points turn into one clear line."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""
