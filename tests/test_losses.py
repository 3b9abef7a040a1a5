"""Preference, KTO and reward losses: against formulas written out with `math`, and against TRL's own code.

The hand formulas (`hand_loss`, ...) restate each paper's loss with plain Python floats; they share no code
with posttrain.losses. The TRL tests call TRL 1.16's loss code on the same tensors, through stub `self`
objects (no model, no trainer), and are skipped when trl is not installed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses import (
    PREFERENCE_KINDS,
    REFERENCE_FREE_KINDS,
    kto_loss,
    preference_loss,
    preference_rewards,
    reward_loss,
)

# ---------------------------------------------------------------------------------------------------------
# Hand formulas
# ---------------------------------------------------------------------------------------------------------


def lsig(x: float) -> float:
    """log σ(x), without overflow for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(lsig(x))


@dataclass
class Ex:
    """One preference pair: summed log-probs (pc, pr: policy; rc, rr: reference) and completion lengths."""

    pc: float
    pr: float
    rc: float
    rr: float
    lc: int
    lr: int


EXAMPLES = [
    Ex(pc=-3.0, pr=-5.0, rc=-4.0, rr=-4.5, lc=2, lr=3),  # policy already prefers chosen (h > 0)
    Ex(pc=-10.0, pr=-7.0, rc=-9.0, rr=-8.0, lc=5, lr=1),  # policy prefers rejected (h < 0)
    Ex(pc=-2.0, pr=-2.0, rc=-2.0, rr=-2.0, lc=4, lr=4),  # equal log-probs: h = 0
]
BETAS = [1e-3, 0.1, 10.0]
LENGTH_KINDS = {"sigmoid_norm", "simpo", "orpo"}  # lengths required


def hand_loss(kind: str, e: Ex, beta: float, ls: float = 0.0, gamma: float = 0.5, tau: float = 0.05) -> float:
    """Each paper's per-pair loss, from scratch. d_c, d_r: log-ratios π − ref; h = d_c − d_r."""
    dc, dr = e.pc - e.rc, e.pr - e.rr
    h = dc - dr
    if kind == "sigmoid":  # DPO / cDPO
        return -(1 - ls) * lsig(beta * h) - ls * lsig(-beta * h)
    if kind == "sigmoid_norm":
        return -lsig(beta * (dc / e.lc - dr / e.lr))
    if kind == "ipo":  # the paper's form, on whole-sequence log-ratios
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return max(0.0, 1 - beta * h)
    if kind == "robust":
        return ((1 - ls) * -lsig(beta * h) - ls * -lsig(-beta * h)) / (1 - 2 * ls)
    if kind == "exo_pair":
        q_w, q_l = sig(beta * h), sig(-beta * h)
        return q_w * (math.log(q_w) - math.log(1 - ls)) + q_l * (math.log(q_l) - math.log(ls))
    if kind == "bco_pair":
        return -lsig(beta * dc) - lsig(-beta * dr)
    if kind == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if kind == "nca_pair":
        return -lsig(beta * dc) - 0.5 * lsig(-beta * dc) - 0.5 * lsig(-beta * dr)
    if kind == "apo_zero":
        return (1 - sig(beta * dc)) + sig(beta * dr)
    if kind == "apo_down":
        return sig(beta * dc) + (1 - sig(beta * h))
    if kind == "discopop":
        x = beta * h
        m = sig(x / tau)
        return (1 - m) * -lsig(x) + m * math.exp(-x)
    if kind == "simpo":
        x = beta * (e.pc / e.lc - e.pr / e.lr) - gamma
        return -(1 - ls) * lsig(x) - ls * lsig(-x)
    if kind == "orpo":
        a_c, a_r = e.pc / e.lc, e.pr / e.lr
        log_odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
        return -beta * lsig(log_odds)
    raise AssertionError(kind)


def hand_aot(kind: str, batch: list[Ex], beta: float, ls: float = 0.0) -> list[float]:
    """AOT: sort the two sides across the batch, then a smoothed logistic loss per sorted position."""
    if kind == "aot":
        upper = sorted(e.pc - e.pr for e in batch)
        lower = sorted(e.rc - e.rr for e in batch)
    else:  # aot_unpaired
        upper = sorted(e.pc - e.rc for e in batch)
        lower = sorted(e.pr - e.rr for e in batch)
    return [-(1 - ls) * lsig(beta * (u - v)) - ls * lsig(-beta * (u - v)) for u, v in zip(upper, lower)]


