"""Small reward fns: exact match, a format regex, and length penalties (plain, overlong, success-gated).

Every reward fn has one signature, ``fn(prompts, completions, **row_fields) -> list[float]``, with
row fields as lists aligned with ``completions`` (``answer=[...]``). A fn takes the fields it
needs by name and ignores the rest through ``**_``, so one call can feed every component of a
combined reward. Fns with options are built by factories (``format_regex(pattern)``), which
check the options once, at configuration time, not at the first training step.

Length penalties count tokens when the rollout passes ``completion_lengths`` (one int per
completion, what the trainer saw), else characters of the completion text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

RewardFn = Callable[..., list[float]]
"""``(prompts, completions, **row_fields) -> list[float]``, one score per completion."""


def completion_text(completion) -> str:
    """The text of a completion: a string, or the contents of its (assistant) messages joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(m.get("content", "")) for m in completion)


def _check_aligned(name: str, values: Sequence, completions: Sequence) -> None:
    if len(values) != len(completions):
        raise ValueError(f"row field {name!r} has {len(values)} values for {len(completions)} completions")


def exact_match(prompts: Sequence, completions: Sequence, answer: Sequence, **_row_fields) -> list[float]:
    """1.0 when the completion is exactly the answer, as the arithmetic task scores it
    (:func:`posttrain.tasks.arithmetic.exact_match`: cut at the end token and the first newline,
    whitespace stripped; trailing text is wrong), else 0.0."""
    # Imported here: posttrain.tasks pulls in transformers (seconds), which the other fns never need.
    from posttrain.tasks import arithmetic

    _check_aligned("answer", answer, completions)
    return [arithmetic.exact_match(completion_text(c), str(a)) for c, a in zip(completions, answer)]


def format_regex(pattern: str, *, mode: str = "fullmatch", flags: int = re.DOTALL) -> RewardFn:
    """A reward fn giving 1.0 to completions that match ``pattern``, else 0.0.

    Args:
        pattern: a Python regular expression, e.g. ``r"<think>.*?</think>\\s*<answer>.*?</answer>"``.
        mode: ``"fullmatch"`` (default: the WHOLE completion must have the format, so text
            before or after it fails) or ``"search"`` (the pattern may match anywhere).
        flags: ``re`` flags; default ``re.DOTALL``, so ``.`` also matches newlines.

    Raises:
        ValueError: on an invalid pattern or mode (at construction, not at the first call).
    """
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"format_regex mode must be 'fullmatch' or 'search', not {mode!r}")
    try:
        compiled = re.compile(pattern, flags)
    except re.error as error:
        raise ValueError(f"format_regex: invalid pattern {pattern!r}: {error}") from error
    match = compiled.fullmatch if mode == "fullmatch" else compiled.search

    def format_reward(prompts: Sequence, completions: Sequence, **_row_fields) -> list[float]:
        return [float(match(completion_text(c)) is not None) for c in completions]

    format_reward.__name__ = "format_regex"
    return format_reward


def _lengths(completions: Sequence, completion_lengths: Sequence[int] | None) -> list[int]:
    if completion_lengths is None:
        return [len(completion_text(c)) for c in completions]
    _check_aligned("completion_lengths", completion_lengths, completions)
    return [int(n) for n in completion_lengths]


def length_penalty(target_length: int, *, coef: float = 1.0) -> RewardFn:
    """A reward fn penalising length beyond ``target_length``, linearly and without bound:
    ``-coef * max(0, L - target) / target`` (0 up to the target, -coef at twice the target).

    L is in tokens when the row fields carry ``completion_lengths``, else in characters. Use it
    to discourage rambling well below the generation limit; :func:`overlong_penalty` is the
    bounded penalty near the limit.
    """
    if target_length <= 0:
        raise ValueError(f"length_penalty target_length must be positive, got {target_length}")

    def length_reward(prompts, completions, completion_lengths=None, **_row_fields) -> list[float]:
        return [
            -coef * max(0, n - target_length) / target_length
            for n in _lengths(completions, completion_lengths)
        ]

    length_reward.__name__ = "length_penalty"
    return length_reward


def overlong_penalty(max_length: int, cache: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
    Learning System at Scale", arXiv:2503.14476, "Overlong Reward Shaping"), with
    L_max = ``max_length`` and L_cache = ``cache``:

        R(L) = 0                                 if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                                 if L > L_max

    so the penalty grows linearly from 0 to -1 over the last ``cache`` positions before the limit,
    instead of the cliff that plain truncation (reward 0 or -1 for any cut completion) gives;
    the paper adds it to the rule-based correctness reward. L is in tokens when the row fields
    carry ``completion_lengths``, else in characters; set ``max_length`` to the generation limit
    in the same unit. (DAPO: L_max = 20480, L_cache = 4096 tokens.)
    """
    if not 0 < cache <= max_length:
        raise ValueError(
            f"overlong_penalty needs 0 < cache <= max_length, got cache={cache}, max_length={max_length}"
        )
    safe = max_length - cache

    def overlong_reward(prompts, completions, completion_lengths=None, **_row_fields) -> list[float]:
        out = []
        for n in _lengths(completions, completion_lengths):
            out.append(0.0 if n <= safe else (safe - n) / cache if n <= max_length else -1.0)
        return out

    overlong_reward.__name__ = "overlong_penalty"
    return overlong_reward


def success_gated_length_penalty(
    gate: RewardFn, max_length: int, *, coef: float = 0.1, threshold: float = 1.0
) -> RewardFn:
    """A length penalty on correct samples only: ``-coef * min(L, max_length) / max_length`` where the
    ``gate`` reward fn scores the sample at or above ``threshold``, else 0.

    Penalising the length of every sample teaches the policy to fail fast: a short wrong answer then
    beats a long attempt, and on hard prompts the cheapest reward is to give up (prime-rl's finding when it
    gated its length shaping on correctness, PrimeIntellect-ai/prime-rl#3376; Kimi k1.5, arXiv:2501.12599,
    §2.3.3, also keeps incorrect samples from gaining by brevity). Gated, the penalty only orders the
    correct answers by length, so among successes the shorter one wins. Choose ``coef`` below the gap
    between a correct and a wrong sample's reward (0.1 against a 0/1 correctness reward) so that a long
    correct answer still beats any wrong one.

    Args:
        gate: the correctness reward fn (e.g. ``math_answer``), called with the same arguments.
        max_length: the length at which the penalty reaches ``-coef`` (the generation limit); tokens when
            the rollout passes ``completion_lengths``, else characters.
        coef: the penalty's size, ≥ 0.
        threshold: the gate score that counts as correct.
    """
    if max_length <= 0:
        raise ValueError(f"success_gated_length_penalty: max_length must be positive, got {max_length}")
    if coef < 0:
        raise ValueError(f"success_gated_length_penalty: coef must be >= 0, got {coef}")

    def gated_length_reward(prompts, completions, completion_lengths=None, **row_fields) -> list[float]:
        passed = gate(prompts, completions, completion_lengths=completion_lengths, **row_fields)
        _check_aligned("gate scores", passed, completions)
        lengths = _lengths(completions, completion_lengths)
        return [
            -coef * min(n, max_length) / max_length if float(p) >= threshold else 0.0
            for n, p in zip(lengths, passed)
        ]

    gated_length_reward.__name__ = "success_gated_length_penalty"
    return gated_length_reward
