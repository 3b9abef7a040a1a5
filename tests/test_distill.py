"""On-policy distillation: GKD's generalised JSD against TRL and by hand, the chunked JSD against the
direct one; both losses move the student towards the teacher (the reverse_kl advantage has the reverse
KL's gradient in expectation; JSD steps lower the divergence); the stage runs end to end; a teacher with
another tokenizer is a clear error."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.algorithms.distill import masked_jsd
from posttrain.engine.run import read_metrics
from posttrain.errors import ConfigError
from posttrain.logprobs import HiddenHead
from posttrain.losses import generalized_jsd
from posttrain.train import train
from tests.test_online import _reward_module_importable, config, task  # noqa: F401, F811  (fixtures)


def test_generalized_jsd_by_hand():
    s, t = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.9, 0.1]))
    rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p_S ‖ p_T)
    fwd = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(p_T ‖ p_S)
    assert float(generalized_jsd(s, t, beta=1.0)) == pytest.approx(rev, rel=1e-6)
    assert float(generalized_jsd(s, t, beta=0.0)) == pytest.approx(fwd, rel=1e-6)
    m = [0.5 * 0.9 + 0.5 * 0.5, 0.5 * 0.1 + 0.5 * 0.5]  # β = 0.5: the symmetric JSD
    jsd = 0.5 * sum(p * math.log(p / q) for p, q in zip([0.9, 0.1], m))
    jsd += 0.5 * sum(p * math.log(p / q) for p, q in zip([0.5, 0.5], m))
    assert float(generalized_jsd(s, t, beta=0.5)) == pytest.approx(jsd, rel=1e-6)
    assert float(generalized_jsd(t, t, beta=0.3)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_matches_trl_gkd(beta):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, reduction="sum")
    ours = generalized_jsd(student, teacher, beta=beta)[labels != -100].sum()
    torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)
    (g_theirs,) = torch.autograd.grad(theirs, student)
    (g_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(g_ours.double(), g_theirs, atol=1e-5, rtol=1e-5)


def test_chunked_jsd_equals_the_direct_one_with_gradients():
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(2, 2, 4, 8, generator=g)
    ws, wt = torch.randn(2, 13, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    hs1, hs2 = hs.clone().requires_grad_(), hs.clone().requires_grad_()
    student, teacher = HiddenHead(hs1, ws, None, 0.7), HiddenHead(ht, wt, None, 0.7)
    chunked = masked_jsd(student, teacher, mask, 0.5, chunk_tokens=2)
    direct = generalized_jsd((hs2 @ ws.T / 0.7)[mask], (ht @ wt.T / 0.7)[mask], beta=0.5)
    torch.testing.assert_close(chunked, direct)
    chunked.sum().backward()
    direct.sum().backward()
    torch.testing.assert_close(hs1.grad, hs2.grad)


@pytest.fixture(scope="module")
def teacher(task):  # noqa: F811
    """A teacher with the student's tokenizer that the student can reach: the student itself, sharpened
    (final norm x4, so every next-token distribution is peaked on the student's own preferred tokens)."""
    import shutil

    root = task[0]
    path = root / "teacher"
    shutil.copytree(root / "tiny", path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(path)
    return path


def test_the_reverse_kl_advantage_is_the_reverse_kl_gradient():
    """The reverse_kl loss (per-token advantage log π_T − log π_S on the student's own samples, through
    policy_loss_sum as the objective does) has, in expectation, the gradient of KL(π_S ‖ π_T): on one
    context with 7 tokens, 40k samples give the exact gradient's direction, and a step along it lowers the KL."""
    from posttrain.losses import policy_loss_sum

    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64) * 2, -1)
    s = torch.log_softmax(z, -1)
    exact = (s.exp() * (s - t)).sum()
    (g_exact,) = torch.autograd.grad(exact, z)
    y = torch.multinomial(s.detach().exp(), 40_000, replacement=True, generator=g)
    logps = torch.log_softmax(z, -1)[y][None]  # [1, K]: one "sequence" of K sampled tokens
    old = logps.detach()
    adv = t[y][None] - old  # log π_T − log π_S,old
    loss, _, _ = policy_loss_sum(logps, old, adv, torch.ones_like(old, dtype=torch.long))
    (g_sampled,) = torch.autograd.grad(loss / y.numel(), z)
    assert torch.nn.functional.cosine_similarity(g_sampled, g_exact, dim=0) > 0.99
    with torch.no_grad():
        s_next = torch.log_softmax(z - 0.5 * g_sampled, -1)
        assert (s_next.exp() * (s_next - t)).sum() < exact


def test_jsd_steps_move_the_student_towards_the_teacher():
    """A few gradient steps on the chunked JSD (β = 1: exact reverse KL) of a hidden-state student lower
    its KL to the teacher at every position."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 3, 8, generator=g)
    w_s = (torch.randn(13, 8, generator=g) * 0.1).requires_grad_()
    w_t = torch.randn(13, 8, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    teacher = HiddenHead(h, w_t, None)
    first = masked_jsd(HiddenHead(h, w_s, None), teacher, mask, 1.0).detach()
    opt = torch.optim.SGD([w_s], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        masked_jsd(HiddenHead(h, w_s, None), teacher, mask, 1.0, chunk_tokens=4).sum().backward()
        opt.step()
    last = masked_jsd(HiddenHead(h, w_s, None), teacher, mask, 1.0).detach()
    assert (last < first).all() and last.mean() < 0.7 * first.mean(), (first, last)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_distill_stage_runs_end_to_end(task, teacher, tmp_path, loss):  # noqa: F811
    cfg = config(task, tmp_path / loss, "distill", max_steps=3)
    cfg["distill"] = {"teacher": str(teacher), "loss": loss, "beta": 0.5, "reward_weight": 0.5}
    res = train(cfg)
    rows = read_metrics(res.run_dir)
    assert len(rows) == 3 and all(math.isfinite(m["loss"]) and m["teacher_kl"] > 0 for m in rows)
    assert all(("teacher_jsd" in m) == (loss == "jsd") for m in rows)
    AutoModelForCausalLM.from_pretrained(res.final)


def test_a_teacher_with_another_tokenizer_is_a_clear_error(task, teacher, tmp_path):  # noqa: F811
    from tests.chatml import chatml_tokenizer

    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(teacher).save_pretrained(other)
    chatml_tokenizer().save_pretrained(other)
    cfg = config(task, tmp_path / "bad", "distill", max_steps=1)
    cfg["distill"] = {"teacher": str(other)}
    with pytest.raises(ConfigError, match="tokenizer differs from the student's"):
        train(cfg)