def tensors(batch: list[Ex], dtype=torch.float64, requires_grad=False):
    def col(name):
        return torch.tensor([getattr(e, name) for e in batch], dtype=dtype, requires_grad=requires_grad)

    return SimpleNamespace(
        pc=col("pc"), pr=col("pr"), rc=col("rc"), rr=col("rr"), lc=col("lc").detach(), lr=col("lr").detach()
    )


def call(kind: str, t, beta: float, **options):
    """preference_loss with the reference log-probs and lengths each kind takes."""
    refs = () if kind in REFERENCE_FREE_KINDS else (t.rc, t.rr)
    if kind in LENGTH_KINDS:
        options = {"chosen_lengths": t.lc, "rejected_lengths": t.lr, **options}
    return preference_loss(kind, t.pc, t.pr, *refs, beta=beta, **options)


def options_for(kind: str) -> list[dict]:
    """Option sets to test each kind with: label smoothing 0 and > 0, SimPO's γ, DiscoPOP's τ."""
    if kind in {"sigmoid", "robust", "aot", "aot_unpaired"}:
        return [{}, {"label_smoothing": 0.1}]
    if kind == "exo_pair":
        return [{"label_smoothing": 1e-3}, {"label_smoothing": 0.2}]
    if kind == "simpo":
        return [{}, {"gamma": 1.5, "label_smoothing": 0.1}]
    if kind == "discopop":
        return [{}, {"tau": 0.5}]
    return [{}]


def hand_kwargs(options: dict) -> dict:
    return {
        "ls": options.get("label_smoothing", 0.0),
        **{k: options[k] for k in ("gamma", "tau") if k in options},
    }


CASES = [(kind, opts) for kind in PREFERENCE_KINDS for opts in options_for(kind)]


def case_id(case):
    kind, opts = case
    return kind + "".join(f"-{k}={v}" for k, v in opts.items())


# ---------------------------------------------------------------------------------------------------------
# Every kind against the hand formulas
# ---------------------------------------------------------------------------------------------------------


def test_every_kind_is_tested():
    assert {kind for kind, _ in CASES} == set(PREFERENCE_KINDS)
    assert {
        "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "exo_pair", "apo_zero",
        "apo_down", "aot", "aot_unpaired", "discopop", "simpo", "orpo", "sigmoid_norm",
    } <= set(PREFERENCE_KINDS)  # fmt: skip
    assert REFERENCE_FREE_KINDS == {"simpo", "orpo"}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kind_matches_hand_formula(case, beta):
    kind, opts = case
    got = call(kind, tensors(EXAMPLES), beta, **opts)
    assert got.shape == (len(EXAMPLES),) and got.dtype == torch.float64
    if kind in {"aot", "aot_unpaired"}:
        want = hand_aot(kind, EXAMPLES, beta, **hand_kwargs(opts))
    else:
        want = [hand_loss(kind, e, beta, **hand_kwargs(opts)) for e in EXAMPLES]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_equal_logps_give_the_textbook_values():
    """h = 0: DPO is log 2, IPO is (1/2β)², hinge is 1, APO-zero is 1; robust equals DPO at any ε."""
    t = tensors([EXAMPLES[2]])
    beta = 0.1
    assert call("sigmoid", t, beta).item() == pytest.approx(math.log(2))
    assert call("sigmoid", t, beta, label_smoothing=0.2).item() == pytest.approx(math.log(2))
    assert call("robust", t, beta, label_smoothing=0.2).item() == pytest.approx(math.log(2))
    assert call("ipo", t, beta).item() == pytest.approx(25.0)
    assert call("hinge", t, beta).item() == pytest.approx(1.0)
    assert call("apo_zero", t, beta).item() == pytest.approx(1.0)
    assert call("sppo_hard", t, beta).item() == pytest.approx(2 * 25.0)


