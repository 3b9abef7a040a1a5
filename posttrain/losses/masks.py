"""Which tokens the policy loss trains on, and with what importance weight: pure functions on [B, T].

- `off_policy_mask`: DeepSeek-V3.2's off-policy sequence mask (drop negative-advantage samples that the
  policy has drifted far from).
- `entropy_threshold` / `high_entropy_mask`: "Beyond the 80/20 rule" top-entropy token selection.
- `importance_weights`: truncated or masked importance sampling (TIS / MIS) against a sampler whose
  log-probs differ from the trainer's (vLLM, another dtype), at token or sequence level; `mismatch_stats`
  measures that difference.

Each returns a detached multiplier of the per-token loss. The loss keeps its denominators (`loss_units`):
a dropped token adds 0 but still counts, as in TRL, so micro-batch sums stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from posttrain.errors import unknown

__all__ = [
    "IS_MODES",
    "mismatch_stats",
    "entropy_threshold",
    "high_entropy_mask",
    "importance_weights",
    "off_policy_mask",
]

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@torch.no_grad()
def off_policy_mask(
    logps: Tensor, behaviour_logps: Tensor, advantages: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """Off-policy sequence mask: DeepSeek-AI 2025, "DeepSeek-V3.2", arXiv:2512.02556 (Eq. 9).

    A sample is dropped when its advantage is negative and the mean per-token KL estimate of the behaviour
    policy from the current one exceeds δ:

        keep_i = [A_i ≥ 0] ∨ [(1/|y_i|)·Σ_t (log π_behav(y_t) − log π_θ(y_t)) ≤ δ]

    Negative samples that the policy has moved far from carry mostly noise (their tokens are rare under
    π_θ), and pushing them down further destabilises training; positive samples are always kept. NaN
    log-probs (a sampler that could not score a token) count as 0, as in TRL.

    Args:
        logps: [B, T] current log-probs (detached here).
        behaviour_logps: [B, T] log-probs of the policy that sampled (the engine's where known).
        advantages: [B, 1], [B] or [B, T].
        mask: [B, T] valid tokens.
        threshold: δ > 0.

    Returns:
        [B, 1] (or [B, T] for per-token advantages) float mask, 1 keep, 0 drop.
    """
    if threshold <= 0:
        raise ValueError(f"off-policy mask: the threshold must be > 0, got {threshold}")
    valid = mask.bool()
    kl_BT = torch.nan_to_num(behaviour_logps.float() - logps.detach().float(), nan=0.0)
    mean_kl_B1 = torch.where(valid, kl_BT, 0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return ((advantages >= 0) | (mean_kl_B1 <= threshold)).float()


@torch.no_grad()
def entropy_threshold(entropies: Tensor, mask: Tensor, quantile: float) -> float:
    """The entropy above which a token is among the top `quantile` share of the valid tokens.

    Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
    Learning for LLM Reasoning", arXiv:2506.01939 (ρ = 0.2 in the paper): the threshold is the (1 − ρ)
    quantile of the valid tokens' entropies (linear interpolation, torch.quantile, as TRL).

    Returns:
        the threshold, or +inf when there is no valid token (an empty mask selects nothing, instead of
        torch.quantile's error on an empty tensor).
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"top-entropy masking: quantile must be in (0, 1], got {quantile}")
    values = entropies.detach()[mask.bool()].float()
    if values.numel() == 0:
        return math.inf
    return float(torch.quantile(values, 1 - quantile))


@torch.no_grad()
def high_entropy_mask(
    entropies: Tensor, mask: Tensor, quantile: float, threshold: float | None = None
) -> Tensor:
    """[B, T] bool: valid tokens whose entropy is ≥ `entropy_threshold(entropies, mask, quantile)`.

    Pass `threshold` computed once over a whole batch to keep micro-batches consistent; by default it is
    computed on the tensors given (TRL computes it per micro-batch).
    """
    if threshold is None:
        threshold = entropy_threshold(entropies, mask, quantile)
    return (entropies.detach() >= threshold) & mask.bool()


@torch.no_grad()
def importance_weights(
    trainer_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    *,
    mode: str = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 2.0,
) -> Tensor:
    """Importance weights correcting for a sampler whose numbers differ from the trainer's.

    The engine samples from π_sampler (vLLM kernels, or another dtype), the loss is built for π_old, the
    trainer's own computation of the same weights. The per-token ratio w_t = π_old(y_t) / π_sampler(y_t)
    reweights each token's loss (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training", the truncated IS (TIS) blog post; masked IS (MIS) and the sequence-level forms
    from Liu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
    Mismatch"). Modes, as TRL 1.16's `vllm_importance_sampling_mode`:

        token_truncate     w_t = clamp(exp(Δ_t), C_min, C_max)                 Δ_t = log π_old − log π_sampler
        token_mask         w_t = exp(Δ_t) if C_min ≤ exp(Δ_t) ≤ C_max else 0
        sequence_truncate  w_i = clamp(exp(Σ_t Δ_t), C_min, C_max), for every token of sequence i
        sequence_mask      w_i = exp(Σ_t Δ_t) if inside the bounds else 0

    Truncation bounds the variance but keeps a bias; masking drops the samples where the two computations
    disagree most. Padding and NaN log-probs give Δ = 0.

    Args:
        trainer_logps, sampler_logps: [B, T].
        mask: [B, T] valid tokens.
        mode: one of `IS_MODES`.
        clip_min, clip_max: the bounds C_min, C_max (None: unbounded on that side).

    Returns:
        [B, T] (token modes) or [B, 1] (sequence modes) float32 weights, detached.
    """
    if mode not in IS_MODES:
        raise ValueError(unknown("importance-sampling correction mode", mode, IS_MODES))
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"importance weights: clip_min {clip_min} exceeds clip_max {clip_max}")
    diff_BT = torch.where(mask.bool(), trainer_logps.float() - sampler_logps.float(), 0.0)
    diff = torch.nan_to_num(diff_BT, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


@torch.no_grad()
def mismatch_stats(trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor, *, bound: float = 2.0) -> dict:
    """How far the sampler's log-probs are from the trainer's on the sampled tokens (floats, for the log).

    With r_t = π_trainer(y_t) / π_sampler(y_t) over the valid tokens:

        mismatch/kl                 mean of (r − 1) − log r: the k3 estimate of KL(π_sampler ‖ π_trainer)
                                    from the sampler's own samples (≥ 0, exactly 0 when the numbers agree)
        mismatch/logp_diff_max      max |log π_trainer − log π_sampler|
        mismatch/ratio_p05, _p50, _p95, mismatch/ratio_min, _max    quantiles of r
        mismatch/share_past_bound   share of tokens with r > bound or r < 1 / bound

    NaN log-probs (a token the sampler could not score) are left out. No valid token: every value 0.
    """
    if bound <= 1:
        raise ValueError(f"mismatch bound must be > 1, got {bound}")
    diff = (trainer_logps.float() - sampler_logps.float())[mask.bool()]
    diff = diff[~torch.isnan(diff)]
    names = ("kl", "logp_diff_max", "ratio_p05", "ratio_p50", "ratio_p95", "ratio_min", "ratio_max")
    if diff.numel() == 0:
        return {f"mismatch/{n}": 0.0 for n in (*names, "share_past_bound")}
    ratio = torch.exp(diff)
    q = torch.quantile(ratio, torch.tensor([0.05, 0.5, 0.95], device=ratio.device)).tolist()
    values = [
        float(((ratio - 1) - diff).mean()),
        float(diff.abs().max()),
        *q,
        float(ratio.min()),
        float(ratio.max()),
    ]
    out = {f"mismatch/{n}": v for n, v in zip(names, values)}
    out["mismatch/share_past_bound"] = float(((ratio > bound) | (ratio < 1 / bound)).float().mean())
    return out
