"""Advantage estimators, whitening, KL estimators and KL controllers, against numbers worked out by hand.

Each expected value is written as the arithmetic that produces it, so a reader can check it on paper.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalty,
    leave_one_out_advantages,
    reinforce_pp_advantages,
    whiten,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


def test_gae_by_hand():
    # One completion of 3 tokens, reward 1 on the last; γ = 0.9, λ = 0.8 (γλ = 0.72).
    rewards, values, mask = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    a2 = 1 + 0.9 * 0 - 0.7  # terminal: V after the last token is 0 → 0.3
    a1 = (0 + 0.9 * 0.7 - 0.6) + 0.72 * a2  # 0.03 + 0.216 = 0.246
    a0 = (0 + 0.9 * 0.6 - 0.5) + 0.72 * a1  # 0.04 + 0.17712 = 0.21712
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[a0, a1, a2]])
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.7]])


def test_gae_lambda_one_is_monte_carlo_and_lambda_zero_is_td():
    rewards, values, mask = t([0.5, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    _, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    # R_t = Σ_{s≥t} γ^{s−t} r_s
    close(ret, [[0.5 + 0.9 * 0.0 + 0.81 * 1.0, 0.0 + 0.9 * 1.0, 1.0]])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv, [[0.5 + 0.9 * 0.6 - 0.5, 0.0 + 0.9 * 0.7 - 0.6, 1.0 - 0.7]])


def test_gae_skips_masked_positions_and_zeroes_them():
    # Row 0: right padding. Row 1: left padding and a masked token inside (e.g. tool output).
    # Garbage rewards/values at masked positions must be ignored.
    rewards = t([0.0, 1.0, 5.0, 5.0], [5.0, 0.0, 5.0, 1.0])
    values = t([0.5, 0.7, 9.0, 9.0], [9.0, 0.5, 9.0, 0.7])
    mask = t([1, 1, 0, 0], [0, 1, 0, 1])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    last = 1.0 - 0.7  # 0.3
    first = (0.0 + 0.9 * 0.7 - 0.5) + 0.72 * last  # 0.13 + 0.216 = 0.346
    close(adv, [[first, last, 0, 0], [0, first, 0, last]])
    close(ret, [[first + 0.5, last + 0.7, 0, 0], [0, first + 0.5, 0, last + 0.7]])


def naive_gae(rewards, values, mask, gamma, lam):
    """One row at a time, on the list of valid positions only, in plain Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [i for i in range(T) if mask[b][i]]
        a_next, v_next = 0.0, 0.0
        for i in reversed(idx):
            a_next = rewards[b][i] + gamma * v_next - values[b][i] + gamma * lam * a_next
            v_next = values[b][i]
            adv[b][i] = a_next
    return adv


def test_gae_matches_naive_loop_on_random_batch():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 0  # an empty row
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    expected = naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.97, 0.9)
    close(adv, expected)
    close(ret, (torch.tensor(expected, dtype=torch.float64) + values) * mask)


def test_gae_has_no_gradient_and_upcasts_half_precision():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad
    adv16, _ = gae(
        torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16), values.detach().bfloat16(), torch.ones(1, 2)
    )
    assert adv16.dtype == torch.float32


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------------------


def test_whiten_by_hand_with_mask():
    values = t([1.0, 2.0, 100.0], [3.0, 4.0, 100.0])
    mask = t([1, 1, 0], [1, 1, 0])
    mean = (1 + 2 + 3 + 4) / 4  # 2.5
    var = ((1.5**2 + 0.5**2) * 2) / 3  # unbiased: 5 / 3
    eps = 1e-8
    s = math.sqrt(var + eps)
    close(whiten(values, mask), [[-1.5 / s, -0.5 / s, 0], [0.5 / s, 1.5 / s, 0]])
    close(
        whiten(values, mask, shift_mean=False),
        [[-1.5 / s + mean, -0.5 / s + mean, 0], [0.5 / s + mean, 1.5 / s + mean, 0]],
    )
    close(whiten(t(1.0, 3.0)), [-1 / math.sqrt(2 + eps), 1 / math.sqrt(2 + eps)])


def test_whiten_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        whiten(t([1.0, 2.0]), t([1, 0]))


