"""Greedy generation and exact-match accuracy: the quick held-out check of any stage.

Deterministic (greedy), through the one generation engine; it puts the model back the way it found it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from posttrain.data.templates import Prompt, encode_prompts
from posttrain.rollout.engine import HFEngine, Sampling
from posttrain.tasks.arithmetic import exact_match


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions, one per prompt, in the order given: a greedy call of the HF engine
    (rollout/engine.py), the same generator that RL and the evaluators use, so quickstart, eval and
    in-training numbers come from one place.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (needs a pad or eos token).
        prompts: chat prompts (``[{"role": "user", "content": ...}]``) or strings, rendered by the one
            prompt rule of every stage (`posttrain.data.templates.render_prompt`).
        max_new_tokens: per completion. The default suits the arithmetic task's short
            answers; longer tasks must raise it, or every completion is cut short.
        batch_size: sequences per forward.

    Returns:
        The decoded new tokens of each prompt, cut before the first eos token (which is
        not included). Other special tokens the model emits are kept, so that a malformed
        completion looks malformed. The model's train/eval mode is restored.
    """
    _, ids = encode_prompts(tokenizer, prompts)
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    groups = engine.generate(ids, 1, Sampling(max_new_tokens=max_new_tokens, temperature=0))
    return [group[0].text for group in groups]


def _scores(model, tokenizer, rows: list[dict], score: Callable[[str, str], float], **kw) -> list[float]:
    if not rows:
        raise ValueError("no rows to evaluate")
    completions = generate_greedy(model, tokenizer, [row["prompt"] for row in rows], **kw)
    return [score(completion, row["answer"]) for completion, row in zip(completions, rows)]


def accuracy(
    model, tokenizer, rows: list[dict], score: Callable[[str, str], float] = exact_match, **kw
) -> float:
    """Mean ``score(completion, row["answer"])`` of greedy completions.

    Args:
        rows: ``{"prompt": ..., "answer": ...}`` dicts, as from
            :func:`posttrain.tasks.arithmetic.eval_rows`.
        **kw: passed to :func:`generate_greedy` (``max_new_tokens``, ``batch_size``).
    """
    scores = _scores(model, tokenizer, rows, score, **kw)
    return sum(scores) / len(scores)


def accuracy_by_level(
    model, tokenizer, rows: list[dict], score: Callable[[str, str], float] = exact_match, **kw
) -> dict[str, float]:
    """Like :func:`accuracy`, one mean per ``row["level"]`` (one generation pass for all)."""
    per_level: dict[str, list[float]] = defaultdict(list)
    for row, value in zip(rows, _scores(model, tokenizer, rows, score, **kw)):
        per_level[row["level"]].append(value)
    return {level: sum(values) / len(values) for level, values in per_level.items()}
