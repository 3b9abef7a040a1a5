"""Offline preference optimisation: DPO and its family (IPO, hinge, robust, ..., SimPO, ORPO).

A batch of P pairs goes through the model in ONE forward: the 2P sequences (chosen first,
then rejected) are packed or padded together by `collate`, and per-sequence log-probability
sums come out of one `token_stats` call. The loss is `preference_loss(kind, ...)`, summed
over pairs; the loop divides by the number of pairs in the global batch.

Reference log-probs are computed once, before the first step, with the model as loaded
(for LoRA the adapter starts at zero, so this IS the adapter-disabled base), and cached in
the run directory: no reference model sits in memory while training, and a resumed run
reads the cache instead of recomputing it. `dpo.ref_model` names a different reference.
Reference-free kinds (simpo, orpo) never compute one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from posttrain.data.batching import collate as collate_examples
from posttrain.data.templates import Example, encode_sft_row
from posttrain.logprobs import sum_by_example, token_stats
from posttrain.losses import REFERENCE_FREE_KINDS, preference_loss, preference_rewards
from posttrain.models import forward_head

KIND = "preference"


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None  # reference log-prob sums (chosen, rejected), once computed

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def encode(row: dict, tokenizer, cfg, where: str) -> Pair | None:
    """Both completions after the same prompt; truncation follows data.truncation."""
    kw = dict(max_length=cfg.data.max_length, truncation=cfg.data.truncation)
    chosen = encode_sft_row(
        {"prompt": row["prompt"], "completion": row["chosen"]}, tokenizer, where=f"{where} (chosen)", **kw
    )
    rejected = encode_sft_row(
        {"prompt": row["prompt"], "completion": row["rejected"]}, tokenizer, where=f"{where} (rejected)", **kw
    )
    if chosen is None or rejected is None:
        return None  # dropped by the truncation policy: a pair lives or dies whole
    return Pair(chosen, rejected)


def fingerprint_sequences(examples) -> str:
    """A key for a reference-log-prob cache: changes with any token or mask of any sequence."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((ex.input_ids, ex.targets)).encode())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(model, indices: list[int], *, key: str, cache, collate_fn, micro_batch: int) -> dict:
    """{index: (logp of the item's first sequence, of its second)} for items whose batches hold
    n first sequences then n second ones (pairs: chosen, rejected; KTO: matched, mismatched).
    What the cache file holds for the same data (`key`) is reused (e.g. on --resume); the rest
    is computed in one pass and added to it."""
    saved = torch.load(cache) if cache is not None and cache.exists() else {}
    known = saved.get("refs", {}) if saved.get("fingerprint") == key else {}
    todo = [i for i in indices if i not in known]
    was_training = model.training
    model.eval()
    for start in range(0, len(todo), micro_batch):
        ix = todo[start : start + micro_batch]
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in collate_fn(ix).items()}
        logps, _ = sequence_logps(model, batch)
        known.update(zip(ix, zip(logps[: len(ix)].tolist(), logps[len(ix) :].tolist())))
    model.train(was_training)
    if cache is not None and todo:
        torch.save({"fingerprint": key, "refs": known}, cache)
    return known


def collate(pairs: list[Pair], **kw) -> dict:
    """The 2P sequences of P pairs in one batch: chosen are examples 0..P-1, rejected P..2P-1."""
    batch = collate_examples([p.chosen for p in pairs] + [p.rejected for p in pairs], **kw)
    batch["num_pairs"] = len(pairs)
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs])
    return batch


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs [2P], completion lengths in tokens [2P]) in one forward."""
    logps_RL = token_stats(forward_head(model, batch), batch["targets"]).logps
    n = 2 * batch["num_pairs"]
    lengths = sum_by_example((batch["targets"] != -100).float(), batch["example_index"], n)
    return sum_by_example(logps_RL, batch["example_index"], n), lengths


class Objective:
    """The DPO family's loss of one micro-batch of P pairs, summed over pairs (the loop divides once by the
    step's pairs):

        preference_loss(kind, log pi(y_c), log pi(y_r), log pi_ref(y_c), log pi_ref(y_r))    [P], summed
      + sft_weight * the chosen completions' mean NLL per token (RPO / ORPO's likelihood term)

    Shapes: the batch holds 2P sequences, chosen 0..P-1 then rejected P..2P-1; `*_logps` are summed log-probs
    per sequence ([2P]), the reference ones computed once by `prepare`. The metrics are pair sums: implicit
    rewards beta * (log pi - log pi_ref) of chosen and rejected, their margin, accuracy (margin > 0)."""

    def __init__(self, cfg):
        self.opts = cfg.dpo
        self.needs_ref = self.opts.kind not in REFERENCE_FREE_KINDS

    def weight(self, batch: dict) -> int:
        return batch["num_pairs"]

    def prepare(
        self, model, examples: list[Pair], indices: list[int], *, cache, collate_fn, micro_batch: int
    ) -> None:
        """Fill `pair.ref` for the pairs at `indices` (those the run will use)."""
        if not self.needs_ref or not examples:
            return
        key = fingerprint_sequences(e for p in examples for e in (p.chosen, p.rejected))
        refs = reference_logps(
            model, indices, key=key, cache=cache, collate_fn=collate_fn, micro_batch=micro_batch
        )
        for i in indices:
            examples[i].ref = refs[i]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        P = batch["num_pairs"]
        logps_2P, lengths_2P = sequence_logps(model, batch)
        chosen, rejected = logps_2P[:P], logps_2P[P:]
        ref_2P = batch.get("ref_logps")
        if self.needs_ref and ref_2P is None:
            raise RuntimeError("reference log-probs missing: Objective.prepare was not run")
        ref_chosen, ref_rejected = (ref_2P[:P], ref_2P[P:]) if self.needs_ref else (None, None)
        lengths = lengths_2P[:P], lengths_2P[P:]
        return pair_objective(self.opts, chosen, rejected, ref_chosen, ref_rejected, *lengths)


def pair_objective(opts, chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, chosen_len_P, rejected_len_P):
    """(the summed loss of P pairs, its metric sums) from their summed log-probs [P] and completion lengths
    in tokens [P], by the `dpo` section `opts`: what `Objective` computes once the forward is done, shared
    with online DPO (algorithms/online_dpo.py). The reference log-probs are None for reference-free kinds."""
    length_options = opts.kind_options(chosen_lengths=chosen_len_P, rejected_lengths=rejected_len_P)
    losses_P = preference_loss(
        opts.kind, chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, beta=opts.beta, **length_options
    )
    loss = losses_P.sum()
    if opts.sft_weight:
        # RPO / ORPO's likelihood term: mean NLL per token of the chosen completion.
        loss = loss + opts.sft_weight * (-chosen_P / chosen_len_P).sum()
    r_c, r_r = preference_rewards(chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, beta=opts.beta)
    return loss, {
        "rewards/chosen": r_c.sum(),
        "rewards/rejected": r_r.sum(),
        "rewards/accuracy": (r_c > r_r).float().sum(),
        "rewards/margin": (r_c - r_r).sum(),
        "logps/chosen": chosen_P.detach().sum(),
        "logps/rejected": rejected_P.detach().sum(),
    }