# ---------------------------------------------------------------------------------------------------------
# Group-normalised (GRPO, Dr. GRPO), leave-one-out (RLOO)
# ---------------------------------------------------------------------------------------------------------

REWARDS = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # two groups of 4: [1, 0, 0, 1 | 1, 1, 1, 1]


def test_group_advantages_std_by_hand():
    # Group 1: mean 0.5, unbiased var = 4 · 0.5² / 3 = 1/3. Group 2: all equal → 0.
    std = math.sqrt(1 / 3)
    a = 0.5 / (std + 1e-4)
    close(group_advantages(REWARDS, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_group_advantages_none_is_dr_grpo():
    close(group_advantages(REWARDS, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_advantages_batch_scale_by_hand():
    # Mean of the group, std of the batch: batch mean 0.75, Σ(r − 0.75)² = 6 · 0.25² + 2 · 0.75² = 1.5.
    std = math.sqrt(1.5 / 7)
    a = 0.5 / (std + 1e-4)
    close(group_advantages(REWARDS, 4, scale="batch"), [a, -a, -a, a, 0, 0, 0, 0])


def test_group_advantages_edge_cases():
    close(group_advantages(t(3.0, -1.0), 1), [0.0, 0.0])  # one completion per prompt: no signal
    close(group_advantages(t(2.0, 4.0), 2, eps=0.0), [-1 / math.sqrt(2), 1 / math.sqrt(2)])
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(REWARDS, 4, scale="group")
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(REWARDS.view(2, 4), 4)


def test_group_advantages_std_is_trls():
    """TRL 1.16's GRPOTrainer divides by its `nanstd` (Bessel-corrected) + 1e-4: the same numbers."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 2.0, 1.0, 1.5, 0.2, 0.0])
    grouped = rewards.view(3, 3)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    trl_std = nanstd(grouped, dim=1).repeat_interleave(3)
    close(group_advantages(rewards, 3), centred / (trl_std + 1e-4), tol=1e-6)
    close(group_advantages(rewards, 3, scale="batch"), centred / (nanstd(rewards) + 1e-4), tol=1e-6)


def test_leave_one_out_by_hand():
    # [1, 0, 0, 1]: 1 − (0 + 0 + 1)/3 = 2/3, 0 − (1 + 0 + 1)/3 = −2/3. [3, 1, 2] below.
    close(leave_one_out_advantages(REWARDS, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    close(leave_one_out_advantages(t(3.0, 1.0, 2.0), 3), [3 - 1.5, 1 - 2.5, 2 - 2.0])
    # k/(k−1) times the group-mean-centred reward
    close(leave_one_out_advantages(REWARDS, 4), group_advantages(REWARDS, 4, scale="none") * 4 / 3)


def test_leave_one_out_needs_two_per_group():
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="multiple"):
        leave_one_out_advantages(REWARDS, 3)


# ---------------------------------------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------------------------------------


def test_reinforce_pp_sequence_level_by_hand():
    rewards = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    # Mean 4/6 = 2/3; unbiased var = (4 · (1/3)² + 2 · (2/3)²) / 5 = (12/9) / 5 = 4/15.
    s = math.sqrt(4 / 15 + 1e-8)
    close(reinforce_pp_advantages(rewards), [(r - 2 / 3) / s for r in rewards.tolist()])


def test_reinforce_pp_baseline_subtracts_group_mean_first():
    rewards = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    # Groups of 2: [1, 0 | 0, 1 | 1, 1] → centred [.5, −.5, −.5, .5, 0, 0]; mean 0, var = 4 · .25 / 5 = 0.2.
    s = math.sqrt(0.2 + 1e-8)
    close(reinforce_pp_advantages(rewards, group_size=2), [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0])


def test_reinforce_pp_token_level_with_kl_by_hand():
    rewards = t(1.0, 0.0)
    mask = t([1, 1, 0], [1, 1, 1])
    kl = t([0.1, 0.2, 9.0], [0.0, 0.3, 0.1])  # 9.0 sits on padding: ignored
    # Returns-to-go with β = 0.5: G_t = r − 0.5 · Σ_{s≥t} kl_s.
    g = [1 - 0.5 * 0.3, 1 - 0.5 * 0.2, 0 - 0.5 * 0.4, 0 - 0.5 * 0.4, 0 - 0.5 * 0.1]  # .85 .9 −.2 −.2 −.05
    mean = sum(g) / 5  # 0.26
    s = math.sqrt(sum((x - mean) ** 2 for x in g) / 4 + 1e-8)
    w = [(x - mean) / s for x in g]
    out = reinforce_pp_advantages(rewards, mask, kl=kl, kl_coef=0.5)
    close(out, [[w[0], w[1], 0.0], [w[2], w[3], w[4]]])


def test_reinforce_pp_rejects_kl_without_mask():
    with pytest.raises(ValueError, match="mask"):
        reinforce_pp_advantages(t(1.0, 0.0), kl=t([0.1], [0.2]), kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logps = t([-1.0, -2.0, -3.0])
    ref = t([-1.5, -2.0, -2.5])  # log-ratios l = 0.5, 0, −0.5
    close(kl_penalty(logps, ref, estimator="k1"), [[0.5, 0.0, -0.5]])
    close(kl_penalty(logps, ref, estimator="k2"), [[0.125, 0.0, 0.125]])
    # k3 = exp(−l) − 1 + l
    close(kl_penalty(logps, ref, estimator="k3"), [[math.exp(-0.5) - 0.5, 0.0, math.exp(0.5) - 1.5]])
    close(kl_penalty(logps, ref, estimator="k3"), [[0.10653065971263342, 0.0, 0.14872127070012819]])
    close(kl_penalty(logps, ref, estimator="abs"), [[0.5, 0.0, 0.5]])


def test_k3_is_never_negative_even_near_zero():
    log_ratio = torch.cat([torch.linspace(-5, 5, 1001), torch.tensor([1e-9, -1e-9, 1e-20, 3e-8])])
    for dtype in (torch.float32, torch.float64):
        k3 = kl_penalty(log_ratio.to(dtype), torch.zeros_like(log_ratio, dtype=dtype), estimator="k3")
        assert (k3 >= 0).all()


def test_k1_and_k3_are_unbiased_estimators_of_kl():
    """Over a categorical distribution, E_p[k] = Σ_x p(x)·k(x) must equal KL(p‖q) exactly for k1 and k3."""
    p = t(0.1, 0.2, 0.3, 0.4)
    q = t(0.25, 0.25, 0.4, 0.1)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for estimator in ("k1", "k3"):
        close((p * kl_penalty(p.log(), q.log(), estimator=estimator)).sum(), kl, tol=1e-12)


def test_kl_penalty_is_differentiable():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    kl_penalty(logps, torch.tensor([[-1.5, -2.0]]), estimator="k3").sum().backward()
    # d/dl (exp(−l) − 1 + l) = 1 − exp(−l)
    close(logps.grad, [[1 - math.exp(-0.5), 0.0]], tol=1e-6)


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="unknown estimator"):
        kl_penalty(t([0.0]), t([0.0]), estimator="k4")


# ---------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=256)  # error = clip(12/6 − 1 = 1, ±0.2) = 0.2; × (1 + 0.2 · 256/10000)
    assert ctl.value == pytest.approx(0.2 * 1.00512)
    ctl.update(5.4, n_steps=100)  # error = 5.4/6 − 1 = −0.1; × (1 − 0.1 · 100/10000) = × 0.999
    assert ctl.value == pytest.approx(0.2 * 1.00512 * 0.999)
    ctl.update(6.0, n_steps=100)  # on target: unchanged
    assert ctl.value == pytest.approx(0.2 * 1.00512 * 0.999)


def test_kl_controllers_checkpoint_round_trip():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(0.0, n_steps=50)  # error −0.2 (clipped from −1): × 0.9
    assert ctl.value == pytest.approx(0.09)
    fresh = AdaptiveKLController(0.1, target=1.0, horizon=100)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=10**6)
    assert fixed.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="measured KL"):
        ctl.update(float("nan"), n_steps=1)


def test_random_rewards_keep_group_means_at_zero():
    rng = random.Random(0)
    rewards = torch.tensor([rng.random() for _ in range(24)], dtype=torch.float64)
    for scale in ("std", "batch", "none"):
        adv = group_advantages(rewards, 6, scale=scale)
        close(adv.view(4, 6).sum(dim=1), [0.0] * 4, tol=1e-12)
    close(leave_one_out_advantages(rewards, 6).view(4, 6).sum(dim=1), [0.0] * 4, tol=1e-12)
