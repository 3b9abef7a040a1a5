"""Token-level policy-gradient losses of PPO and the GRPO family, and their variants as options of one
function: the clipped surrogate (PPO, GRPO, DAPO, Dr. GRPO, GSPO, LUSPO, INTELLECT-2's two-sided clip),
CISPO and SAPO, with the off-policy sequence mask, top-entropy token selection and sampler-mismatch
importance weights (`losses.masks`) as multipliers of the per-token loss.

Unlike the sequence-level losses of `losses.preference` these work on per-token log-probs [B, T] and reduce
to a scalar themselves, because the reduction is part of the method (token mean vs sequence mean). Each
comes in two forms: `policy_loss` (the mean over one batch) and `policy_loss_sum` (a sum and the number of
units it sums over). The training loop uses the second: it sums over micro-batches and processes and divides
once by the units of the whole batch, which gives exactly `policy_loss` on the whole batch. `loss_units` is
the one place the units (the denominators) are counted; no option changes them (a masked token adds 0).

Shapes: B sequences (rows of the rollout), T completion positions; `_BT` tensors are [B, T], `_B` [B].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from posttrain.advantages import kl_penalty
from posttrain.errors import unknown
from posttrain.losses.masks import high_entropy_mask, off_policy_mask

__all__ = [
    "IMPORTANCE_LEVELS",
    "POLICY_AGGREGATIONS",
    "POLICY_KINDS",
    "loss_units",
    "policy_loss",
    "policy_loss_sum",
]

POLICY_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum")
POLICY_KINDS = ("clip", "cispo", "sapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def loss_units(mask: Tensor, aggregation: str = "token_mean") -> float:
    """How many units a micro-batch's summed policy (or value) loss counts: the denominator of the mean.

    "token_mean": valid tokens (mask.sum()). The seq_* aggregations: sequences, all B rows, including rows
    with no valid token (they add 0 to the sum), as TRL does.

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
    kind: str = "clip",
    importance_level: str = "token",
    delta: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    off_policy_threshold: float | None = None,
    behaviour_logps: Tensor | None = None,
    entropies: Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_threshold: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, float, dict[str, Tensor]]:
    """The policy-gradient loss of a micro-batch, summed over its units; see `policy_loss` for the options.

    Returns:
        (loss_sum, units, metric_sums): loss_sum is a 0-d tensor with gradient; units = `loss_units(mask,
        aggregation)`; metric_sums holds clip_fraction, approx_kl and ratio_mean (and kept_fraction when a
        mask option is on) summed over the same units (detached, 0-d). Summing each over micro-batches and
        dividing by the summed units gives exactly `policy_loss` on the concatenated batch (for
        seq_mean_token_sum_norm, pass the same `max_len` to every micro-batch: its default, T, depends on
        each micro-batch's padding; for top-entropy masking pass an `entropy_threshold` computed once over
        the whole batch, else each micro-batch picks its own top share). ratio_max is not a sum and is
        left out; `policy_loss` reports it.
    """
    units = loss_units(mask, aggregation)
    loss_BT, stats_BT = _token_loss(
        logps,
        old_logps,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        kind=kind,
        importance_level=importance_level,
        delta=delta,
        sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg,
    )
    valid = mask.bool()
    keep_BT = _keep(
        logps,
        old_logps if behaviour_logps is None else behaviour_logps,
        advantages,
        mask,
        off_policy_threshold=off_policy_threshold,
        entropies=entropies,
        top_entropy_quantile=top_entropy_quantile,
        entropy_threshold=entropy_threshold,
        is_weights=is_weights,
    )
    if keep_BT is not None:
        loss_BT = loss_BT * keep_BT
        stats_BT["kept_fraction"] = (keep_BT > 0).to(loss_BT.dtype).expand_as(loss_BT)

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
    elif aggregation == "seq_mean_token_sum":
        loss_sum = row_sums(loss_BT).sum()
    else:
        loss_sum = unit_sum(loss_BT)
    # Metrics are weighted like the loss (so the loop's one divisor fits), except that the length factors of
    # Dr. GRPO and LUSPO are not used for them: a share of tokens times a length would not be a share.
    metric_sums = {name: unit_sum(x_BT) for name, x_BT in stats_BT.items()}
    return loss_sum, units, metric_sums


def policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, **options
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss of PPO and the GRPO family, its variants, and its aggregation over tokens.

    **kind="clip"** (default), PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    arXiv:1707.06347 (Eq. 7). Per valid token, with ratio ρ and advantage A:

        ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)

    ε_high > ε_low is DAPO's clip-higher: Yu et al. 2025, arXiv:2503.14476 (§3.1; ε_low = 0.2, ε_high =
    0.28), which lets unlikely tokens with A > 0 grow further and keeps entropy up.

    Dual clip (`dual_clip` = c > 1): Ye et al. 2020, arXiv:1912.09729 (Eq. 5): ℓ = min(ℓ, −c·A) where A < 0.

    Two-sided clip (`delta` = δ, above 1 + ε_high): INTELLECT-2 (Prime Intellect 2025, arXiv:2505.07291,
    §3.3): ℓ = −min(min(ρ, δ)·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A). For A < 0 the unclipped branch grows
    with ρ without bound; δ caps it (the gradient vanishes past δ), as TRL's `delta`.

    **kind="cispo"**: MiniMax 2025, "MiniMax-M1", arXiv:2506.13585 (§3.1, Eq. 4); ScaleRL (Khatri et al.
    2025, arXiv:2510.13786) recommends ε_max = 5. Clipped importance-sampling-weight policy optimisation:
    the ratio is a detached weight, capped, on the REINFORCE term, so every token keeps a gradient:

        ℓ = −sg(min(ρ, ε_max))·A·log π_θ(y_t)          ε_max = `clip_high` (the cap itself, as in TRL)

    **kind="sapo"**: Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347 (Eq. 6): a
    smooth gate instead of the hard clip, with its own temperature for positive and negative advantages:

        ℓ = −σ(τ·(ρ − 1))·(4/τ)·A                    τ = sapo_tau_pos if A > 0 else sapo_tau_neg

    At ρ = 1 the gate's slope is 1 (the plain policy gradient); far from 1 it fades instead of stopping.

    **importance_level="sequence"**, GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization",
    arXiv:2507.18071 (Eq. 7): one ratio per sequence, the geometric mean of its token ratios,
    s_i = exp((1/|y_i|)·Σ_t (log π_θ − log π_old)), used by every token of the sequence in any kind. With
    aggregation "seq_mean_token_mean" this is GSPO's loss (and GSPO-token's while A is per-sequence).

    The per-token ratio is ρ = exp(logps − old_logps); `old_logps` is the policy the loss is centred on.

    Aggregation over the B×T tokens (|y_i| = valid tokens of row i):

        "token_mean":              Σ_i Σ_t ℓ_it / Σ_i |y_i|                 DAPO (§3.3, token-level loss)
        "seq_mean_token_mean":     (1/B)·Σ_i (1/|y_i|)·Σ_t ℓ_it             GRPO (Shao et al. 2024, Eq. 3)
        "seq_mean_token_sum_norm": (1/B)·Σ_i Σ_t ℓ_it / max_len            Dr. GRPO (Liu et al. 2025,
                                                                            arXiv:2503.20783, Eq. 4)
        "seq_mean_token_sum":      (1/B)·Σ_i Σ_t ℓ_it                       LUSPO (arXiv:2602.05261): each
                                   sequence loss weighted by its length, which with GSPO's per-sequence
                                   ratio removes the length bias of the sequence mean

    These equal TRL 1.16's GRPOTrainer loss types "bnpo" (and "dapo", "cispo" on a single process), "grpo"
    (and "sapo"), "dr_grpo" and "luspo" with the KL term off (add β·k3 with `kl_penalty` for that).

    Multipliers of the per-token loss (`losses.masks`; none changes the units):

    - `off_policy_threshold` δ: DeepSeek-V3.2's off-policy sequence mask (arXiv:2512.02556, Eq. 9) drops
      samples with A < 0 whose mean KL(π_behav ‖ π_θ) estimate exceeds δ. `behaviour_logps` are the
      sampler's log-probs (default `old_logps`).
    - `top_entropy_quantile` ρ < 1 with `entropies` [B, T]: train only on the valid tokens in the top ρ
      share of entropy (arXiv:2506.01939; ρ = 0.2). An empty mask selects nothing (loss 0, no error).
    - `is_weights` [B, T] or [B, 1]: sampler/trainer mismatch correction (`masks.importance_weights`).

    `old_logps`, `advantages` and the multipliers are constants (detached here). Masked positions add
    nothing and get a zero gradient, even when their log-probs are ±inf.

    Args:
        logps: [B, T] log-probs of the sampled tokens under the policy being trained (differentiable).
        old_logps: [B, T] log-probs under the policy that sampled them (π_old).
        advantages: [B] (one per completion, broadcast over its tokens) or [B, T].
        mask: [B, T] 1 on completion tokens, 0 on padding.
        **options: clip_low, clip_high (ε_low ∈ [0, 1), ε_high ≥ 0; CISPO's cap > 0), aggregation (one of
            `POLICY_AGGREGATIONS`), dual_clip (c > 1 or None), max_len (Dr. GRPO's constant, default T), kind
            (`POLICY_KINDS`), importance_level (`IMPORTANCE_LEVELS`), delta (> 1 or None), sapo_tau_pos,
            sapo_tau_neg (> 0), off_policy_threshold, behaviour_logps, entropies, top_entropy_quantile,
            entropy_threshold, is_weights: see `policy_loss_sum` and above.

    Returns:
        (loss, metrics): loss is a 0-d tensor with gradient. metrics are detached 0-d tensors:
        clip_fraction (share of tokens whose update was cut: the clipped branch taken for "clip" and
        "sapo"'s reference region, ρ > 1 + ε_high with A > 0 or ρ < 1 − ε_low with A < 0; for "cispo" the
        share of weights capped at ε_max), approx_kl (k3 estimate of KL(π_old ‖ π), per token), ratio_mean
        and ratio_max (of the ratio the loss uses: per token, or per sequence for GSPO), kept_fraction
        (with a mask option: the share of tokens left with a nonzero multiplier). Shares and means are
        weighted like the loss: over tokens for "token_mean", over sequences (of per-sequence token means)
        otherwise.

    Raises:
        ValueError: bad shapes or options, or no unit to average over.
    """
    loss_sum, units, metric_sums = policy_loss_sum(logps, old_logps, advantages, mask, **options)
    if units == 0:
        raise ValueError("policy_loss: the mask holds no valid token, there is nothing to average")
    metrics = {k: v / units for k, v in metric_sums.items()}
    log_ratio_BT = _log_ratio(
        logps.detach(), old_logps.detach(), mask, options.get("importance_level", "token")
    )
    ratio_BT = torch.exp(torch.where(mask.bool(), log_ratio_BT, -math.inf))
    metrics["ratio_max"] = ratio_BT.max()  # exp(−inf) = 0 on padding, below every valid ratio
    return loss_sum / units, metrics


def _log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, importance_level: str) -> Tensor:
    """[B, T] log-ratio, 0 on padding; for "sequence" the row's mean log-ratio on each of its tokens."""
    valid = mask.bool()
    # Zero the log-ratio on padding before exp: padding log-probs may be ±inf, and a NaN there would
    # leak into the gradient through torch.where's backward (0 · NaN = NaN).
    log_ratio_BT = torch.where(valid, logps - old_logps, 0.0)
    if importance_level == "token":
        return log_ratio_BT
    if importance_level != "sequence":
        raise ValueError(unknown("policy loss importance_level", importance_level, IMPORTANCE_LEVELS))
    mean_B1 = log_ratio_BT.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    return torch.where(valid, mean_B1.expand_as(log_ratio_BT), 0.0)


def _check(logps, old_logps, advantages, mask, clip_low, clip_high, dual_clip, kind, delta, taus) -> Tensor:
    """Validate shapes and options; returns advantages as [B, 1] or [B, T]."""
    if logps.dim() != 2 or logps.shape != old_logps.shape or logps.shape != mask.shape:
        shapes = {n: tuple(t.shape) for n, t in (("logps", logps), ("old_logps", old_logps), ("mask", mask))}
        raise ValueError(
            f"policy loss: logps, old_logps and mask must have the same shape [B, T], got {shapes}"
        )
    if advantages.shape == logps.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape not in (logps.shape, (logps.shape[0], 1)):
        raise ValueError(
            f"policy loss: advantages must be [B] or [B, T] = {tuple(logps.shape)}, got {tuple(advantages.shape)}"
        )
    if kind not in POLICY_KINDS:
        raise ValueError(unknown("policy loss kind", kind, POLICY_KINDS))
    if kind == "cispo" and clip_high <= 0:
        raise ValueError(
            f"policy loss 'cispo': clip_high is the ratio cap ε_max and must be > 0, got {clip_high}"
        )
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(
            f"policy loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}"
        )
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"policy loss: dual_clip must be > 1 (it caps the loss at −c·A), got {dual_clip}")
    if delta is not None and delta <= 1:
        raise ValueError(
            f"policy loss: delta (the two-sided clip's cap on the ratio) must be > 1, got {delta}"
        )
    if min(taus) <= 0:
        raise ValueError(f"policy loss 'sapo': temperatures must be > 0, got {taus}")
    return advantages


