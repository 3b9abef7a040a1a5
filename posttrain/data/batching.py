"""Batch plans and collation: padded batches, or padding-free packed rows.

`plan_batches` decides which examples go together (deterministic in seed and epoch, so a resumed run
sees the same order); `collate` turns a list of `Example`s into tensors. Packed rows carry several
examples separated only by `position_ids` that restart at 0: transformers (>= 4.54) turns that into a
block-diagonal causal mask when `attention_mask` is None, so packing costs no cross-contamination.
`packing_supported` checks that claim empirically on the actual model before anyone relies on it.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from posttrain.data.templates import IGNORE_INDEX, Example

__all__ = ["plan_batches", "collate", "packing_supported"]

# HF's LengthGroupedSampler uses megabatches of 50 batches: long enough to find similar lengths,
# short enough to keep the order random at the scale of an epoch.
MEGABATCH_BATCHES = 50


# ------------------------------------------------------------------------------------------- planning


def plan_batches(
    lengths: list[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    drop_last: bool = False,
) -> list[list[int]]:
    """Shuffled example indices for one epoch, cut into global batches of `batch_size`.

    Args:
        lengths: token count of each example.
        batch_size: examples per global batch (before splitting across devices / micro-batches).
        seed, epoch: the plan is a pure function of these (and the other args), so resuming is exact.
        group_by_length: put similar lengths together to cut padding (HF-style megabatches: shuffle,
            cut into chunks of 50 batches, sort each chunk by length, cut into batches). The full batch
            with the longest example goes first, so an out-of-memory error shows at step 0, not hours
            in; the other full batches are shuffled so lengths do not trend within an epoch.
        drop_last: drop the final batch if it is smaller than `batch_size`.

    Returns:
        batches: every index in range(len(lengths)) exactly once (minus a dropped last batch). A
        smaller last batch, if any, is last.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # A string seed: random.Random hashes it with sha512, stable across processes and Python versions.
    rng = random.Random(f"posttrain/plan_batches/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)

    if group_by_length:
        mega = MEGABATCH_BATCHES * batch_size
        order = [
            i
            for m0 in range(0, len(order), mega)
            for i in sorted(order[m0 : m0 + mega], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        ]

    batches = [order[b0 : b0 + batch_size] for b0 in range(0, len(order), batch_size)]
    partial = batches.pop() if batches and len(batches[-1]) < batch_size else None

    if group_by_length and batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        first = batches.pop(longest)
        rng.shuffle(batches)
        batches.insert(0, first)

    if partial is not None and not drop_last:
        batches.append(partial)
    return batches


# ------------------------------------------------------------------------------------------- collation


def collate(
    examples: list[Example],
    *,
    pad_id: int,
    packing: bool,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Stack examples into model inputs.

    Args:
        examples: the micro-batch.
        pad_id: token id used for padding (its value never matters: padding gets no loss and no attention
            from real tokens).
        packing: False -> one example per row, right-padded, with `attention_mask`.
            True -> padding-free: examples packed into rows of at most `max_length` tokens
            (first-fit-decreasing), separated by `position_ids` restarting at 0, no `attention_mask`.
            The model MUST be called with `attention_mask=None` (omit the key) and `use_cache=False`:
            transformers detects packed sequences from position_ids only when there is no attention mask
            and no cache (see `find_packed_sequence_indices` in transformers/masking_utils.py); otherwise
            the examples in a row attend to each other. Check the model with `packing_supported` first.
        max_length: row capacity for packing (required); in padded mode, optional upper bound.
        pad_to_multiple_of: round the row length L up to a multiple of this (friendlier kernel shapes).

    Returns (all int64):
        input_ids [R, L], targets [R, L] (-100 on padding), position_ids [R, L],
        example_index [R, L]: index into `examples` of each token, -1 on padding; per-example sums are
            `zeros(len(examples)).scatter_add_(0, idx[idx >= 0], values[idx >= 0])`.
        attention_mask [R, L]: padded mode only.
        R = len(examples) when padded; the number of packed rows when packed.
    """
    if not examples:
        raise ValueError("collate got no examples")
    too_long = [i for i, ex in enumerate(examples) if max_length is not None and len(ex) > max_length]
    if too_long:
        raise ValueError(
            f"examples {too_long[:5]} are longer than max_length={max_length} (encode with truncation first)"
        )
    if packing:
        if max_length is None:
            raise ValueError("packing needs max_length (the capacity of a packed row)")
        rows = _first_fit_decreasing([len(ex) for ex in examples], max_length)
    else:
        rows = [[i] for i in range(len(examples))]

    row_len = max(sum(len(examples[i]) for i in row) for row in rows)
    if pad_to_multiple_of:
        row_len = -(-row_len // pad_to_multiple_of) * pad_to_multiple_of

    shape = (len(rows), row_len)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "targets": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "example_index": torch.full(shape, -1, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            n = len(examples[i])
            batch["input_ids"][r, t : t + n] = torch.tensor(examples[i].input_ids)
            batch["targets"][r, t : t + n] = torch.tensor(examples[i].targets)
            batch["position_ids"][r, t : t + n] = torch.arange(n)
            batch["example_index"][r, t : t + n] = i
            t += n
        # Padding positions restart at 0 too: in packed mode the padding then forms its own block, which
        # no real token can attend to (and it attends only to itself, so no fully masked row -> no NaN).
        batch["position_ids"][r, t:] = torch.arange(row_len - t)

    if not packing:
        batch["attention_mask"] = (batch["example_index"] >= 0).long()
    return batch


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack indices by length: longest first, each into the first row with room (<= 11/9 OPT + 1 rows)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


# ------------------------------------------------------------------------------------------- probing


@torch.no_grad()
def packing_supported(model, *, atol: float | None = None) -> bool:
    """Whether `model` keeps packed sequences apart: two short random sequences packed in one row
    (position_ids restarting, no attention mask) give the same logits as each run alone.

    Cheap (three forwards of <= 13 tokens). False means the architecture's attention ignores per-sequence
    position ids (custom attention, old transformers, ...): use padded, length-grouped batches instead.
    `atol` defaults to 1e-4 for fp32 weights and 1e-2 for half-precision ones.
    """
    param = next(model.parameters())
    if atol is None:
        atol = 1e-4 if param.dtype == torch.float32 else 1e-2
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 5), generator=gen).to(param.device)
    b = torch.randint(0, vocab, (1, 8), generator=gen).to(param.device)
    packed_ids = torch.cat([a, b], dim=1)
    packed_pos = torch.cat([torch.arange(5), torch.arange(8)]).unsqueeze(0).to(param.device)

    was_training = model.training
    model.eval()
    try:
        alone_a = _per_token(model, input_ids=a)
        alone_b = _per_token(model, input_ids=b)
        packed = _per_token(model, input_ids=packed_ids, position_ids=packed_pos)
    finally:
        model.train(was_training)
    alone = torch.cat([alone_a, alone_b], dim=1).float()
    return bool(torch.allclose(packed.float(), alone, atol=atol, rtol=0))


def _per_token(model, **inputs) -> Tensor:
    """Per-token outputs: logits of a causal LM, hidden states of a bare backbone."""
    out = model(**inputs, use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
