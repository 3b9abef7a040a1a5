"""Clipped policy loss and value loss: hand-computed numbers, gradients, masks, micro-batch sums, and TRL.

The main hand example: two completions, ratios ρ = exp(logps − old_logps) chosen directly,

    row 0, A = +1:  ρ = 1.1 (inside), 1.5 (above 1 + ε: clipped), 0.5 (below 1 − ε: not clipped for A > 0)
    row 1, A = −2:  ρ = 0.7 (below 1 − ε: clipped for A < 0), 1.3 (above: not clipped for A < 0), padding

With ε = 0.2 the per-token losses −min(ρA, clip(ρ)A) are row 0: −1.1, −1.2, −0.5; row 1: 1.6, 2.6.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.advantages import kl_penalty
from posttrain.losses import (
    POLICY_AGGREGATIONS,
    loss_units,
    policy_loss,
    policy_loss_sum,
    value_loss,
    value_loss_sum,
)

RATIOS = [[1.1, 1.5, 0.5], [0.7, 1.3, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]


def example(pad_logp: float = 0.0, pad_old: float = -1000.0):
    """(logps [leaf, requires grad], old_logps, advantages, mask) of the hand example. The padding token
    gets a wild log-ratio (here exp(1000) = inf) that must not touch the loss or the gradient."""
    ratios = torch.tensor(RATIOS, dtype=torch.float64)
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logps = old + ratios.log()
    logps[1, 2], old[1, 2] = pad_logp, pad_old
    return logps.requires_grad_(), old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK)


def close(actual, expected, tol: float = 1e-9) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


def k3(r: float) -> float:
    """k3 estimate of KL(π_old ‖ π) from ρ = π/π_old: (ρ − 1) − log ρ."""
    return r - 1 - math.log(r)


VALID = [1.1, 1.5, 0.5, 0.7, 1.3]  # the valid ratios, row 0 then row 1


# ---------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------


def test_token_mean_by_hand():
    logps, old, adv, mask = example()
    loss, m = policy_loss(logps, old, adv, mask, aggregation="token_mean")
    close(loss, (-1.1 - 1.2 - 0.5 + 1.6 + 2.6) / 5)  # 1.4 / 5 = 0.28
    close(m["clip_fraction"], 2 / 5)  # 1.5 with A > 0, 0.7 with A < 0
    close(m["ratio_mean"], sum(VALID) / 5)  # 1.02
    close(m["ratio_max"], 1.5)
    close(m["approx_kl"], sum(k3(r) for r in VALID) / 5)
    assert all(not v.requires_grad for v in m.values())


def test_seq_mean_token_mean_by_hand():
    logps, old, adv, mask = example()
    loss, m = policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_mean")
    close(loss, ((-1.1 - 1.2 - 0.5) / 3 + (1.6 + 2.6) / 2) / 2)  # (−0.9333 + 2.1) / 2 = 0.58333
    close(m["clip_fraction"], (1 / 3 + 1 / 2) / 2)  # per-sequence shares, averaged over sequences
    close(m["ratio_mean"], ((1.1 + 1.5 + 0.5) / 3 + (0.7 + 1.3) / 2) / 2)
    close(m["approx_kl"], ((k3(1.1) + k3(1.5) + k3(0.5)) / 3 + (k3(0.7) + k3(1.3)) / 2) / 2)


def test_seq_mean_token_sum_norm_by_hand():
    logps, old, adv, mask = example()
    loss, m = policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum_norm", max_len=4)
    close(loss, ((-1.1 - 1.2 - 0.5) / 4 + (1.6 + 2.6) / 4) / 2)  # (−0.7 + 1.05) / 2 = 0.175
    close(m["clip_fraction"], (1 / 3 + 1 / 2) / 2)  # a share of tokens, not divided by max_len
    loss_default, _ = policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum_norm")
    close(loss_default, ((-2.8) / 3 + 4.2 / 3) / 2)  # max_len defaults to T = 3


def test_clip_higher_is_asymmetric():
    """DAPO: ε_high = 0.6 lets ρ = 1.5 with A > 0 through; ε_low = 0.2 still clips ρ = 0.7 with A < 0."""
    logps, old, adv, mask = example()
    loss, m = policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.6)
    close(loss, (-1.1 - 1.5 - 0.5 + 1.6 + 2.6) / 5)  # 1.1 / 5 = 0.22
    close(m["clip_fraction"], 1 / 5)
    # and the other way round: a wide low side leaves 0.7 alone, 1.5 is clipped at 1.2
    loss, m = policy_loss(logps, old, adv, mask, clip_low=0.5, clip_high=0.2)
    close(loss, (-1.1 - 1.2 - 0.5 + 1.4 + 2.6) / 5)
    close(m["clip_fraction"], 1 / 5)


def test_dual_clip_caps_negative_advantage_loss():
    """Dual clip c = 1.2: where A = −2 the loss is capped at −c·A = 2.4; ρ = 1.3 had 2.6."""
    logps, old, adv, mask = example()
    loss, _ = policy_loss(logps, old, adv, mask, dual_clip=1.2)
    close(loss, (-1.1 - 1.2 - 0.5 + 1.6 + 2.4) / 5)  # 1.2 / 5 = 0.24
    loss.backward()
    assert logps.grad[1, 1] == 0  # the capped token gets no gradient
    # positive advantages are never dual-clipped
    pos = torch.tensor([1.0, 2.0], dtype=torch.float64)
    plain, _ = policy_loss(logps, old, pos, mask)
    capped, _ = policy_loss(logps, old, pos, mask, dual_clip=1.01)
    close(plain, capped)


def test_on_policy_loss_is_vanilla_policy_gradient():
    """With ρ = 1 (the first update on fresh samples) nothing is clipped and the gradient of token t is
    −A_t / units: REINFORCE with the advantage as weight."""
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -7.0]], dtype=torch.float64)
    logps = old.clone().requires_grad_()
    adv, mask = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor(MASK)
    loss, m = policy_loss(logps, old, adv, mask)
    close(loss, (-1 * 3 + 2 * 2) / 5)
    close(m["clip_fraction"], 0.0)
    close(m["approx_kl"], 0.0)
    loss.backward()
    close(logps.grad, [[-1 / 5, -1 / 5, -1 / 5], [2 / 5, 2 / 5, 0.0]])


# ---------------------------------------------------------------------------------------------------------
# Gradients and masks
# ---------------------------------------------------------------------------------------------------------


def test_gradient_by_hand_and_zero_on_padding():
    """d(−ρA)/d logp = −ρA on unclipped tokens, 0 on clipped ones and on padding (whose log-ratio is inf)."""
    logps, old, adv, mask = example()
    loss, _ = policy_loss(logps, old, adv, mask)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    close(logps.grad, [[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 2 * 1.3 / 5, 0.0]])


@pytest.mark.parametrize("aggregation", POLICY_AGGREGATIONS)
@pytest.mark.parametrize("pad", [(0.0, -1000.0), (-math.inf, -math.inf), (math.nan, 0.0)])
def test_padding_never_leaks(aggregation, pad):
    logps, old, adv, mask = example(*pad)
    loss, m = policy_loss(logps, old, adv, mask, aggregation=aggregation, max_len=3)
    clean_logps, clean_old, _, _ = example()
    expected, expected_m = policy_loss(clean_logps, clean_old, adv, mask, aggregation=aggregation, max_len=3)
    close(loss, expected)
    for k in expected_m:
        close(m[k], expected_m[k])
    loss.backward()
    assert torch.isfinite(logps.grad).all() and logps.grad[1, 2] == 0


@pytest.mark.parametrize("aggregation", POLICY_AGGREGATIONS)
def test_extra_padding_columns_change_nothing(aggregation):
    logps, old, adv, mask = example()
    wide = [torch.nn.functional.pad(x.detach(), (0, 4)) for x in (logps, old, mask)]
    a, _ = policy_loss(logps, old, adv, mask, aggregation=aggregation, max_len=8)
    b, _ = policy_loss(*wide[:2], adv, wide[2], aggregation=aggregation, max_len=8)
    close(a, b)


def test_token_advantages_broadcast_like_sequence_advantages():
    logps, old, adv, mask = example()
    adv_BT = adv[:, None].expand(2, 3).clone()
    for aggregation in POLICY_AGGREGATIONS:
        a, _ = policy_loss(logps, old, adv, mask, aggregation=aggregation)
        b, _ = policy_loss(logps, old, adv_BT, mask, aggregation=aggregation)
        close(a, b)
    # per-token advantages of different signs within a row: token 1 of row 0 flips to A = −1
    adv_BT[0, 1] = -1.0  # ρ = 1.5, A < 0: −min(−1.5, −1.2) = 1.5, not clipped
    loss, m = policy_loss(logps, old, adv_BT, mask)
    close(loss, (-1.1 + 1.5 - 0.5 + 1.6 + 2.6) / 5)
    close(m["clip_fraction"], 1 / 5)


def test_loss_units():
    mask = torch.tensor(MASK)
    assert loss_units(mask, "token_mean") == 5.0
    assert loss_units(mask, "seq_mean_token_mean") == 2.0
    assert loss_units(mask, "seq_mean_token_sum_norm") == 2.0
    # a row without tokens still counts as a sequence (as in TRL), and adds 0
    empty = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert loss_units(empty, "seq_mean_token_mean") == 2.0
    logps, old, adv, _ = example()
    loss, _ = policy_loss(logps, old, adv, empty, aggregation="seq_mean_token_mean")
    close(loss, (-1.1 - 1.2) / 2 / 2)


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: sums over the parts / total units == the mean over the whole batch
# ---------------------------------------------------------------------------------------------------------


def random_batch(seed: int, B: int = 7, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])[:B]
    mask = (torch.arange(T) < lengths[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, adv, mask


@pytest.mark.parametrize("aggregation", POLICY_AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_micro_batch_sums_equal_full_batch(aggregation, dual_clip):
    logps, old, adv, mask = random_batch(0)
    opts = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, dual_clip=dual_clip, max_len=6)

    full_logps = logps.clone().requires_grad_()
    loss, metrics = policy_loss(full_logps, old, adv, mask, **opts)
    loss.backward()

    micro_logps = logps.clone().requires_grad_()
    parts = [(0, 2), (2, 3), (3, 7)]
    terms = []
    for lo, hi in parts:
        T = max(int(mask[lo:hi].sum(dim=1).max()), 1)  # each micro-batch cut to its own padding
        terms.append(
            policy_loss_sum(micro_logps[lo:hi, :T], old[lo:hi, :T], adv[lo:hi], mask[lo:hi, :T], **opts)
        )
    units = sum(u for _, u, _ in terms)
    assert units == loss_units(mask, aggregation)
    for loss_sum, _, _ in terms:
        (loss_sum / units).backward()  # what the loop does
    close(sum(s for s, _, _ in terms).detach() / units, loss.detach(), tol=1e-12)
    close(micro_logps.grad, full_logps.grad, tol=1e-12)
    for name in ("clip_fraction", "approx_kl", "ratio_mean"):
        close(sum(ms[name] for _, _, ms in terms) / units, metrics[name], tol=1e-12)


def test_value_loss_micro_batch_sums_equal_full_batch():
    g = torch.Generator().manual_seed(1)
    values, noise, returns = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    old = values + 0.3 * noise  # some tokens move more than the clip (0.2), some less
    mask = (torch.arange(4) < torch.tensor([4, 2, 1, 3, 4])[:, None]).long()
    full = value_loss(values, old, returns, mask, clip=0.2)
    terms = [value_loss_sum(values[s], old[s], returns[s], mask[s]) for s in (slice(0, 2), slice(2, 5))]
    close(sum(s for s, _, _ in terms) / sum(u for _, u, _ in terms), full, tol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Value loss
# ---------------------------------------------------------------------------------------------------------


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 7.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.5, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    # token 0: clip(1.0, 0.3, 0.7) = 0.7; max((1 − 1.5)², (0.7 − 1.5)²) = max(.25, .64) → clipped, .64
    # token 1: clip(0.0, 0.8, 1.2) = 0.8; max((0 − .5)², (.8 − .5)²) = max(.25, .09) → unclipped, .25
    loss = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.5 * (0.64 + 0.25) / 2)
    loss.backward()
    # d/dV ½(V − R)² / 2 tokens = (V − R)/2 on the unclipped token; 0 on the clipped one and on padding
    close(values.grad, [[0.0, (0.0 - 0.5) / 2, 0.0]])
    _, units, m = value_loss_sum(values, old, returns, mask, clip=0.2)
    assert units == 2.0 and m["clip_fraction"] == 1.0
    close(value_loss(values, old, returns, mask, clip=None), 0.5 * (0.25 + 0.25) / 2)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_policy_loss_errors():
    logps, old, adv, mask = example()
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(logps, old, adv, mask, aggregation="seq_mean")
    with pytest.raises(ValueError, match="same shape"):
        policy_loss(logps, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv[:1], mask)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logps, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logps, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum_norm", max_len=0)
    with pytest.raises(ValueError, match="no valid token"):
        policy_loss(logps, old, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="same shape"):
        value_loss(logps, old, old[:1], mask)


# ---------------------------------------------------------------------------------------------------------
# TRL 1.16: GRPOTrainer._compute_loss on a stub trainer (no model: the per-token log-probs are given)
# ---------------------------------------------------------------------------------------------------------

TRL_LOSS_TYPES = {
    "token_mean": "bnpo",
    "seq_mean_token_mean": "grpo",
    "seq_mean_token_sum_norm": "dr_grpo",
    "seq_mean_token_sum": "luspo",
}


def trl_grpo(loss_type, logps, old, adv, mask, *, eps_low, eps_high, max_len, ref=None, beta=0.0):
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logps.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x, num_processes=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("aggregation", POLICY_AGGREGATIONS)
@pytest.mark.parametrize("clip_high", [0.2, 0.28])
def test_policy_loss_matches_trl_grpo(aggregation, clip_high):
    for seed in (0, 1):
        logps, old, adv, mask = random_batch(seed)
        theirs, trl_metrics = trl_grpo(
            TRL_LOSS_TYPES[aggregation], logps, old, adv, mask, eps_low=0.2, eps_high=clip_high, max_len=9
        )
        ours, metrics = policy_loss(
            logps, old, adv, mask, clip_high=clip_high, aggregation=aggregation, max_len=9
        )
        close(ours, theirs, tol=1e-12)
        if aggregation == "token_mean":  # TRL's clip ratio is always a token mean
            close(metrics["clip_fraction"], trl_metrics["clip_ratio/region_mean"][0], tol=1e-6)


def test_k3_matches_trl_grpo_kl():
    logps, old, adv, mask = random_batch(2)
    ref = old + 0.3 * torch.sin(torch.arange(old.numel(), dtype=torch.float64)).view_as(old)
    _, trl_metrics = trl_grpo(
        "bnpo", logps, old, adv, mask, eps_low=0.2, eps_high=0.2, max_len=6, ref=ref, beta=0.1
    )
    ours = (kl_penalty(logps, ref, estimator="k3") * mask).sum() / mask.sum()
    close(ours, trl_metrics["kl"][0], tol=1e-6)
