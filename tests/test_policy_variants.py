"""Policy-loss variants (CISPO, SAPO, GSPO, LUSPO, two-sided clip, off-policy sequence mask, top-entropy
tokens, sampler-mismatch importance weights): hand-computed numbers, micro-batch sums, and TRL 1.16.

The hand example is the one of test_policy_loss.py: ratios ρ = exp(logps − old_logps) chosen directly,
old_logps = −1 everywhere, so logps = −1 + log ρ:

    row 0, A = +1:  ρ = 1.1, 1.5, 0.5
    row 1, A = −2:  ρ = 0.7, 1.3, padding
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses import (
    entropy_threshold,
    importance_weights,
    loss_units,
    off_policy_mask,
    policy_loss,
    policy_loss_sum,
)
from tests.test_policy_loss import ADV, RATIOS, close, example, random_batch


def logp(r: float) -> float:
    return -1 + math.log(r)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------


def test_cispo_by_hand():
    """ℓ = −min(ρ, ε_max)·A·log π with ε_max = 1.2; the weight is a constant, so ∂ℓ/∂log π = −min(ρ, ε_max)·A
    on every token, the capped ones included (unlike PPO's clip, which zeroes their gradient)."""
    logps, old, adv, mask = example()
    loss, m = policy_loss(logps, old, adv, mask, kind="cispo", clip_high=1.2)
    weights = [[1.1, 1.2, 0.5], [0.7, 1.2]]
    expected = sum(
        -w * ADV[i] * logp(RATIOS[i][t]) for i, row in enumerate(weights) for t, w in enumerate(row)
    )
    close(loss, expected / 5)
    close(m["clip_fraction"], 2 / 5)  # 1.5 and 1.3 are above the cap
    loss.backward()
    close(logps.grad, [[-1.1 / 5, -1.2 / 5, -0.5 / 5], [1.4 / 5, 2.4 / 5, 0.0]])
    assert torch.isfinite(logps.grad).all()


def test_sapo_by_hand_and_its_slope_at_one():
    logps, old, adv, mask = example()
    loss, _ = policy_loss(logps, old, adv, mask, kind="sapo", sapo_tau_pos=1.0, sapo_tau_neg=2.0)
    terms = [-sigmoid(1.0 * (r - 1)) * 4 / 1.0 * 1.0 for r in RATIOS[0]]
    terms += [-sigmoid(2.0 * (r - 1)) * 4 / 2.0 * -2.0 for r in RATIOS[1][:2]]
    close(loss, sum(terms) / 5)
    loss.backward()
    # d/dlog π of −σ(τ(ρ − 1))·(4/τ)·A = −4·σ'(τ(ρ − 1))·ρ·A, σ' = σ(1 − σ)
    dsig = [sigmoid(1.0 * (r - 1)) * (1 - sigmoid(1.0 * (r - 1))) for r in RATIOS[0]]
    close(logps.grad[0], [-4 * d * r * 1.0 / 5 for d, r in zip(dsig, RATIOS[0])])
    # on-policy (ρ = 1) the gate's slope is 1: the gradient is the plain policy gradient −A / units
    on = old.clone().requires_grad_()
    loss, _ = policy_loss(on, old, adv, mask, kind="sapo")
    loss.backward()
    close(on.grad, [[-1 / 5] * 3, [2 / 5, 2 / 5, 0.0]])


def test_gspo_sequence_ratio_by_hand():
    """s_i = geometric mean of the row's token ratios; every token of the row uses it."""
    logps, old, adv, mask = example()
    s0, s1 = (1.1 * 1.5 * 0.5) ** (1 / 3), (0.7 * 1.3) ** (1 / 2)  # 0.9379, 0.9539: inside [0.8, 1.2]
    loss, m = policy_loss(
        logps, old, adv, mask, importance_level="sequence", aggregation="seq_mean_token_mean"
    )
    close(loss, (-s0 + 2 * s1) / 2)
    close(m["ratio_mean"], (s0 + s1) / 2)
    close(m["ratio_max"], s1)
    loss.backward()
    # ∂s_i/∂log π_it = s_i / |y_i|; loss = (1/2)·[−s0 + 2·s1]
    close(logps.grad, [[-s0 / 6] * 3, [s1 / 2, s1 / 2, 0.0]])
    # a sequence ratio outside the clip range is clipped as a whole: ε = 0.05 clips row 0 (A > 0? no: s0 < 1
    # and A > 0 is clipped only above), and ε_low = 0.05 with A < 0 does not touch s1 = 0.954 > 0.95
    loss, m = policy_loss(logps, old, adv, mask, importance_level="sequence", clip_low=0.05, clip_high=0.05)
    close(m["clip_fraction"], 0.0)


def test_luspo_aggregation_by_hand():
    """seq_mean_token_sum: (1/B)·Σ_i Σ_t ℓ_it, each sequence weighted by its length."""
    logps, old, adv, mask = example()
    loss, m = policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum")
    close(loss, ((-1.1 - 1.2 - 0.5) + (1.6 + 2.6)) / 2)
    close(m["clip_fraction"], (1 / 3 + 1 / 2) / 2)  # shares stay shares
    assert loss_units(mask, "seq_mean_token_sum") == 2.0
    # with GSPO's sequence ratio each sequence's loss is |y_i|·(−min(s_i A, clip(s_i) A))
    s0, s1 = (1.1 * 1.5 * 0.5) ** (1 / 3), (0.7 * 1.3) ** (1 / 2)
    loss, _ = policy_loss(
        logps, old, adv, mask, aggregation="seq_mean_token_sum", importance_level="sequence"
    )
    close(loss, (3 * -s0 + 2 * 2 * s1) / 2)


def test_two_sided_clip_delta_by_hand():
    """δ = 1.25 caps the unclipped branch: for A = −2, ρ = 1.3 gives −min(−2.5, −2.4) = 2.5 (not 2.6), with
    no gradient; A > 0 tokens are unchanged (their min already picks the clip)."""
    logps, old, adv, mask = example()
    loss, _ = policy_loss(logps, old, adv, mask, delta=1.25)
    close(loss, (-1.1 - 1.2 - 0.5 + 1.6 + 2.5) / 5)
    loss.backward()
    close(logps.grad, [[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 0.0, 0.0]])


def test_off_policy_sequence_mask_by_hand():
    """Mean KL estimate of row i = mean(old − new) = −mean(log ρ): row 0 0.0641 (A > 0: always kept), row 1
    −(log 0.7 + log 1.3)/2 = 0.0472 (A < 0: kept below δ, dropped above)."""
    logps, old, adv, mask = example()
    kl1 = -(math.log(0.7) + math.log(1.3)) / 2
    keep = off_policy_mask(logps, old, adv, mask, threshold=0.04)
    close(keep, [[1.0], [0.0]])
    close(off_policy_mask(logps, old, adv, mask, threshold=kl1 + 1e-9), [[1.0], [1.0]])
    loss, m = policy_loss(logps, old, adv, mask, off_policy_threshold=0.04)
    close(loss, (-1.1 - 1.2 - 0.5) / 5)  # row 1 adds 0 but its tokens still count
    close(m["kept_fraction"], 3 / 5)
    loss, _ = policy_loss(logps, old, adv, mask, off_policy_threshold=0.05)
    close(loss, (-1.1 - 1.2 - 0.5 + 1.6 + 2.6) / 5)
    # the behaviour policy's log-probs decide when given: a sampler far below the trainer on row 1
    behaviour = old.clone()
    behaviour[1] += 1.0  # KL estimate of row 1 grows by 1
    loss, _ = policy_loss(logps, old, adv, mask, off_policy_threshold=0.5, behaviour_logps=behaviour)
    close(loss, (-1.1 - 1.2 - 0.5) / 5)


ENTROPIES = [[0.1, 0.9, 0.5], [0.3, 0.7, 99.0]]  # 99 is padding: never chosen, never in the quantile


def test_top_entropy_tokens_by_hand():
    logps, old, adv, mask = example()
    ent = torch.tensor(ENTROPIES, dtype=torch.float64)
    # valid entropies sorted 0.1 0.3 0.5 0.7 0.9; the 0.6 quantile sits at 2.4 of 4: 0.5 + 0.4·0.2 = 0.58
    close(entropy_threshold(ent, mask, 0.4), 0.58, tol=1e-6)  # in float32, as TRL
    loss, m = policy_loss(logps, old, adv, mask, entropies=ent, top_entropy_quantile=0.4)
    close(loss, (-1.2 + 2.6) / 5)  # tokens (0, 1) and (1, 1)
    close(m["kept_fraction"], 2 / 5)
    loss.backward()
    close(logps.grad, [[0.0, 0.0, 0.0], [0.0, 2 * 1.3 / 5, 0.0]])
    # quantile 1 keeps everything (the minimum is its own threshold)
    full, _ = policy_loss(
        logps, old, adv, mask, entropies=ent, top_entropy_quantile=1.0, entropy_threshold=0.1
    )
    close(full, 1.4 / 5)


def test_top_entropy_empty_mask_selects_nothing():
    logps, old, adv, _ = example()
    empty = torch.zeros(2, 3, dtype=torch.long)
    ent = torch.tensor(ENTROPIES, dtype=torch.float64)
    assert entropy_threshold(ent, empty, 0.2) == math.inf
    loss_sum, units, metrics = policy_loss_sum(
        logps, old, adv, empty, entropies=ent, top_entropy_quantile=0.2
    )
    assert units == 0 and float(loss_sum.detach()) == 0.0 and torch.isfinite(loss_sum)
    loss_sum.backward()
    assert (logps.grad == 0).all()


def test_importance_weights_by_hand():
    """Δ = log π_trainer − log π_sampler: token ratios 3, 0.5, 1 and 1.2, 0.25; bounds [0.4, 2]."""
    trainer = torch.log(torch.tensor([[3.0, 0.5, 1.0], [1.2, 0.25, 5.0]]))
    sampler = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = importance_weights(trainer, sampler, mask, mode="token_truncate", clip_min=0.4, clip_max=2.0)
    close(
        w, [[2.0, 0.5, 1.0], [1.2, 0.4, 1.0]], tol=1e-6
    )  # padding: Δ = 0, weight 1 (and masked by the loss)
    w = importance_weights(trainer, sampler, mask, mode="token_mask", clip_min=0.4, clip_max=2.0)
    close(w, [[0.0, 0.5, 1.0], [1.2, 0.0, 1.0]], tol=1e-6)
    # sequence ratios: 3·0.5·1 = 1.5, 1.2·0.25 = 0.3
    w = importance_weights(trainer, sampler, mask, mode="sequence_truncate", clip_min=0.4, clip_max=2.0)
    close(w, [[1.5], [0.4]], tol=1e-6)
    w = importance_weights(trainer, sampler, mask, mode="sequence_mask", clip_min=0.4, clip_max=2.0)
    close(w, [[1.5], [0.0]], tol=1e-6)
    w = importance_weights(trainer, sampler, mask, mode="token_truncate", clip_max=None)
    close(w, [[3.0, 0.5, 1.0], [1.2, 0.25, 1.0]], tol=1e-6)
    # in the loss they multiply the per-token terms, units unchanged
    logps, old, adv, mask = example()
    tw = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.0, 7.0]], dtype=torch.float64)
    loss, _ = policy_loss(logps, old, adv, mask, is_weights=tw)
    close(loss, (-1.1 * 2 - 1.2 + 1.6 * 0.5 + 2.6) / 5)