def test_ipo_with_lengths_averages_the_log_ratios():
    """TRL's IPO convention: h = Δ_c/|y_c| − Δ_r/|y_r| when lengths are given."""
    t = tensors(EXAMPLES)
    got = preference_loss("ipo", t.pc, t.pr, t.rc, t.rr, beta=0.1, chosen_lengths=t.lc, rejected_lengths=t.lr)
    want = [((e.pc - e.rc) / e.lc - (e.pr - e.rr) / e.lr - 5.0) ** 2 for e in EXAMPLES]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # sigmoid with lengths is sigmoid_norm
    kw = {"chosen_lengths": t.lc, "rejected_lengths": t.lr}
    torch.testing.assert_close(
        preference_loss("sigmoid", t.pc, t.pr, t.rc, t.rr, **kw),
        preference_loss("sigmoid_norm", t.pc, t.pr, t.rc, t.rr, **kw),
    )


def test_bco_pair_reward_shift():
    t = tensors(EXAMPLES)
    got = preference_loss("bco_pair", t.pc, t.pr, t.rc, t.rr, beta=0.5, delta=0.3)
    want = [-lsig(0.5 * (e.pc - e.rc) - 0.3) - lsig(-(0.5 * (e.pr - e.rr) - 0.3)) for e in EXAMPLES]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_lengths_accept_python_lists():
    t = tensors(EXAMPLES)
    lc, lr = [e.lc for e in EXAMPLES], [e.lr for e in EXAMPLES]
    got = preference_loss("simpo", t.pc, t.pr, beta=2.0, gamma=1.0, chosen_lengths=lc, rejected_lengths=lr)
    assert got.tolist() == pytest.approx([hand_loss("simpo", e, 2.0, gamma=1.0) for e in EXAMPLES])


def test_examples_are_independent_except_aot():
    """Per-pair losses: a pair's loss does not depend on the rest of the batch (so micro-batching is exact)."""
    t = tensors(EXAMPLES)
    for kind, opts in CASES:
        if kind in {"aot", "aot_unpaired"}:
            continue
        whole = call(kind, t, 0.1, **opts)
        alone = torch.cat([call(kind, tensors([e]), 0.1, **opts) for e in EXAMPLES])
        torch.testing.assert_close(whole, alone, msg=kind)


# ---------------------------------------------------------------------------------------------------------
# Numerics: large margins, gradients
# ---------------------------------------------------------------------------------------------------------

