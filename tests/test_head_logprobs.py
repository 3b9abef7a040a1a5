"""head_logprobs: log-probs, entropies and argmax from hidden states in vocabulary blocks, against the full
`log_softmax(h @ W.T + b).gather(...)`, values and gradients, to 1e-5."""

from __future__ import annotations

import pytest
import torch

from posttrain.logprobs import head_logprobs


def reference(h, w, b, targets, temperature=1.0, ignore_index=-100):
    """The full-logits computation, in float64: the exact numbers both fp32 paths approximate."""
    logits = (h @ w.T + (0 if b is None else b)) / temperature
    logp_all = torch.log_softmax(logits, -1)
    valid = targets != ignore_index
    logps = logp_all.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logps, 0.0), ent, logits.argmax(-1)


def inputs(seed=0, B=3, T=5, H=16, V=37, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g) * 2
    w = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 1] = targets[2, 4] = -100
    return h, w, b, targets


@pytest.mark.parametrize("chunks", [(1, 5), (4, 7), (2048, 8192), (3, 37), (15, 36)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_full_log_softmax_with_gradients(chunks, temperature, bias):
    h, w, b, targets = inputs(bias=bias)
    ga, gb = torch.randn(2, *targets.shape, generator=torch.Generator().manual_seed(9))
    leaves = [t.double().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    ref_logps, ref_ent, ref_arg = reference(*leaves[:2], leaves[2] if bias else None, targets, temperature)
    ((ref_logps * ga).sum() + (ref_ent * gb).sum()).backward()
    ref_grads = [t.grad for t in leaves]

    ours_leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    out = head_logprobs(
        ours_leaves[0], ours_leaves[1], targets, bias=ours_leaves[2] if bias else None, temperature=temperature,
        with_entropy=True, with_argmax=True, chunk_tokens=chunks[0], chunk_vocab=chunks[1],
    )  # fmt: skip
    torch.testing.assert_close(out.logps, ref_logps.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_ent.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax, ref_arg)
    assert (out.logps[targets == -100] == 0).all()
    ((out.logps * ga).sum() + (out.entropy * gb).sum()).backward()
    for ours, ref in zip((t.grad for t in ours_leaves), ref_grads):
        torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)


def test_many_vocabulary_blocks():
    """16 blocks of 64 over V = 1000, as a 150k vocabulary in blocks of 8192 has 19: still 1e-5."""
    h, w, b, targets = inputs(seed=4, B=4, T=6, H=32, V=1000)
    ref_logps, ref_ent, _ = reference(h.double(), w.double(), b.double(), targets)
    out = head_logprobs(h, w, targets, bias=b, with_entropy=True, chunk_tokens=8, chunk_vocab=64)
    torch.testing.assert_close(out.logps, ref_logps.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_ent.float(), atol=1e-5, rtol=1e-5)


def test_logps_only_and_no_grad_on_ignored_positions():
    h, w, b, targets = inputs(seed=1)
    h = h.requires_grad_()
    out = head_logprobs(h, w, targets, bias=b, chunk_tokens=4, chunk_vocab=10)
    assert out.entropy is None and out.argmax is None
    out.logps.sum().backward()
    assert (h.grad[0, 1] == 0).all() and (h.grad[2, 4] == 0).all() and h.grad.abs().sum() > 0


def test_gradcheck_float64():
    h, w, b, targets = inputs(seed=2, B=3, T=5, H=4, V=9)
    h, w, b = (t.double().requires_grad_() for t in (h, w, b))

    def f(h, w, b):
        out = head_logprobs(h, w, targets, bias=b, with_entropy=True, chunk_tokens=2, chunk_vocab=4)
        return out.logps, out.entropy

    # the statistics are fp32 by design: check the gradient formula at fp32-level tolerances
    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_bfloat16_close_to_fp32():
    h, w, b, targets = inputs(seed=3, V=300)
    full = head_logprobs(h, w, targets, bias=b).logps
    half = head_logprobs(h.bfloat16(), w.bfloat16(), targets, bias=b.bfloat16(), chunk_vocab=64).logps
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.2  # bf16 logits: ~3 significant digits


def test_errors():
    h, w, b, targets = inputs()
    with pytest.raises(ValueError, match="align"):
        head_logprobs(h, w, targets[:, :2])
    with pytest.raises(ValueError, match="weight"):
        head_logprobs(h, w[:, :3], targets)
    bad = targets.clone()
    bad[0, 0] = 37
    with pytest.raises(ValueError, match="vocabulary"):
        head_logprobs(h, w, bad)
