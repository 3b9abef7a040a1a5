"""Errors that are the user's to fix: the CLI prints them without a traceback."""

import errno
from contextlib import contextmanager


class PosttrainError(Exception):
    """Base class for errors caused by input (config, data, paths), not by a bug."""


class ConfigError(PosttrainError):
    """A config key, value or file is wrong."""


class DataError(PosttrainError):
    """A dataset file, row or field is wrong. The message names the file, line and field."""


class TrainingError(PosttrainError):
    """Training cannot go on (non-finite loss that persists, nothing to train on, ...)."""


class RewardError(PosttrainError, ValueError):
    """A reward fn returned something other than one finite number per completion."""


@contextmanager
def disk_full(what: str):
    """An out-of-space error (ENOSPC, EDQUOT) inside becomes a TrainingError naming what was being written
    (and the file, when the OS says): a clear message instead of a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise TrainingError(f"disk full: {what}{where}; free space, then resume with --resume") from None


def unknown(what: str, name: str, known, hint: str | None = None) -> str:
    """The message for a name that is not one of `known`: "unknown <what>: 'x'. Did you mean y? Known: ..."
    (the suggestion is `hint`, else the closest known name, if any is close)."""
    import difflib

    message = f"unknown {what}: {name!r}."
    suggestion = hint or next(iter(difflib.get_close_matches(name, [str(k) for k in known], n=1)), None)
    if suggestion:
        message += f" Did you mean {suggestion}?"
    return message + f" Known: {', '.join(sorted(map(str, known)))}"
