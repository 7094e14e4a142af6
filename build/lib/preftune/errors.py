"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class PreftuneError(Exception):
    """Bad input from the user (config, data, model path). The message says what and how to fix."""


class ConfigError(PreftuneError):
    pass


class DataError(PreftuneError):
    pass


class ModelError(PreftuneError):
    pass
