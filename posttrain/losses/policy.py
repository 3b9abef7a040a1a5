"""Token-level online losses: the clipped policy loss (PPO, GRPO, DAPO, Dr. GRPO) and the clipped value
loss (PPO).

Unlike the sequence-level losses of `losses.preference` these work on per-token log-probs [B, T] and reduce
to a scalar themselves, because the reduction is part of the method (token mean vs sequence mean). Each
comes in two forms: `policy_loss` (the mean over one batch) and `policy_loss_sum` (a sum and the number of
units it sums over). The training loop uses the second: it sums over micro-batches and processes and divides
once by the units of the whole batch, which gives exactly `policy_loss` on the whole batch. `loss_units` is
the one place the units (the denominators) are counted.

Shapes: B sequences (rows of the rollout), T completion positions; `_BT` tensors are [B, T], `_B` [B].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from posttrain.advantages import kl_penalty
from posttrain.errors import unknown

__all__ = [
    "POLICY_AGGREGATIONS",
    "loss_units",
    "policy_loss",
    "policy_loss_sum",
    "value_loss",
    "value_loss_sum",
]

POLICY_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_units(mask: Tensor, aggregation: str = "token_mean") -> float:
    """How many units a micro-batch's summed policy (or value) loss counts: the denominator of the mean.

    "token_mean": valid tokens (mask.sum()). "seq_mean_token_mean", "seq_mean_token_sum_norm": sequences,
    all B rows, including rows with no valid token (they add 0 to the sum), as TRL does.

    Args:
        mask: [B, T] completion mask.
        aggregation: one of `POLICY_AGGREGATIONS`.

    Returns:
        units as a float (one host sync for token_mean).
    """
    if aggregation not in POLICY_AGGREGATIONS:
        raise ValueError(unknown("policy loss aggregation", aggregation, POLICY_AGGREGATIONS))
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if aggregation == "token_mean":
        return float(mask.sum())
    return float(mask.shape[0])


def policy_loss_sum(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    dual_clip: float | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, float, dict[str, Tensor]]:
    """The clipped policy-gradient loss of a micro-batch, summed over its units; see `policy_loss`.

    Returns:
        (loss_sum, units, metric_sums): loss_sum is a 0-d tensor with gradient; units = `loss_units(mask,
        aggregation)`; metric_sums holds clip_fraction, approx_kl and ratio_mean summed over the same units
        (detached, 0-d). Summing each over micro-batches and dividing by the summed units gives exactly
        `policy_loss` on the concatenated batch (for seq_mean_token_sum_norm, pass the same `max_len` to
        every micro-batch: its default, T, depends on each micro-batch's padding). ratio_max is not a sum
        and is left out; `policy_loss` reports it.
    """
    units = loss_units(mask, aggregation)
    loss_BT, stats_BT = _clipped_token_loss(
        logps, old_logps, advantages, mask, clip_low, clip_high, dual_clip
    )
    valid = mask.bool()

    def row_sums(x_BT: Tensor) -> Tensor:  # [B]
        return torch.where(valid, x_BT, 0.0).sum(dim=1)

    if aggregation == "token_mean":

        def unit_sum(x_BT: Tensor) -> Tensor:
            return row_sums(x_BT).sum()

    else:
        tokens_B = valid.sum(dim=1).clamp(min=1)  # a row without tokens adds 0, not 0/0

        def unit_sum(x_BT: Tensor) -> Tensor:
            return (row_sums(x_BT) / tokens_B).sum()

    if aggregation == "seq_mean_token_sum_norm":
        max_len = mask.shape[1] if max_len is None else max_len
        if max_len <= 0:
            raise ValueError(f"policy loss 'seq_mean_token_sum_norm': max_len must be > 0, got {max_len}")
        loss_sum = row_sums(loss_BT).sum() / max_len
    else:
        loss_sum = unit_sum(loss_BT)
    # Metrics are weighted like the loss (so the loop's one divisor fits), except that Dr. GRPO's max_len
    # is not used for them: a share of tokens divided by max_len would not be a share.
    metric_sums = {name: unit_sum(x_BT) for name, x_BT in stats_BT.items()}
    return loss_sum, units, metric_sums


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    dual_clip: float | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss of PPO and the GRPO family, with its aggregation over tokens.

    PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (Eq. 7). Per
    valid token, with ρ = exp(logps − old_logps) and advantage A:

        ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)

    ε_high > ε_low is DAPO's clip-higher: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
    System at Scale", arXiv:2503.14476 (§3.1; the paper uses ε_low = 0.2, ε_high = 0.28), which lets
    unlikely tokens with A > 0 grow further and keeps entropy up.

    Dual clip (`dual_clip` = c > 1): Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
    Reinforcement Learning", arXiv:1912.09729 (Eq. 5). For A < 0 the PPO loss grows without bound in ρ;
    dual clip caps it: ℓ = min(ℓ, −c·A) where A < 0.

    Aggregation over the B×T tokens (|y_i| = valid tokens of row i):

        "token_mean":              Σ_i Σ_t ℓ_it / Σ_i |y_i|                 DAPO (§3.3, token-level loss)
        "seq_mean_token_mean":     (1/B)·Σ_i (1/|y_i|)·Σ_t ℓ_it             GRPO (Shao et al. 2024, Eq. 3)
        "seq_mean_token_sum_norm": (1/B)·Σ_i Σ_t ℓ_it / max_len            Dr. GRPO (Liu et al. 2025,
                                                                            arXiv:2503.20783, Eq. 4)

    GRPO's per-sequence mean gives each token of a long completion less weight (a length bias); DAPO
    weights every token equally across the batch; Dr. GRPO divides by a constant (the generation budget),
    so the loss is an unbiased, unnormalised policy gradient. These equal TRL 1.16's GRPOTrainer loss types
    "bnpo" (and "dapo" on a single process), "grpo" and "dr_grpo" with the KL term off (add β·k3 with
    `kl_penalty` for GRPO's KL term).

    `old_logps` and `advantages` are constants (detached here). Masked positions add nothing and get a
    zero gradient, even when their log-probs are ±inf.

    Args:
        logps: [B, T] log-probs of the sampled tokens under the policy being trained (differentiable).
        old_logps: [B, T] log-probs under the policy that sampled them (π_old).
        advantages: [B] (one per completion, broadcast over its tokens) or [B, T].
        mask: [B, T] 1 on completion tokens, 0 on padding.
        clip_low, clip_high: ε_low ∈ [0, 1) and ε_high ≥ 0.
        aggregation: one of `POLICY_AGGREGATIONS`.
        dual_clip: c > 1, or None (off).
        max_len: Dr. GRPO's constant; set it to the maximum completion length (max_new_tokens). Default T.

    Returns:
        (loss, metrics): loss is a 0-d tensor with gradient. metrics are detached 0-d tensors:
        clip_fraction (share of tokens where the clipped branch was taken: ρ > 1 + ε_high with A > 0, or
        ρ < 1 − ε_low with A < 0), approx_kl (k3 estimate of KL(π_old ‖ π)), ratio_mean, ratio_max.
        Shares and means are weighted like the loss: over tokens for "token_mean", over sequences (of
        per-sequence token means) otherwise.

    Raises:
        ValueError: bad shapes or options, or no unit to average over.
    """
    loss_sum, units, metric_sums = policy_loss_sum(
        logps,
        old_logps,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        aggregation=aggregation,
        dual_clip=dual_clip,
        max_len=max_len,
    )
    if units == 0:
        raise ValueError("policy_loss: the mask holds no valid token, there is nothing to average")
    metrics = {k: v / units for k, v in metric_sums.items()}
    ratio_BT = torch.exp(torch.where(mask.bool(), logps.detach() - old_logps.detach(), -math.inf))
    metrics["ratio_max"] = ratio_BT.max()  # exp(−inf) = 0 on padding, below every valid ratio
    return loss_sum / units, metrics


def _clipped_token_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped loss [B, T] (not yet masked) and per-token detached diagnostics."""
    if logps.dim() != 2 or logps.shape != old_logps.shape or logps.shape != mask.shape:
        shapes = {n: tuple(t.shape) for n, t in (("logps", logps), ("old_logps", old_logps), ("mask", mask))}
        raise ValueError(
            f"policy loss: logps, old_logps and mask must have the same shape [B, T], got {shapes}"
        )
    if advantages.shape == logps.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != logps.shape:
        raise ValueError(
            f"policy loss: advantages must be [B] or [B, T] = {tuple(logps.shape)}, got {tuple(advantages.shape)}"
        )
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(
            f"policy loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}"
        )
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"policy loss: dual_clip must be > 1 (it caps the loss at −c·A), got {dual_clip}")

    valid = mask.bool()
    dtype = torch.promote_types(logps.dtype, torch.float32)
    advantages = advantages.detach().to(dtype)
    # Zero the log-ratio on padding before exp: padding log-probs may be ±inf, and a NaN there would
    # leak into the gradient through torch.where's backward (0 · NaN = NaN).
    log_ratio_BT = torch.where(valid, logps.to(dtype) - old_logps.detach().to(dtype), 0.0)
    ratio_BT = torch.exp(log_ratio_BT)
    clipped_ratio_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high)
    loss_BT = -torch.min(ratio_BT * advantages, clipped_ratio_BT * advantages)
    if dual_clip is not None:
        loss_BT = torch.where(advantages < 0, torch.minimum(loss_BT, -dual_clip * advantages), loss_BT)

    with torch.no_grad():
        ratio = ratio_BT.detach()
        clipped = ((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))
        stats = {
            "clip_fraction": clipped.to(dtype),
            # k3 of KL(π_old ‖ π) on tokens sampled from π_old: log-ratio old − new, (ρ − 1) − log ρ.
            "approx_kl": kl_penalty(torch.zeros_like(ratio), log_ratio_BT.detach(), estimator="k3"),
            "ratio_mean": ratio,
        }
    return loss_BT, stats


def value_loss_sum(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> tuple[Tensor, float, dict[str, Tensor]]:
    """The clipped value loss of a micro-batch, summed over its valid tokens; see `value_loss`.

    Returns:
        (loss_sum, units, metric_sums): units = valid tokens; metric_sums = {"clip_fraction": number of
        tokens where the clipped error was the larger one (the value gets no gradient there)}.
    """
    if values.dim() != 2 or any(t.shape != values.shape for t in (old_values, returns, mask)):
        shapes = {"values": values, "old_values": old_values, "returns": returns, "mask": mask}
        shapes = {n: tuple(t.shape) for n, t in shapes.items()}
        raise ValueError(f"value loss: expected tensors of the same shape [B, T], got {shapes}")
    if clip is not None and clip < 0:
        raise ValueError(f"value loss: clip must be >= 0 or None, got {clip}")
    valid = mask.bool()
    returns = returns.detach()
    error_BT = (values - returns).pow(2)
    clipped_BT = torch.zeros_like(error_BT, dtype=torch.bool)
    if clip is not None:
        old_values = old_values.detach()
        clipped_values_BT = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error_BT = (clipped_values_BT - returns).pow(2)
        clipped_BT = clipped_error_BT > error_BT
        error_BT = torch.maximum(error_BT, clipped_error_BT)
    loss_sum = 0.5 * torch.where(valid, error_BT, 0.0).sum()
    metric_sums = {"clip_fraction": (clipped_BT & valid).sum().to(error_BT.dtype).detach()}
    return loss_sum, loss_units(mask, "token_mean"), metric_sums


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> Tensor:
    """PPO's clipped value loss, averaged over the valid tokens of the batch.

        ℓ_t = ½ · max((V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)²)

    The clipped term keeps the value head from moving more than c from the values seen at rollout time, as
    in OpenAI baselines' PPO2 and TRL's former PPO trainer (`cliprange_value`, 0.2); Schulman et al. 2017
    (arXiv:1707.06347) state the unclipped squared error. clip=None gives ½·(V_t − R_t)². returns and
    old_values are constants (detached here).

    Args:
        values: [B, T] current value-head outputs (differentiable).
        old_values: [B, T] value-head outputs at rollout time.
        returns: [B, T] regression targets (from `posttrain.advantages.gae`).
        mask: [B, T] 1 on completion tokens.
        clip: c ≥ 0, or None.

    Returns:
        loss: 0-d tensor with gradient.
    """
    loss_sum, units, _ = value_loss_sum(values, old_values, returns, mask, clip=clip)
    if units == 0:
        raise ValueError("value_loss: the mask holds no valid token, there is nothing to average")
    return loss_sum / units