def _token_loss(
    logps, old_logps, advantages, mask, *, clip_low, clip_high, dual_clip, kind, importance_level, delta,
    sapo_tau_pos, sapo_tau_neg,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Per-token loss [B, T] (not yet masked) and per-token detached diagnostics."""
    advantages = _check(
        logps, old_logps, advantages, mask, clip_low, clip_high, dual_clip, kind, delta,
        (sapo_tau_pos, sapo_tau_neg),
    )  # fmt: skip
    valid = mask.bool()
    dtype = torch.promote_types(logps.dtype, torch.float32)
    advantages = advantages.detach().to(dtype)
    logps = logps.to(dtype)
    log_ratio_BT = _log_ratio(logps, old_logps.detach().to(dtype), mask, importance_level)
    ratio_BT = torch.exp(log_ratio_BT)
    if kind == "clip":
        clipped_ratio_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high)
        capped_BT = ratio_BT if delta is None else ratio_BT.clamp(max=delta)
        loss_BT = -torch.min(capped_BT * advantages, clipped_ratio_BT * advantages)
    elif kind == "cispo":
        # The ratio is a constant weight; the gradient flows through log π only. Padding log-probs may be
        # ±inf: zero them so 0·inf cannot make a NaN.
        weight_BT = ratio_BT.detach().clamp(max=clip_high)
        loss_BT = -weight_BT * advantages * torch.where(valid, logps, 0.0)
    else:  # sapo
        tau = torch.where(advantages > 0, sapo_tau_pos, sapo_tau_neg).to(dtype)
        loss_BT = -torch.sigmoid(tau * (ratio_BT - 1)) * (4 / tau) * advantages
    if dual_clip is not None:
        loss_BT = torch.where(advantages < 0, torch.minimum(loss_BT, -dual_clip * advantages), loss_BT)

    with torch.no_grad():
        ratio = ratio_BT.detach()
        if kind == "cispo":
            clipped = (ratio > clip_high).expand_as(ratio)
        else:
            clipped = ((ratio > 1 + clip_high) & (advantages > 0)) | (
                (ratio < 1 - clip_low) & (advantages < 0)
            )
        token_log_ratio = torch.where(valid, logps.detach() - old_logps.detach().to(dtype), 0.0)
        stats = {
            "clip_fraction": clipped.to(dtype),
            # k3 of KL(π_old ‖ π) on tokens sampled from π_old: log-ratio old − new, (ρ − 1) − log ρ.
            "approx_kl": kl_penalty(torch.zeros_like(ratio), token_log_ratio, estimator="k3"),
            "ratio_mean": ratio,
        }
    return loss_BT, stats


def _keep(
    logps, behaviour_logps, advantages, mask, *, off_policy_threshold, entropies, top_entropy_quantile,
    entropy_threshold, is_weights,
) -> Tensor | None:  # fmt: skip
    """The product of the mask options' multipliers ([B, T], [B, 1] or None when no option is on)."""
    keep = None
    if off_policy_threshold is not None:
        if behaviour_logps.shape != logps.shape:
            raise ValueError(
                f"policy loss: behaviour_logps must be [B, T] = {tuple(logps.shape)}, "
                f"got {tuple(behaviour_logps.shape)}"
            )
        keep = off_policy_mask(logps, behaviour_logps.detach(), advantages, mask, off_policy_threshold)
    if top_entropy_quantile < 1.0 or entropy_threshold is not None:
        if entropies is None or entropies.shape != logps.shape:
            got = None if entropies is None else tuple(entropies.shape)
            raise ValueError(f"policy loss: top-entropy masking needs entropies [B, T], got {got}")
        chosen = high_entropy_mask(entropies, mask, top_entropy_quantile, entropy_threshold).float()
        keep = chosen if keep is None else keep * chosen
    if is_weights is not None:
        if (
            is_weights.dim() != 2
            or is_weights.shape[0] != logps.shape[0]
            or is_weights.shape[1]
            not in (
                1,
                logps.shape[1],
            )
        ):
            raise ValueError(
                f"policy loss: is_weights must be [B, T] or [B, 1] for logps {tuple(logps.shape)}, "
                f"got {tuple(is_weights.shape)}"
            )
        w = is_weights.detach().float()
        keep = w if keep is None else keep * w
    if keep is not None:
        keep = keep.to(torch.promote_types(logps.dtype, torch.float32))
    return keep
