"""The bundled environments, and how an environment is named.

Each is procedurally generated from a seed, with a train / held-out split by *key* (the fact behind a
task, not its wording: no held-out key is ever sampled for training), a scripted optimal policy
(``golden``: grader tests and SFT demos) and hack probes (``probes``: scripted trajectories that must
score 0 with a given label). ``posttrain env check NAME`` runs both.

    name         tools                              grades
    calculator   calc(expr), answer(value)          the recorded answer equals the sum / difference
    sql          sql(query), answer(value)          the answer equals the table's value; writes: the
                                                    final table equals the expected one, no collateral
    fix_bug      read, replace, run_tests, submit   hidden tests on a pristine copy, in the sandbox
    guess        guess(n)                           found within ceil(log2(N + 1)) guesses
"""

from __future__ import annotations

import hashlib
import importlib

from posttrain.errors import ConfigError

BUNDLED = {
    "calculator": "posttrain.agents.envs.calculator:CalculatorEnv",
    "sql": "posttrain.agents.envs.sql:SqlEnv",
    "fix_bug": "posttrain.agents.envs.fix_bug:FixBugEnv",
    "guess": "posttrain.agents.envs.guess:GuessEnv",
}

HELD_OUT_PERCENT = 20
"""Share of keys (by hash) held out for evaluation."""


def get_env(spec: str):
    """An environment class by bundled name or ``module:Class``."""
    path = BUNDLED.get(spec, spec)
    if ":" not in path:
        raise ConfigError(
            f"unknown environment {spec!r}; bundled: {', '.join(BUNDLED)}; or give module:Class"
        )
    module, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"environment {spec!r}: cannot import {path} ({e})") from e
    return cls


def split_of(key) -> str:
    """ "held_out" for a fixed HELD_OUT_PERCENT of keys, "train" for the rest (stable: a hash of the key)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return "held_out" if int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT else "train"


def check_split(split: str) -> None:
    if split not in ("train", "held_out"):
        raise ConfigError(f"split must be 'train' or 'held_out', got {split!r}")
