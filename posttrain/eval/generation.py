"""Greedy generation and exact-match accuracy: the quick held-out check of any stage.

This is the evaluation path, not the RL generation engine: deterministic (greedy), no
logprobs, and it puts the model back the way it found it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from posttrain.tasks.arithmetic import exact_match

Prompt = list[dict] | str


def render_prompts(tokenizer, prompts: list[Prompt]) -> list[str]:
    """Chat prompts (lists of messages) through the chat template with the generation
    prompt appended; plain strings unchanged."""
    return [
        p
        if isinstance(p, str)
        else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _eos_ids(model, tokenizer) -> list[int]:
    # The tokenizer's eos plus any the model's generation config adds (chat models often stop
    # on an end-of-turn token and the document end alike).
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:i]
    return token_ids


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions, one per prompt, in the order given.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (needs a pad token).
        prompts: chat prompts (``[{"role": "user", "content": ...}]``), rendered with the
            chat template and ``add_generation_prompt=True``, or raw strings used as-is.
            No special tokens are added to either.
        max_new_tokens: per completion. The default suits the arithmetic task's short
            answers; longer tasks must raise it, or every completion is cut short.
        batch_size: prompts per ``generate`` call.

    Returns:
        The decoded new tokens of each prompt, cut before the first eos token (which is
        not included). Other special tokens the model emits are kept, so that a malformed
        completion looks malformed.
    """
    texts = render_prompts(tokenizer, prompts)
    eos_ids = _eos_ids(model, tokenizer)
    # An explicit config, so sampling settings stored with the model cannot leak into "greedy".
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Batches of similar length waste less compute on padding; the order is restored below.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    completions: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                padding_side="left",  # generation appends on the right, so pad on the left
                add_special_tokens=False,
            ).to(model.device)
            output_BT = model.generate(**encoded, generation_config=config)
            new_BT = output_BT[:, encoded["input_ids"].shape[1] :].tolist()
            for i, token_ids in zip(batch, new_BT):
                completions[i] = tokenizer.decode(_cut_at_eos(token_ids, eos_ids), skip_special_tokens=False)
    finally:
        model.train(was_training)
    return completions


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
