"""The error of bad user input about a run's configuration, shared by the modules that check it."""


class ConfigError(ValueError):
    """Bad user input about the run configuration (one-line message)."""
