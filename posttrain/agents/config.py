"""What the `env:` config section turns into: the environment class, its budgets, its tool format, and the
task rows of a run; every problem a clear error at load or start-up, before any model is loaded.

    env:
      name: calculator            # bundled, or module:Class
      options: {}                 # the environment's keyword options
      format: tiny                # tool-call format
      budgets: {max_turns: 3, max_new_tokens: 32}
"""

from __future__ import annotations

import dataclasses

from posttrain.agents.env import TaskError
from posttrain.agents.envs import get_env
from posttrain.agents.formats import FORMATS
from posttrain.agents.runner import Budgets
from posttrain.data.io import read_rows
from posttrain.errors import ConfigError, DataError, unknown


def check_env_config(env) -> None:
    """Raise ValueError (pydantic reports it under the `env` key) for an unknown environment, tool format
    or budget."""
    try:
        get_env(env.name)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if env.format not in FORMATS:
        raise ValueError(unknown("tool format", env.format, FORMATS))
    budgets(env)


def budgets(env) -> Budgets:
    """`env.budgets` as :class:`Budgets` (a misspelled budget names the known ones)."""
    known = [f.name for f in dataclasses.fields(Budgets)]
    wrong = [k for k in env.budgets if k not in known]
    if wrong:
        raise ValueError(f"budgets: {unknown('budget', wrong[0], known)}")
    if env.budgets.get("truncate", "tail") not in ("tail", "head"):
        raise ValueError(f"budgets.truncate must be 'tail' or 'head', got {env.budgets['truncate']!r}")
    return Budgets(**env.budgets)


def env_factory(env):
    """``task -> Env`` for the configured class and options. The options are tried on a first task by
    :func:`check_options`, so that a wrong one is a config error, not a batch of ``infra.env`` labels."""
    cls = get_env(env.name)
    options = dict(env.options)

    def make(task: dict):
        return cls(task, **options)

    make.name, make.version = getattr(cls, "name", env.name), str(getattr(cls, "version", ""))
    make.cls = cls
    return make


def check_options(env, factory, task: dict) -> None:
    try:
        instance = factory(task)
    except TypeError as e:
        raise ConfigError(
            f"env.options {dict(env.options)!r} do not fit environment {env.name!r}: {e}"
        ) from None
    except TaskError:
        return  # the row's problem, reported as such by task_rows
    close = getattr(instance, "close", None)
    if close is not None:
        close()


def task_rows(env, paths: list[str], *, split: str) -> list[dict]:
    """Task rows from jsonl files (each row checked for the environment's required ``fields``: a missing
    one is a DataError naming file, line and field), or, with no files, the environment's generator
    (``tasks(n, split=..., seed=...)``)."""
    cls = get_env(env.name)
    if not paths:
        n = env.tasks if split == "train" else env.eval_tasks
        if n == 0:
            return []
        if not hasattr(cls, "tasks"):
            raise ConfigError(
                f"environment {env.name!r} does not generate tasks (no `tasks` classmethod): give task rows "
                f"in data.{'train' if split == 'train' else 'eval'}"
            )
        return list(cls.tasks(n, split=split, seed=env.task_seed))
    fields = tuple(getattr(cls, "fields", ()))
    rows, errors = [], []
    for path in paths:
        for loc, row in read_rows(path):  # any data format; a missing file or a bad line names file and line
            missing = [f for f in fields if f not in row]
            if missing:
                errors.append(
                    f"{loc}: field {missing[0]!r} missing (environment {env.name!r} needs {', '.join(fields)})"
                )
                continue
            rows.append(row)
    if errors:
        raise DataError(f"{len(errors)} task row(s) cannot be used:\n  " + "\n  ".join(errors[:20]))
    if not rows:
        raise DataError(f"{', '.join(paths)}: no task rows")
    return rows
