"""Advantage estimators and KL estimators of online RL, as pure functions on tensors.

Shapes: B completions (sequences), T completion tokens (right-padded). `mask` is 1 (or True) on the
completion tokens that count, 0 on padding. Sequence-level estimators (group, leave-one-out,
REINFORCE++) return one advantage per completion, [B]; the policy loss broadcasts it over the tokens.
GAE returns one advantage per token, [B, T].

Group layout: wherever a `group_size` appears, the batch holds consecutive blocks of `group_size`
completions of the same prompt (rows 0..k−1 share prompt 0, rows k..2k−1 prompt 1, ...).

Advantages are targets, not functions of the parameters: every estimator here runs without gradient.
`kl_penalty` is the exception, it is differentiable (used as a reward penalty and as a loss term).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GROUP_SCALES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "gae",
    "group_advantages",
    "kl_penalty",
    "leave_one_out_advantages",
    "reinforce_pp_advantages",
    "whiten",
]

GROUP_SCALES = ("std", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


# ---------------------------------------------------------------------------------------------------------
# GAE (PPO)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the tokens of each completion.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438 (Eqs. 11–16), backwards over the valid tokens t of each row:

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γ·λ·A_{t+1}
        R_t = A_t + V_t                 (the value head's regression target)

    with V and A after the last valid token equal to 0: the completion ends there (terminal state, no
    bootstrap). λ = 1 gives the Monte-Carlo return R_t = Σ_{s≥t} γ^{s−t}·r_s; λ = 0 the one-step TD error.

    Positions where mask is 0 are skipped, and the recursion bridges over them: V_{t+1} and A_{t+1} are
    those of the next *valid* token. So right padding, left padding and masked tokens inside a completion
    (e.g. tool output) all work; rewards and values at masked positions are ignored.

    Args:
        rewards: [B, T] per-token rewards: usually 0 except the sequence reward on the last valid token, plus
            the per-token KL penalty −β·kl_t (see `kl_penalty`).
        values: [B, T] value-head estimates V_t (at the state before token t is emitted).
        mask: [B, T] 1 on completion tokens, 0 elsewhere.
        gamma: discount γ. 1.0 is the usual choice for language (the reward comes once, at the end).
        lam: λ, the bias–variance trade-off (0.95 as in TRL's old PPO trainer and most RLHF PPO setups).

    Returns:
        (advantages_BT, returns_BT): [B, T] each, 0 where mask is 0, no gradient. Computed in at least
        float32. Whitening the advantages (`whiten`) is left to the caller, as in PPO.
    """
    _check_same_shape(2, rewards=rewards, values=values, mask=mask)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values, valid = rewards.to(dtype), values.to(dtype), mask.bool()
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=dtype, device=rewards.device)
    next_adv = torch.zeros(B, dtype=dtype, device=rewards.device)
    # A Python loop over T is what every implementation does (TRL, OpenRLHF, verl); a closed form via a
    # discounted cumulative sum is possible but loses precision for long T when γ·λ < 1.
    for t in reversed(range(T)):
        valid_t = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid_t, adv_t, 0.0)
        next_value = torch.where(valid_t, values[:, t], next_value)
        next_adv = torch.where(valid_t, adv_t, next_adv)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def whiten(
    values: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Masked whitening: (x − mean) / √(var + ε) over the positions where mask is 1.

    The variance is unbiased (Bessel's correction, n − 1), as in TRL's old `masked_whiten` that its PPO
    trainer applied to advantages and rewards. `shift_mean=False` adds the mean back: only the scale
    changes (PPO uses it to whiten rewards without moving their mean).

    Args:
        values: any shape, e.g. [B] or [B, T].
        mask: same shape, or None (all positions count). Needs at least two valid positions.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: ε added to the variance.

    Returns:
        Tensor of the shape of `values`, 0 where mask is 0, no gradient.

    Raises:
        ValueError: fewer than two valid positions (the unbiased variance is undefined).
    """
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    if valid.shape != values.shape:
        raise ValueError(
            f"whiten: mask {tuple(valid.shape)} and values {tuple(values.shape)} differ in shape"
        )
    n = int(valid.sum())  # one host sync; the caller is between rollout and update anyway
    if n < 2:
        raise ValueError(f"whiten needs at least 2 valid values to estimate a variance, got {n}")
    x = torch.where(valid, values, 0.0)
    mean = x.sum() / n
    var = torch.where(valid, values - mean, 0.0).pow(2).sum() / (n - 1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)


# ---------------------------------------------------------------------------------------------------------
# Sequence-level advantages: group-normalised (GRPO), leave-one-out (RLOO), REINFORCE++
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def group_advantages(
    rewards: Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-4, valid: Tensor | None = None
) -> Tensor:
    """Group-relative advantages: each reward minus the mean reward of its group, optionally scaled.

        A_i = (r_i − mean(r_group)) / (s + ε)

    scale:
        "std":   s = std of the group. GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
                 Mathematical Reasoning in Open Language Models", arXiv:2402.03300 (§4.1.2, outcome
                 supervision). TRL's scale_rewards="group".
        "batch": s = std of the whole batch of rewards (TRL's scale_rewards="batch"; the mean is still the
                 group's). Less sensitive to groups whose rewards barely differ.
        "none":  no division (A_i = r_i − mean). Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like
                 Training: A Critical Perspective", arXiv:2503.20783 — dividing by the group std
                 up-weights questions that are too easy or too hard (a difficulty bias).

    The std is the unbiased one (n − 1 in the denominator, torch.std's default) and ε = 1e-4, both as in
    TRL 1.16's GRPOTrainer, so the numbers agree with TRL's. A group whose rewards are all equal gets
    advantage 0 (no learning signal: the caller should log how often that happens). group_size 1 gives
    all zeros, with the std taken as 0 (as TRL).

    `valid` leaves samples out: an agent episode whose sandbox broke says nothing about the policy, and
    kept in its group's mean and std it would shift every other sample's advantage. Means and stds are
    then over the valid samples only (a group with one valid sample has std 0), and invalid samples get
    advantage 0.

    Args:
        rewards: [B] one scalar reward per completion, in groups of `group_size` consecutive rows.
        group_size: completions per prompt (TRL's num_generations). B must be a multiple of it.
        scale: "std", "batch" or "none".
        eps: ε added to the std.
        valid: [B] bool, None for all valid.

    Returns:
        advantages_B: [B], no gradient.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; known: {', '.join(GROUP_SCALES)}")
    if valid is not None:
        return _masked_group_advantages(rewards, group_size, scale, eps, valid)
    grouped_GK = _grouped(rewards, group_size, "group_advantages")
    centred_B = (grouped_GK - grouped_GK.mean(dim=1, keepdim=True)).flatten()
    if scale == "none":
        return centred_B
    if scale == "std":
        std = grouped_GK.std(dim=1, keepdim=True).expand_as(grouped_GK).flatten() if group_size > 1 else 0.0
    else:
        std = rewards.std() if rewards.numel() > 1 else 0.0
    return centred_B / (std + eps)


def _masked_group_advantages(
    rewards: Tensor, group_size: int, scale: str, eps: float, valid: Tensor
) -> Tensor:
    if valid.shape != rewards.shape:
        raise ValueError(
            f"group_advantages: valid {tuple(valid.shape)} does not match rewards {tuple(rewards.shape)}"
        )
    r_GK = _grouped(rewards, group_size, "group_advantages")
    v_GK = valid.view(-1, group_size).to(r_GK.dtype)
    n_G1 = v_GK.sum(1, keepdim=True)
    mean_G1 = (r_GK * v_GK).sum(1, keepdim=True) / n_G1.clamp(min=1)
    centred_GK = (r_GK - mean_G1) * v_GK
    if scale == "none":
        return centred_GK.flatten()
    if scale == "std":  # unbiased, over the valid samples of the group
        std = ((centred_GK**2).sum(1, keepdim=True) / (n_G1 - 1).clamp(min=1)).sqrt()
    else:
        kept = rewards[valid.bool()]
        std = kept.std() if kept.numel() > 1 else rewards.new_zeros(())
    return (centred_GK / (std + eps)).flatten()


@torch.no_grad()
def leave_one_out_advantages(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """RLOO advantages: each reward minus the mean reward of the *other* completions of its prompt.

        A_i = r_i − (1/(k−1))·Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean(r_group))

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv:2402.14740 (Eq. 4), after Kool et al. 2019 ("Buy 4 REINFORCE samples, get a
    baseline for free!"). The baseline does not depend on r_i, so the gradient estimate stays unbiased.

    Args:
        rewards: [B] one scalar reward per completion, in groups of `group_size` consecutive rows.
        group_size: k ≥ 2, completions per prompt. B must be a multiple of it.
        valid: [B] bool, None for all valid. Invalid samples (an agent episode whose sandbox broke) are
            nobody's baseline and get advantage 0; a valid sample's baseline is the mean of the other
            valid samples of its group (advantage 0 when it has none).

    Returns:
        advantages_B: [B], no gradient.
    """
    if group_size < 2:
        raise ValueError(f"leave_one_out_advantages needs group_size >= 2 (k − 1 others), got {group_size}")
    grouped_GK = _grouped(rewards, group_size, "leave_one_out_advantages")
    if valid is not None:
        if valid.shape != rewards.shape:
            raise ValueError(
                f"leave_one_out_advantages: valid {tuple(valid.shape)} does not match rewards {tuple(rewards.shape)}"
            )
        v_GK = valid.view(-1, group_size).to(grouped_GK.dtype)
        others_n_GK = v_GK.sum(1, keepdim=True) - v_GK
        others_GK = ((grouped_GK * v_GK).sum(1, keepdim=True) - grouped_GK * v_GK) / others_n_GK.clamp(min=1)
        return ((grouped_GK - others_GK) * v_GK * (others_n_GK > 0)).flatten()
    others_GK = (grouped_GK.sum(dim=1, keepdim=True) - grouped_GK) / (group_size - 1)
    return (grouped_GK - others_GK).flatten()


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    group_size: int | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++: returns normalised across the whole batch (no critic, no per-prompt baseline).

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
    arXiv:2501.03262. With γ = 1 the return of token t is the sequence reward minus the KL penalty still
    ahead, and the advantage is that return whitened over the global batch:

        G_t = r' − β·Σ_{s≥t} kl_s          A_t = (G_t − mean_batch(G)) / √(var_batch(G) + ε)

    REINFORCE++-baseline (the paper's variant for several samples per prompt, `group_size` given) first
    subtracts the group mean: r' = r − mean(r_group); otherwise r' = r.

    Without `mask` this works per sequence: A_i = whiten(r')_i over the B completions, [B]. With `mask`
    it works per token, [B, T], whitening over all valid tokens of the batch (as OpenRLHF does), so that
    long completions weigh more in the mean and variance. The variance is unbiased (see `whiten`).

    Args:
        rewards: [B] one scalar reward per completion.
        mask: [B, T] completion mask; required with `kl`.
        kl: [B, T] per-token KL estimate to the reference policy (e.g. `kl_penalty(..., estimator="k1")`,
            the paper's choice); positions where mask is 0 are ignored.
        kl_coef: β.
        group_size: None for REINFORCE++; k for REINFORCE++-baseline (groups of k consecutive rows).
        eps: ε added to the variance.

    Returns:
        advantages: [B] without mask, [B, T] with it (0 where mask is 0). No gradient.
    """
    if rewards.dim() != 1:
        raise ValueError(f"reinforce_pp_advantages: rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size is not None:
        grouped_GK = _grouped(rewards, group_size, "reinforce_pp_advantages")
        rewards = (grouped_GK - grouped_GK.mean(dim=1, keepdim=True)).flatten()
    if mask is None:
        if kl is not None:
            raise ValueError("reinforce_pp_advantages: a per-token kl needs the completion mask")
        return whiten(rewards, eps=eps)
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"reinforce_pp_advantages: mask must be [B, T] with B = {rewards.shape[0]}")
    valid = mask.bool()
    returns_BT = rewards[:, None].expand(mask.shape).to(torch.promote_types(rewards.dtype, torch.float32))
    if kl is not None:
        _check_same_shape(2, kl=kl, mask=mask)
        kl_BT = torch.where(valid, kl, 0.0)
        kl_to_go_BT = kl_BT.flip(1).cumsum(1).flip(1)  # Σ_{s≥t} kl_s
        returns_BT = returns_BT - kl_coef * kl_to_go_BT
    return whiten(returns_BT, valid, eps=eps)


def _grouped(rewards: Tensor, group_size: int, fn: str) -> Tensor:
    """[B] → [B/k, k], with the checks every group estimator needs."""
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{fn}: the batch of {rewards.numel()} rewards does not split into groups of {group_size} "
            "(B must be a multiple of group_size, with each prompt's completions in consecutive rows)"
        )
    return rewards.view(-1, group_size)


# ---------------------------------------------------------------------------------------------------------
# KL estimators and KL coefficient controllers
# ---------------------------------------------------------------------------------------------------------


def kl_penalty(logps: Tensor, ref_logps: Tensor, *, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html. With the log-ratio
    l = log π(y_t) − log π_ref(y_t) and ρ = π_ref/π = exp(−l):

        "k1":  l                         unbiased, high variance, can be negative
        "k2":  ½·l²                      biased (low for small KL), low variance, ≥ 0
        "k3":  (ρ − 1) − log ρ = exp(−l) − 1 + l     unbiased, low variance, ≥ 0
        "abs": |l|                       TRL's old PPO "abs" penalty

    k3 is the estimator of GRPO's KL term (DeepSeekMath, Eq. 4) and of TRL's GRPOTrainer; k1 is the
    classic per-token reward penalty of RLHF PPO (Ziegler et al. 2019, Ouyang et al. 2022). k3 is written
    with expm1, which is exact near l = 0 and never negative. exp(−l) overflows float32 for l < −88.

    Args:
        logps: [B, T] log-probs of the sampled tokens under the policy (differentiable).
        ref_logps: [B, T] log-probs of the same tokens under the reference policy.
        estimator: "k1", "k2", "k3" or "abs".

    Returns:
        kl_BT: [B, T], differentiable; padding positions are not masked (multiply by the mask).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"kl_penalty: logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ"
        )
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio.abs()


class FixedKLController:
    """A constant KL coefficient β, with the interface of `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient β that steers the measured KL towards a target (proportional control).

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593 (§2.2),
    as in TRL's former PPO trainer:

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    n_steps is the number of samples (episodes) since the last update and horizon how many samples it
    takes to close the gap (10,000 in the paper).

    Args:
        init_kl_coef: the starting β.
        target: KL_target, in the units of the KL passed to `update` (usually the summed per-sequence KL).
        horizon: samples over which β adapts.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: the measured KL is {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Only β changes during training; target and horizon come from the config."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def _check_same_shape(ndim: int, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != ndim or any(s != first for s in shapes.values()):
        dims = "[B, T]" if ndim == 2 else "[B]"
        raise ValueError(f"expected tensors of the same shape {dims}, got {shapes}")
