"""Online DPO (`algorithm: online_dpo`): the DPO family's losses on pairs the policy samples as it trains.

Per prompt the policy samples two completions (the rollout path as is, `rollout.group_size` 2), the run's
reward functions score them (`rl.rewards`: a verifier, a reward model, the judge), the higher-scored one is
the chosen, and any `dpo.kind` of `losses.preference_loss` trains on the pair against a frozen reference
model (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792; TRL's
OnlineDPOTrainer). What differs from the offline Objective is only where the pairs and the reference
log-probs come from; the loss after the forward is the same function (`preference.pair_objective`).

- Ties (equal rewards, or a sample the source left out of the baselines) are dropped: no loss. They stay in
  the denominator, like GRPO's zero-advantage groups, so that a step of only ties is a zero-gradient step
  rather than an error; `online_dpo/tie_share` counts them, and `rl.dynamic_sampling` replaces tied pairs
  with fresh prompts. TRL instead keeps a tie, taking the first sample as chosen.
- A pair's two samples stay together and in order through minibatches and micro-batches (`WHOLE_GROUPS`;
  the run type keeps micro-batches even); the loss checks it on each micro-batch.
- Log-probs of policy and reference are those of `logits / rollout.temperature`, the distribution that was
  sampled; at temperature 1 (the default) they are TRL's.
- The reference log-probs are computed once per rollout by the source (`ref_logps`), like GRPO's KL term;
  a reference-free kind (simpo, orpo) loads no reference.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.preference import pair_objective
from posttrain.data.templates import IGNORE_INDEX
from posttrain.logprobs import token_stats
from posttrain.losses import REFERENCE_FREE_KINDS
from posttrain.rollout.buffer import Rollout, tempered_forward

KIND = "prompt"  # the row schema online algorithms read
forward = tempered_forward  # the policy is a plain language model
WHOLE_GROUPS = True  # a pair is never split by minibatches or micro-batches


def reference(cfg):
    """The frozen reference: `dpo.ref_model`, default the policy as loaded (without its LoRA adapter); none
    for a reference-free kind."""
    if cfg.dpo.kind in REFERENCE_FREE_KINDS:
        return None
    update = {"lora": None} | ({"path": cfg.dpo.ref_model} if cfg.dpo.ref_model else {})
    return cfg.model.model_copy(update=update)


def preference_signs(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[N] for N samples in pairs (samples 2k, 2k+1 after the same prompt): +1 on the chosen (the higher
    reward), -1 on the rejected, 0 on both samples of a tie (equal rewards, or either sample not valid)."""
    if rewards.numel() % 2:
        raise ValueError(f"online DPO needs samples in pairs, got {rewards.numel()}")
    first, second = rewards.view(-1, 2).unbind(1)
    sign = torch.sign(first - second)  # [P]: +1 the first is chosen, -1 the second, 0 a tie
    if valid is not None:
        sign = sign * valid.view(-1, 2).all(1)
    return torch.stack([sign, -sign], 1).reshape(-1).float()


def advantages(rollout: Rollout, cfg, kl_coef: float) -> dict[str, torch.Tensor]:
    """``{"advantages": [N]}`` the preference signs (`preference_signs`: +1 chosen, -1 rejected, 0 a tie;
    samples.jsonl shows them), and ``"pair_index"`` [N], each sample's pair, which the loss checks."""
    if rollout.group_size != 2:
        raise ValueError(f"online DPO samples pairs: group_size must be 2, got {rollout.group_size}")
    N = rollout.rewards.numel()
    return {
        "advantages": preference_signs(rollout.rewards, rollout.valid),
        "pair_index": torch.arange(N) // 2,
    }


class Objective:
    """The DPO family's loss of one micro-batch of P pairs (2P samples, each pair's two consecutive), summed
    over the pairs that are not ties; weight = the pairs (ties included, module docstring). The metrics are
    pair sums as the offline Objective's (ties count 0) and the ties."""

    def __init__(self, cfg):
        self.cfg, self.opts = cfg, cfg.dpo
        self.needs_ref = self.opts.kind not in REFERENCE_FREE_KINDS

    def in_loss(self, batch: dict) -> torch.Tensor:
        """[P] bool: pairs whose two samples are both in the loss (rl.mask_truncated drops a pair whole)."""
        return (batch["loss_mask"].view(-1, 2) > 0).all(1)

    def weight(self, batch: dict) -> float:
        return float(self.in_loss(batch).sum())

    def loss(self, model, batch: dict):
        pair_index = batch["pair_index"].view(-1, 2)
        if not torch.equal(pair_index[:, 0], pair_index[:, 1]):
            raise RuntimeError("online DPO: a micro-batch split a pair (samples out of order)")
        head, _ = forward(model, batch, self.cfg.rollout.temperature, share_prompts=self.cfg.rl.share_prompts)
        mask_NT = batch["targets"] != IGNORE_INDEX
        logps_NT = token_stats(head, batch["targets"]).logps
        seq_P2 = torch.where(mask_NT, logps_NT, 0.0).sum(1).view(-1, 2)  # summed log-probs, per pair
        len_P2 = mask_NT.sum(1).float().view(-1, 2)
        sign_P = batch["advantages"].view(-1, 2)[:, 0]
        decided = (sign_P != 0) & self.in_loss(batch)
        first = sign_P[decided] > 0  # the first sample of the pair is the chosen one

        def chosen_rejected(x_P2):
            x = x_P2[decided]
            return torch.where(first, x[:, 0], x[:, 1]), torch.where(first, x[:, 1], x[:, 0])

        ref = (None, None)
        if self.needs_ref:
            if "ref_logps" not in batch:
                raise RuntimeError("online DPO: reference log-probs missing (the source loaded no reference)")
            ref = chosen_rejected(torch.where(mask_NT, batch["ref_logps"], 0.0).sum(1).view(-1, 2))
        loss, metrics = pair_objective(self.opts, *chosen_rejected(seq_P2), *ref, *chosen_rejected(len_P2))
        metrics["online_dpo/tie_share"] = (self.in_loss(batch) & ~decided).float().sum()
        return loss + 0.0 * seq_P2.sum(), metrics  # + 0: a graph to backpropagate through when all tie
