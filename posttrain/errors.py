"""Errors that are the user's to fix: the CLI prints them without a traceback."""


class PosttrainError(Exception):
    """Base class for errors caused by input (config, data, paths), not by a bug."""


class ConfigError(PosttrainError):
    """A config key, value or file is wrong."""


class DataError(PosttrainError):
    """A dataset file, row or field is wrong. The message names the file, line and field."""


class TrainingError(PosttrainError):
    """Training cannot go on (non-finite loss that persists, nothing to train on, ...)."""
