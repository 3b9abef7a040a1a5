"""KTO: alignment from unpaired thumbs-up / thumbs-down feedback (Ethayarajh et al. 2024).

Rows are (prompt, completion, label). The loss (`posttrain.losses.kto_loss`) compares each
completion's log-ratio r = π − ref with a reference point z, an estimate of KL(π‖ref) made
on mismatched pairs: prompt i with the completion of another example.

Departure from TRL, on purpose: TRL pairs prompt i with completion i+1 *of the same
micro-batch*, so the mismatched sequences (and their reference log-probs) change with batch
composition. Here each example's partner is fixed (the next example of the dataset), so its
reference log-prob is computed once and cached like every other one, and no reference model
stays in memory. z is the mean over the micro-batch of the mismatched log-ratios, detached and
clamped at 0, as in the paper. Matched and mismatched sequences share ONE forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.preference import fingerprint_sequences, reference_logps, sequence_logps
from posttrain.data.batching import collate as collate_examples
from posttrain.data.templates import Example, encode_prompt_completion, encode_sft_row, to_example
from posttrain.losses import kto_loss

KIND = "feedback"


@dataclass
class Unpaired:
    example: Example  # prompt + completion, loss on the completion
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    mismatched: Example | None = None  # this prompt + the partner's completion (set by `prepare`)
    ref: tuple[float, float] | None = None  # reference log-probs (matched, mismatched)

    def __len__(self) -> int:
        return len(self.example) + (len(self.mismatched) if self.mismatched else 0)


def encode(row: dict, tokenizer, cfg, where: str) -> Unpaired | None:
    example = encode_sft_row(
        {"prompt": row["prompt"], "completion": row["completion"]}, tokenizer,
        max_length=cfg.data.max_length, truncation=cfg.data.truncation, where=where,
    )  # fmt: skip
    if example is None:
        return None
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, row["prompt"], row["completion"])
    return Unpaired(example, prompt_ids, completion_ids, bool(row["label"]))


def _mismatch(item: Unpaired, partner: Unpaired, max_length: int) -> Example:
    ids = (item.prompt_ids + partner.completion_ids)[:max_length]
    mask = ([False] * len(item.prompt_ids) + [True] * len(partner.completion_ids))[:max_length]
    return to_example(ids, mask)


def collate(items: list[Unpaired], **kw) -> dict:
    """n matched then n mismatched sequences in one batch."""
    if any(it.mismatched is None for it in items):
        raise RuntimeError("KTO items have no mismatched partner: Objective.prepare was not run")
    batch = collate_examples([it.example for it in items] + [it.mismatched for it in items], **kw)
    batch["num_pairs"] = len(items)  # sequence_logps reads 2 * num_pairs sequences
    batch["labels"] = torch.tensor([it.label for it in items])
    if all(it.ref is not None for it in items):
        batch["ref_logps"] = torch.tensor([it.ref[0] for it in items] + [it.ref[1] for it in items])
    return batch


class Objective:
    """KTO loss summed over examples; weight = examples in the micro-batch."""

    def __init__(self, cfg):
        self.opts = cfg.kto
        self.max_length = cfg.data.max_length

    def weight(self, batch: dict) -> int:
        return batch["num_pairs"]

    def prepare(
        self, model, examples: list[Unpaired], indices: list[int], *, cache, collate_fn, micro_batch: int
    ) -> None:
        n = len(examples)
        for i in range(n):  # a fixed derangement: every prompt meets another example's completion
            examples[i].mismatched = _mismatch(examples[i], examples[(i + 1) % n], self.max_length)
        key = fingerprint_sequences(e for it in examples for e in (it.example, it.mismatched))
        refs = reference_logps(
            model, indices, key=key, cache=cache, collate_fn=collate_fn, micro_batch=micro_batch
        )
        for i in indices:
            examples[i].ref = refs[i]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o, n = self.opts, batch["num_pairs"]
        logps, _ = sequence_logps(model, batch)
        ref = batch["ref_logps"]
        kl = (logps[n:] - ref[n:]).detach().mean()  # z: the batch's KL(π‖ref) estimate
        losses = kto_loss(
            logps[:n], ref[:n], batch["labels"], kl,
            beta=o.beta, desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight,
        )  # fmt: skip
        signed = torch.where(batch["labels"].bool(), 1.0, -1.0)
        rewards = o.beta * (logps[:n] - ref[:n]).detach()
        # metrics are summed here and averaged over examples by the loop
        return losses.sum(), {
            "kl": kl * n,
            "rewards/mean": rewards.sum(),
            "rewards/signed": (signed * rewards).sum(),
        }