def test_variant_errors():
    logps, old, adv, mask = example()
    for opts, match in [
        ({"kind": "ppo"}, "kind"),
        ({"importance_level": "seq"}, "importance_level"),
        ({"delta": 1.0}, "delta"),
        ({"kind": "sapo", "sapo_tau_neg": 0.0}, "temperatures"),
        ({"kind": "cispo", "clip_high": 0.0}, "ε_max"),
        ({"top_entropy_quantile": 0.5}, "entropies"),
        ({"top_entropy_quantile": 0.0, "entropies": old}, "quantile"),
        ({"off_policy_threshold": 0.0}, "threshold"),
        ({"is_weights": torch.ones(2)}, "is_weights"),
    ]:
        with pytest.raises(ValueError, match=match):
            policy_loss(logps, old, adv, mask, **opts)
    with pytest.raises(ValueError, match="mode"):
        importance_weights(old, old, mask, mode="sequence")


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: sums over the parts / total units == the mean over the whole batch, for every variant
# ---------------------------------------------------------------------------------------------------------

VARIANTS = {
    "cispo": dict(kind="cispo", clip_high=1.1),
    "sapo": dict(kind="sapo", aggregation="seq_mean_token_mean"),
    "gspo": dict(
        importance_level="sequence", aggregation="seq_mean_token_mean", clip_low=3e-4, clip_high=4e-4
    ),
    "luspo": dict(importance_level="sequence", aggregation="seq_mean_token_sum"),
    "delta": dict(delta=1.2, clip_high=0.1),
    "off_policy": dict(off_policy_threshold=0.05),
    "top_entropy": dict(top_entropy_quantile=0.3),
    "is_weights": dict(is_weights=True),
    "sapo_dr_grpo": dict(kind="sapo", aggregation="seq_mean_token_sum_norm", max_len=6),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_micro_batch_sums_equal_full_batch(name):
    logps, old, adv, mask = random_batch(3)
    opts = dict(VARIANTS[name])
    g = torch.Generator().manual_seed(5)
    ent = torch.rand(logps.shape, generator=g, dtype=torch.float64)
    if "top_entropy_quantile" in opts:  # one threshold for the whole batch, as the objective passes it
        opts.update(
            entropies=ent, entropy_threshold=entropy_threshold(ent, mask, opts["top_entropy_quantile"])
        )
    if opts.get("is_weights") is True:
        opts["is_weights"] = importance_weights(old, old + 0.3 * torch.randn(old.shape, generator=g), mask)
    aggregation = opts.get("aggregation", "token_mean")

    full_logps = logps.clone().requires_grad_()
    loss, metrics = policy_loss(full_logps, old, adv, mask, **opts)
    loss.backward()

    micro_logps = logps.clone().requires_grad_()
    terms = []
    for lo, hi in [(0, 2), (2, 3), (3, 7)]:
        T = max(int(mask[lo:hi].sum(dim=1).max()), 1)  # each micro-batch cut to its own padding
        part = {
            k: (v[lo:hi, :T] if isinstance(v, torch.Tensor) and v.shape[1] > 1 else v)
            for k, v in opts.items()
        }
        part = {
            k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.shape[1] == 1 else v) for k, v in part.items()
        }
        terms.append(
            policy_loss_sum(micro_logps[lo:hi, :T], old[lo:hi, :T], adv[lo:hi], mask[lo:hi, :T], **part)
        )
    units = sum(u for _, u, _ in terms)
    assert units == loss_units(mask, aggregation)
    for loss_sum, _, _ in terms:
        (loss_sum / units).backward()
    close(sum(s for s, _, _ in terms).detach() / units, loss.detach(), tol=1e-12)
    close(micro_logps.grad, full_logps.grad, tol=1e-12)
    for key in metrics:
        if key != "ratio_max":
            close(sum(ms[key] for _, _, ms in terms) / units, metrics[key], tol=1e-12)
    assert full_logps.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# TRL 1.16: GRPOTrainer._compute_loss on a stub trainer with each option