# |h| = 400 and 200: β·h reaches ±4000 at β = 10. Average log-probs stay < 0 for ORPO.
LARGE = [
    Ex(pc=-1.0, pr=-201.0, rc=-201.0, rr=-1.0, lc=1, lr=1),
    Ex(pc=-201.0, pr=-1.0, rc=-1.0, rr=-201.0, lc=1, lr=1),
    Ex(pc=-200.0, pr=-0.5, rc=-0.5, rr=-0.5, lc=3, lr=1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_large_margins_stay_finite(case, beta, dtype):
    kind, opts = case
    t = tensors(LARGE, dtype=dtype, requires_grad=True)
    loss = call(kind, t, beta, **opts)
    assert torch.isfinite(loss).all(), (kind, loss)
    loss.sum().backward()
    for grad in (t.pc.grad, t.pr.grad):
        assert torch.isfinite(grad).all(), (kind, grad)


def test_discopop_is_finite_where_the_naive_product_is_nan():
    """m·exp(−x) as written in TRL is 0·inf = NaN at x = β·h = −4000; the loss is really ≈ −x."""
    t = tensors([LARGE[1]], dtype=torch.float32)
    x = 10.0 * ((t.pc - t.rc) - (t.pr - t.rr))
    naive = torch.sigmoid(x / 0.05) * torch.exp(-x)
    assert torch.isnan(naive).all()
    loss = call("discopop", t, 10.0)
    assert loss.item() == pytest.approx(4000.0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_signs(case):
    """Where the policy prefers the rejected answer, raising its chosen log-prob lowers the loss and raising
    its rejected log-prob raises it — except APO-down, which lowers both likelihoods by design."""
    kind, opts = case
    batch = [
        Ex(pc=-6.0, pr=-4.0, rc=-5.0, rr=-5.0, lc=2, lr=2),
        Ex(pc=-9.0, pr=-3.0, rc=-6.0, rr=-6.0, lc=3, lr=1),
    ]
    t = tensors(batch, requires_grad=True)
    call(kind, t, 0.1, **opts).mean().backward()
    assert torch.isfinite(t.pc.grad).all() and torch.isfinite(t.pr.grad).all()
    if kind == "apo_down":
        assert (t.pc.grad > 0).all()
    else:
        assert (t.pc.grad < 0).all(), (kind, t.pc.grad)
    assert (t.pr.grad > 0).all(), (kind, t.pr.grad)


def test_dpo_gradient_matches_hand_derivative():
    """d/dπ_c of −log σ(β·h) is −β·σ(−β·h)."""
    t = tensors(EXAMPLES, requires_grad=True)
    call("sigmoid", t, 0.1).sum().backward()
    want = [-0.1 * sig(-0.1 * ((e.pc - e.rc) - (e.pr - e.rr))) for e in EXAMPLES]
    assert t.pc.grad.tolist() == pytest.approx(want, rel=1e-12)
    assert t.pr.grad.tolist() == pytest.approx([-g for g in want], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_unknown_kind_suggests_a_name():
    t = tensors(EXAMPLES)
    with pytest.raises(ValueError, match=r"unknown preference loss kind: 'sigmod'.*Did you mean sigmoid\?"):
        preference_loss("sigmod", t.pc, t.pr, t.rc, t.rr)
    with pytest.raises(ValueError, match=r"Did you mean sigmoid \(DPO\)"):
        preference_loss("dpo", t.pc, t.pr, t.rc, t.rr)
    with pytest.raises(ValueError, match="aot_unpaired"):
        preference_loss("aot_pair", t.pc, t.pr, t.rc, t.rr)


def test_unknown_or_misplaced_option_is_an_error():
    t = tensors(EXAMPLES)
    with pytest.raises(ValueError, match="Did you mean label_smoothing"):
        preference_loss("sigmoid", t.pc, t.pr, t.rc, t.rr, label_smothing=0.1)
    with pytest.raises(ValueError, match="unknown option for kind 'hinge'"):
        preference_loss("hinge", t.pc, t.pr, t.rc, t.rr, label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown option for kind 'hinge'"):
        preference_loss("hinge", t.pc, t.pr, t.rc, t.rr, chosen_lengths=t.lc, rejected_lengths=t.lr)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        preference_loss("ipo", t.pc, t.pr, t.rc, t.rr, chosen_lengths=t.lc)


def test_reference_requirements():
    t = tensors(EXAMPLES)
    with pytest.raises(ValueError, match="needs ref_chosen_logps.*reference-free"):
        preference_loss("sigmoid", t.pc, t.pr)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("ipo", t.pc, t.pr, t.rc)
    with pytest.raises(ValueError, match="'simpo' is reference-free"):
        preference_loss("simpo", t.pc, t.pr, t.rc, t.rr, chosen_lengths=t.lc, rejected_lengths=t.lr)


@pytest.mark.parametrize("kind", ["sigmoid_norm", "simpo", "orpo", "ipo", "sigmoid"])
def test_zero_length_is_an_error(kind):
    t = tensors(EXAMPLES)
    refs = () if kind in REFERENCE_FREE_KINDS else (t.rc, t.rr)
    lengths = torch.tensor([3.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"rejected_lengths is <= 0 at batch positions \[1\]"):
        preference_loss(kind, t.pc, t.pr, *refs, chosen_lengths=t.lc, rejected_lengths=lengths)
    if kind in LENGTH_KINDS:
        with pytest.raises(ValueError, match="pass chosen_lengths and rejected_lengths"):
            preference_loss(kind, t.pc, t.pr, *refs)


def test_shape_and_range_errors():
    t = tensors(EXAMPLES)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss("sigmoid", t.pc, t.pr[:2], t.rc, t.rr)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss("sigmoid", t.pc[None], t.pr[None], t.rc[None], t.rr[None])
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        preference_loss("robust", t.pc, t.pr, t.rc, t.rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="needs label_smoothing > 0"):
        preference_loss("exo_pair", t.pc, t.pr, t.rc, t.rr)
    with pytest.raises(ValueError, match="tau must be > 0"):
        preference_loss("discopop", t.pc, t.pr, t.rc, t.rr, tau=0.0)


# ---------------------------------------------------------------------------------------------------------
# Rewards for metrics, KTO, reward model
# ---------------------------------------------------------------------------------------------------------


def test_preference_rewards():
    t = tensors(EXAMPLES, requires_grad=True)
    chosen, rejected = preference_rewards(t.pc, t.pr, t.rc, t.rr, 0.1)
    assert chosen.tolist() == pytest.approx([0.1 * (e.pc - e.rc) for e in EXAMPLES])
    assert rejected.tolist() == pytest.approx([0.1 * (e.pr - e.rr) for e in EXAMPLES])
    assert not chosen.requires_grad and not rejected.requires_grad
    # reference-free: β·π
    chosen, _ = preference_rewards(t.pc, t.pr, beta=2.0)
    assert chosen.tolist() == pytest.approx([2.0 * e.pc for e in EXAMPLES])


def hand_kto(logp, ref, desirable, kl, beta, w_d, w_u):
    z = max(0.0, kl)
    r = logp - ref
    return w_d * (1 - sig(beta * (r - z))) if desirable else w_u * (1 - sig(beta * (z - r)))


KTO_ROWS = [(-3.0, -4.0, True), (-10.0, -7.0, False), (-2.0, -2.0, True), (-5.0, -6.5, False)]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kl", [0.0, 0.7, -0.4])
def test_kto_matches_hand_formula(beta, kl):
    logp, ref, labels = (torch.tensor(col, dtype=torch.float64) for col in zip(*KTO_ROWS))
    got = kto_loss(logp, ref, labels.bool(), kl, beta=beta, desirable_weight=1.0, undesirable_weight=1.5)
    want = [hand_kto(lp, rf, d, kl, beta, 1.0, 1.5) for lp, rf, d in KTO_ROWS]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_kto_detaches_the_kl_estimate_and_stays_finite():
    logp = torch.tensor([-1.0, -400.0], dtype=torch.float32, requires_grad=True)
    kl = torch.tensor(0.3, requires_grad=True)
    ref, labels = torch.tensor([-400.0, -1.0]), torch.tensor([True, False])
    loss = kto_loss(logp, ref, labels, kl, beta=10.0, desirable_weight=1.0, undesirable_weight=1.0)
    loss.sum().backward()
    assert kl.grad is None
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    # raising a desirable completion's log-prob lowers the loss, raising an undesirable one's does not
    assert logp.grad[0] <= 0 and logp.grad[1] >= 0


def test_reward_loss_matches_hand_formula():
    c = torch.tensor([1.0, -0.5, 3.0, 200.0, -200.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 3.0, -200.0, 200.0], dtype=torch.float64)
    got = reward_loss(c, r)
    assert got.tolist() == pytest.approx([-lsig(a - b) for a, b in zip(c.tolist(), r.tolist())], rel=1e-12)
    assert torch.isfinite(got).all()
    m = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    got = reward_loss(c, r, margin=m)
    want = [-lsig(a - b - mm) for a, b, mm in zip(c.tolist(), r.tolist(), m.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    want = [-lsig(a - b - 0.5) for a, b in zip(c.tolist(), r.tolist())]
    assert reward_loss(c, r, margin=0.5).tolist() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Cross-check against TRL 1.16's own loss code
# ---------------------------------------------------------------------------------------------------------

TRL_TOL = 1e-6
DPO_TRL_KINDS = [
    "sigmoid", "sigmoid_norm", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair",
    "apo_zero", "apo_down", "aot", "aot_unpaired", "discopop",
]  # fmt: skip


@pytest.fixture(scope="module")
def trl():
    import trl  # in the test extra: the cross-checks always run

    return trl


def random_batch(seed: int, B: int = 6) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, 4, generator=g, dtype=torch.float64) * 40 - 0.5
    lengths = torch.randint(1, 20, (B, 2), generator=g)
    return [Ex(*row.tolist(), *ln.tolist()) for row, ln in zip(logps, lengths)]


TRL_BATCHES = [EXAMPLES, random_batch(0), random_batch(1)]


def _accelerator():
    identity = lambda x: x  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity)


def _fake_model(log_probs):
    """Stands in for TRL's model: returns the per-token log-probs, and zeros for the logged extras."""
    zeros = torch.zeros_like(log_probs)
    return _returns(
        SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    )


def _returns(out):
    return lambda **kwargs: out


def _token_layout(chosen_B, rejected_B, chosen_len, rejected_len):
    """[2B, T+1] completion mask (a prompt token, then the completion) and [2B, T] per-token log-probs whose
    sum over each row is the given summed log-prob."""
    logps = torch.cat([chosen_B, rejected_B])
    lengths = torch.cat([chosen_len, rejected_len]).long()
    T = int(lengths.max())
    mask = (torch.arange(T + 1) >= 1) & (torch.arange(T + 1) <= lengths[:, None])
    per_token = torch.zeros(len(logps), T, dtype=logps.dtype)
    per_token[:, 0] = logps  # one non-zero entry per row: the row sum is exactly the summed log-prob
    return mask.long(), per_token


def trl_dpo(kind: str, t, beta: float, label_smoothing: float = 0.0, tau: float = 0.05):
    """TRL's DPOTrainer._compute_loss on a stub trainer (precomputed reference log-probs, fake model)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    mask, per_token = _token_layout(t.pc, t.pr, t.lc, t.lr)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[kind],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": t.rc,
        "ref_rejected_logps": t.rr,
    }
    loss = DPOTrainer._compute_loss(stub, _fake_model(per_token), inputs, return_outputs=False)
    return loss, stub._metrics["train"]


def trl_dpo_cases():
    for kind in DPO_TRL_KINDS:
        for opts in options_for(kind):
            if kind == "sigmoid" and opts:
                continue  # TRL 1.16's DPO sigmoid has no label smoothing: cDPO is checked against CPO below
            yield kind, opts


def ours_trl_convention(kind: str, t, beta: float, **opts):
    """TRL's DPO averages IPO's log-ratios over the completion tokens: our `ipo` with lengths."""
    if kind == "ipo":
        opts = {"chosen_lengths": t.lc, "rejected_lengths": t.lr, **opts}
    if kind == "sigmoid_norm":
        return call(kind, t, beta, **opts)
    return preference_loss(kind, t.pc, t.pr, t.rc, t.rr, beta=beta, **opts)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", list(trl_dpo_cases()), ids=case_id)
def test_dpo_kinds_match_trl(trl, case, beta):
    kind, opts = case
    trl_opts = {"label_smoothing": opts.get("label_smoothing", 0.0), "tau": opts.get("tau", 0.05)}
    for batch in TRL_BATCHES:
        t = tensors(batch)
        ours = ours_trl_convention(kind, t, beta, **opts)
        if kind in {"aot", "aot_unpaired"}:  # batch-level: compare the batch means
            theirs, _ = trl_dpo(kind, t, beta, **trl_opts)
            assert abs(ours.mean().item() - theirs.item()) < TRL_TOL
            continue
        for i in range(len(batch)):  # one pair at a time: TRL returns only the batch mean
            ti = tensors(batch[i : i + 1])
            theirs, metrics = trl_dpo(kind, ti, beta, **trl_opts)
            assert abs(ours[i].item() - theirs.item()) < TRL_TOL, (kind, i, ours[i].item(), theirs.item())
            chosen, rejected = preference_rewards(ti.pc, ti.pr, ti.rc, ti.rr, beta)
            assert abs(chosen.item() - metrics["rewards/chosen"][-1]) < TRL_TOL
            assert abs(rejected.item() - metrics["rewards/rejected"][-1]) < TRL_TOL


def trl_cpo(loss_type: str, avg_chosen, avg_rejected, beta, label_smoothing=0.0, gamma=0.5):
    from trl.experimental.cpo import CPOTrainer

    stub = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=gamma,
        accelerator=_accelerator(),
    )
    return CPOTrainer.cpo_loss(stub, avg_chosen, avg_rejected)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "opts", [{}, {"gamma": 1.5}, {"label_smoothing": 0.1}, {"gamma": 0.3, "label_smoothing": 0.2}]
)
def test_simpo_matches_trl_cpo(trl, beta, opts):
    """TRL's CPO trainer gets per-token average log-probs; we get sums and lengths."""
    for batch in TRL_BATCHES:
        t = tensors(batch)
        ours = call("simpo", t, beta, **opts)
        theirs, chosen_r, rejected_r = trl_cpo("simpo", t.pc / t.lc, t.pr / t.lr, beta, **opts)
        assert (ours - theirs).abs().max().item() < TRL_TOL
        chosen, rejected = preference_rewards(t.pc / t.lc, t.pr / t.lr, beta=beta)
        assert (chosen - chosen_r).abs().max().item() < TRL_TOL
        assert (rejected - rejected_r).abs().max().item() < TRL_TOL


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_matches_trl_cpo_sigmoid(trl, beta, label_smoothing):
    """TRL's CPO `sigmoid` is DPO with label smoothing and no reference: our `sigmoid` with zero ref logps."""
    for batch in TRL_BATCHES:
        t = tensors(batch)
        zeros = torch.zeros_like(t.pc)
        ours = preference_loss(
            "sigmoid", t.pc, t.pr, zeros, zeros, beta=beta, label_smoothing=label_smoothing
        )
        theirs, _, _ = trl_cpo("sigmoid", t.pc, t.pr, beta, label_smoothing=label_smoothing)
        assert (ours - theirs).abs().max().item() < TRL_TOL


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_matches_trl(trl, beta, dtype):
    """TRL's ORPOTrainer.odds_ratio_loss returns +β·log σ(·), which it subtracts from the NLL. TRL casts to
    float32 whatever the input dtype, so float64 inputs agree only to float32 precision (relative 1e-6)."""
    from trl.experimental.orpo import ORPOTrainer

    stub = SimpleNamespace(beta=beta, accelerator=_accelerator())
    rtol = 0.0 if dtype == torch.float32 else 1e-6
    for batch in TRL_BATCHES:
        t = tensors(batch, dtype=dtype)
        ours = call("orpo", t, beta)
        theirs, chosen_r, _, _, _ = ORPOTrainer.odds_ratio_loss(stub, t.pc / t.lc, t.pr / t.lr)
        torch.testing.assert_close(ours, -theirs.to(dtype), atol=TRL_TOL, rtol=rtol)
        chosen, _ = preference_rewards(t.pc / t.lc, t.pr / t.lr, beta=beta)
        torch.testing.assert_close(chosen, chosen_r.to(dtype), atol=TRL_TOL, rtol=rtol)


def trl_kto(logp, ref, labels, kl, beta, w_d, w_u):
    """TRL's KTOTrainer._compute_loss on a stub: the KL estimate comes in through the KL log-probs."""
    from trl.trainer.kto_trainer import KTOTrainer

    B = len(logp)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        # mean(KL_logps − ref_KL_logps) = kl
        _compute_kl_logps=lambda model, batch: torch.full((B,), kl, dtype=logp.dtype),
        loss_type="kto",
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    mask = torch.tensor([[0, 1]] * B)
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": torch.zeros(B, dtype=logp.dtype),
    }
    return KTOTrainer._compute_loss(stub, _fake_model(logp[:, None]), inputs, return_outputs=False)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kl", [0.0, 0.7, -0.4])
def test_kto_matches_trl(trl, beta, kl):
    logp, ref, labels = (torch.tensor(col, dtype=torch.float64) for col in zip(*KTO_ROWS))
    labels = labels.bool()
    ours = kto_loss(logp, ref, labels, kl, beta=beta, desirable_weight=1.0, undesirable_weight=1.5)
    theirs = trl_kto(logp, ref, labels, kl, beta, 1.0, 1.5)
    assert abs(ours.mean().item() - theirs.item()) < TRL_TOL
    for i in range(len(KTO_ROWS)):
        theirs = trl_kto(logp[i : i + 1], ref[i : i + 1], labels[i : i + 1], kl, beta, 1.0, 1.5)
        assert abs(ours[i].item() - theirs.item()) < TRL_TOL


@pytest.mark.parametrize("margin", [None, 0.5])
def test_reward_loss_matches_trl(trl, margin):
    from trl.trainer.reward_trainer import RewardTrainer

    c = torch.tensor([1.0, -0.5, 3.0, 20.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 3.0, -20.0], dtype=torch.float64)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        args=SimpleNamespace(center_rewards_coefficient=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    for i in range(len(c)):
        inputs = {"attention_mask": torch.ones(2, 3, dtype=torch.long)}
        if margin is not None:
            inputs["margin"] = torch.tensor([margin], dtype=torch.float64)
        logits = torch.stack([c[i], r[i]])[:, None]
        theirs = RewardTrainer.compute_loss(stub, _returns(SimpleNamespace(logits=logits)), inputs)
        ours = reward_loss(c[i : i + 1], r[i : i + 1], margin=margin)
        assert abs(ours.item() - theirs.item()) < TRL_TOL
