"""The GRPO family: GRPO, Dr. GRPO, DAPO, CISPO, GSPO, RLOO and REINFORCE++ (critic-free policy gradient).

One module, because they differ only in options of shared pieces (see `RL_PRESETS` in config/online.py):

    advantage    group-normalised (GRPO, DAPO; `scale` std / batch / none = Dr. GRPO), leave-one-out
                 (RLOO), batch-whitened returns (REINFORCE++)
    aggregation  token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum_norm (Dr. GRPO),
                 seq_mean_token_sum (LUSPO)
    loss kind    clip (PPO surrogate), cispo, sapo; ratio per token or per sequence (GSPO)
    clipping     clip_low / clip_high (DAPO's clip-higher), dual clip, two-sided clip (delta)
    token masks  off-policy sequence mask, top-entropy tokens, sampler-mismatch importance weights
    KL           none (default), a k1/k2/k3 loss term, or a per-token penalty in the reward

The loss is `losses.policy_loss_sum` (one function, its variants as options); the rollout machinery is
`posttrain.rollout.source`. The policy log-probs are taken from `logits / temperature`, the distribution
the engine sampled from, so that with one optimiser step per rollout the ratio starts at exactly 1.
"""

from __future__ import annotations

import torch

from posttrain.advantages import (
    group_advantages,
    kl_penalty,
    leave_one_out_advantages,
    reinforce_pp_advantages,
)
from posttrain.data.templates import IGNORE_INDEX
from posttrain.logprobs import token_stats
from posttrain.losses import loss_units, policy_loss_sum
from posttrain.rollout.buffer import Rollout, tempered_forward

KIND = "prompt"  # the row schema online algorithms read
forward = tempered_forward  # the policy is a plain language model: its tempered completion distribution


def advantages(rollout: Rollout, cfg, kl_coef: float) -> dict[str, torch.Tensor]:
    """``{"advantages": [N]}`` (one per sample, broadcast over its tokens), or ``[N, C]`` per token for
    REINFORCE++ with the KL in the reward. Samples with ``rollout.valid`` False (agents' infra / data /
    drift failures, agents/failures.py) are left out of every baseline, and of the loss."""
    rl, G, rewards, valid = cfg.rl, rollout.group_size, rollout.rewards, rollout.valid
    if rl.advantage == "group":
        return {"advantages": group_advantages(rewards, G, scale=rl.scale, valid=valid)}
    if rl.advantage == "rloo":
        return {"advantages": leave_one_out_advantages(rewards, G, valid=valid)}
    group = G if G > 1 else None  # reinforce_pp
    if rl.kl_in_reward and kl_coef > 0 and rollout.ref_logps is not None:
        mask = rollout.mask
        kl = kl_penalty(rollout.old_logps, rollout.ref_logps, estimator=rl.kl_estimator)
        adv = reinforce_pp_advantages(rewards, mask, kl=kl * mask, kl_coef=kl_coef, group_size=group)
    else:
        adv = reinforce_pp_advantages(rewards, group_size=group)
    if valid is not None:  # out of the loss (not of the batch whitening)
        adv = adv * (valid[:, None] if adv.dim() == 2 else valid)
    return {"advantages": adv}


class Objective:
    """The GRPO family's loss of one micro-batch, summed over its units (tokens for token_mean, sequences
    for the seq_* aggregations; the loop divides once by the step's units):

        policy_loss_sum(log pi(y_t), log pi_old(y_t), A, mask)     the clipped surrogate and its variants
      + kl_coef * sum over units of KL_t(pi || pi_ref)              with rl.kl_coef > 0, not in the reward

    Shapes: B samples of the micro-batch, T completion positions (the rollout buffer's C), V the vocabulary.
    The metrics are unit sums too: entropy (nats per token), kl_to_ref (nats per token, the k1/k2/k3 estimate
    of rl.kl_estimator)."""

    def __init__(self, cfg):
        self.cfg, self.rl = cfg, cfg.rl
        self.kl_loss = self.rl.kl_coef > 0 and not self.rl.kl_in_reward

    def mask(self, batch: dict) -> torch.Tensor:
        """[B, T] the completion tokens of the samples kept in the loss."""
        return (batch["targets"] != IGNORE_INDEX) & (batch["loss_mask"][:, None] > 0)

    def weight(self, batch: dict) -> float:
        return loss_units(self.mask(batch), self.rl.aggregation)

    def loss(self, model, batch: dict):
        rl = self.rl
        head, _ = forward(model, batch, self.cfg.rollout.temperature, share_prompts=rl.share_prompts)
        mask_BT = self.mask(batch)
        stats = token_stats(head, batch["targets"], with_entropy=True)
        logps_BT, entropy_BT = stats.logps, stats.entropy.detach()  # the entropy is a metric and a token mask
        adv = batch[
            "advantages"
        ]  # [B] per sample, or [B, T] per token (REINFORCE++ with the KL in the reward)
        adv_BT = adv[:, None].expand_as(logps_BT) if adv.dim() == 1 else adv
        loss, _, metrics = policy_loss_sum(
            logps_BT,
            batch["old_logps"],
            adv_BT,
            mask_BT,
            # Dr. GRPO's constant: the generation budget in policy tokens (an agent source's is per episode)
            max_len=int(batch["policy_token_budget"]),
            entropies=entropy_BT,
            behaviour_logps=batch.get("sampler_logps"),
            is_weights=batch.get("is_weights"),
            **loss_options(rl),
        )
        metrics["entropy"] = unit_sum(entropy_BT, mask_BT, rl.aggregation)
        if "ref_logps" in batch:
            kl_BT = kl_penalty(logps_BT, batch["ref_logps"], estimator=rl.kl_estimator)
            kl_sum = unit_sum(kl_BT, mask_BT, rl.aggregation)
            metrics["kl_to_ref"] = kl_sum.detach()
            if self.kl_loss:
                loss = loss + batch["kl_coef"] * kl_sum  # the source's coefficient (adaptive, rolled back)
        return loss, metrics


def loss_options(rl) -> dict:
    """The `rl` section's policy-loss options as `policy_loss_sum` keywords. Top-entropy masking picks its
    threshold per micro-batch, as TRL does (the entropies are the current policy's, known per forward)."""
    names = (
        "clip_low", "clip_high", "dual_clip", "aggregation", "kind", "importance_level", "delta",
        "sapo_tau_pos", "sapo_tau_neg", "off_policy_threshold", "top_entropy_quantile",
    )  # fmt: skip
    return {name: getattr(rl, name) for name in names}


def unit_sum(x_BT: torch.Tensor, mask_BT: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Sum of per-token values over the aggregation's units: all tokens (token_mean) or, per sequence,
    the mean over its tokens (seq_*), so that dividing by `loss_units` gives the aggregated mean."""
    x_BT = torch.where(mask_BT, x_BT, 0.0)
    if aggregation == "token_mean":
        return x_BT.sum()
    return (x_BT.sum(1) / mask_BT.sum(1).clamp(min=1)).sum()