# ---------------------------------------------------------------------------------------------------------


def trl_loss(logps, old, adv, mask, *, loss_type, eps_low=0.2, eps_high=0.2, entropies=None, **options):
    """TRL's GRPO loss on given per-token log-probs (no model). options: importance_sampling_level, delta,
    off_policy_mask_threshold, top_entropy_quantile, sampling_logps, is_ratio, sapo temperatures."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logps.shape
    ent = torch.zeros_like(logps) if entropies is None else entropies
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, ent, None),
        aux_loss_enabled=False,
        top_entropy_quantile=options.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=options.get("off_policy_mask_threshold"),
        importance_sampling_level=options.get("importance_sampling_level", "token"),
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(
            delta=options.get("delta"),
            use_bias_correction_kl=False,
            sapo_temperature_pos=options.get("sapo_temperature_pos", 1.0),
            sapo_temperature_neg=options.get("sapo_temperature_neg", 1.05),
            steps_per_generation=1,
        ),
        use_vllm="is_ratio" in options,
        vllm_importance_sampling_correction="is_ratio" in options,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(
            reduce=lambda x, reduction: x,
            gather=lambda x: x,
            num_processes=1,
            pad_across_processes=lambda x, dim, pad_index: x,
        ),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
    )
    stub.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(stub, *a)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if "sampling_logps" in options:
        inputs["sampling_per_token_logps"] = options["sampling_logps"]
    if "is_ratio" in options:
        inputs["importance_sampling_ratio"] = options["is_ratio"]
    return GRPOTrainer._compute_loss(stub, None, inputs)


SEEDS = (0, 1, 2)


@pytest.mark.parametrize("cap", [1.05, 5.0])
def test_cispo_matches_trl(cap):
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        logps = logps.requires_grad_()
        theirs = trl_loss(logps, old, adv, mask, loss_type="cispo", eps_high=cap)
        (their_grad,) = torch.autograd.grad(theirs, logps)
        ours, _ = policy_loss(logps, old, adv, mask, kind="cispo", clip_high=cap)
        close(ours, theirs, tol=1e-12)
        (our_grad,) = torch.autograd.grad(ours, logps)
        close(our_grad, their_grad, tol=1e-12)


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_matches_trl(taus):
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        theirs = trl_loss(
            logps,
            old,
            adv,
            mask,
            loss_type="sapo",
            sapo_temperature_pos=taus[0],
            sapo_temperature_neg=taus[1],
        )
        ours, _ = policy_loss(
            logps, old, adv, mask, kind="sapo", sapo_tau_pos=taus[0], sapo_tau_neg=taus[1],
            aggregation="seq_mean_token_mean",
        )  # fmt: skip
        close(ours, theirs, tol=1e-12)


@pytest.mark.parametrize(
    "loss_type,aggregation",
    [("grpo", "seq_mean_token_mean"), ("bnpo", "token_mean"), ("luspo", "seq_mean_token_sum")],
)
def test_sequence_level_matches_trl(loss_type, aggregation):
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        logps = logps.requires_grad_()
        theirs = trl_loss(
            logps, old, adv, mask, loss_type=loss_type, eps_low=0.02, eps_high=0.03,
            importance_sampling_level="sequence",
        )  # fmt: skip
        ours, _ = policy_loss(
            logps, old, adv, mask, importance_level="sequence", aggregation=aggregation, clip_low=0.02,
            clip_high=0.03,
        )  # fmt: skip
        close(ours, theirs, tol=1e-12)
        close(torch.autograd.grad(ours, logps)[0], torch.autograd.grad(theirs, logps)[0], tol=1e-12)


def test_luspo_token_level_matches_trl():
    logps, old, adv, mask = random_batch(4)
    theirs = trl_loss(logps, old, adv, mask, loss_type="luspo")
    ours, _ = policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum")
    close(ours, theirs, tol=1e-12)


def test_delta_matches_trl():
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        theirs = trl_loss(logps, old, adv, mask, loss_type="bnpo", eps_high=0.1, delta=1.15)
        ours, _ = policy_loss(logps, old, adv, mask, clip_high=0.1, delta=1.15)
        close(ours, theirs, tol=1e-12)


@pytest.mark.parametrize("threshold", [0.02, 0.1])
def test_off_policy_mask_matches_trl(threshold):
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        sampling = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
        theirs = trl_loss(
            logps,
            old,
            adv,
            mask,
            loss_type="bnpo",
            off_policy_mask_threshold=threshold,
            sampling_logps=sampling,
        )
        ours, _ = policy_loss(logps, old, adv, mask, off_policy_threshold=threshold, behaviour_logps=sampling)
        close(ours, theirs, tol=1e-12)


@pytest.mark.parametrize("quantile", [0.2, 0.5])
def test_top_entropy_matches_trl(quantile):
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        ent = torch.rand(logps.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        theirs = trl_loss(
            logps, old, adv, mask, loss_type="grpo", entropies=ent, top_entropy_quantile=quantile
        )
        ours, _ = policy_loss(
            logps,
            old,
            adv,
            mask,
            entropies=ent,
            top_entropy_quantile=quantile,
            aggregation="seq_mean_token_mean",
        )
        close(ours, theirs, tol=1e-12)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_weights_in_loss_match_trl(mode):
    for seed in SEEDS:
        logps, old, adv, mask = random_batch(seed)
        sampler = old + 0.4 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
        w = importance_weights(old, sampler, mask, mode=mode, clip_min=0.5, clip_max=1.5).double()
        theirs = trl_loss(logps, old, adv, mask, loss_type="bnpo", is_ratio=w)
        ours, _ = policy_loss(logps, old, adv, mask, is_weights=w)
        close(ours, theirs, tol=1e-12)
