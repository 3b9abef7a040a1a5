"""Chunked token logprobs and entropy against the naive full log_softmax."""

from __future__ import annotations

import pytest
import torch

from posttrain.logprobs import entropy, token_logprobs

V = 50


def naive_logprobs(logits, targets, ignore_index=-100):
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return picked * valid


def naive_entropy(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def make_inputs(B=3, T=7, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=gen)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, :2] = -100
    targets[2, -1] = -100
    return logits, targets


# chunk sizes: smaller than T, not dividing B*T, several rows per chunk, everything in one chunk
CHUNKS = [1, 3, 5, 8, 15, 4096]


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
def test_logprobs_match_naive_fp32(chunk_tokens):
    logits, targets = make_inputs()
    got = token_logprobs(logits, targets, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    torch.testing.assert_close(got, naive_logprobs(logits, targets), atol=1e-6, rtol=0)
    assert (got[targets == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_match_naive_half_precision(dtype):
    logits, targets = make_inputs(dtype=dtype)
    got = token_logprobs(logits, targets, chunk_tokens=5)
    assert got.dtype == torch.float32
    # Same fp32 maths on the same (rounded) inputs: agrees with the fp32 reference almost exactly ...
    torch.testing.assert_close(got, naive_logprobs(logits, targets), atol=1e-5, rtol=0)
    # ... and with the unrounded logits to half-precision tolerance.
    exact, _ = make_inputs(dtype=torch.float32)
    torch.testing.assert_close(got, naive_logprobs(exact, targets), atol=0.1, rtol=0.02)


def test_custom_ignore_index():
    logits, targets = make_inputs()
    targets = torch.where(targets == -100, 7, targets)
    got = token_logprobs(logits, targets, ignore_index=7)
    assert (got[targets == 7] == 0).all()
    torch.testing.assert_close(got, naive_logprobs(logits, targets, ignore_index=7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [3, 4096])
def test_logprobs_gradient_matches_naive(chunk_tokens):
    logits, targets = make_inputs()
    weights = torch.randn(targets.shape)  # a non-uniform upstream gradient
    a = logits.clone().requires_grad_()
    (token_logprobs(a, targets, chunk_tokens=chunk_tokens) * weights).sum().backward()
    b = logits.clone().requires_grad_()
    (naive_logprobs(b, targets) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    assert (a.grad[targets == -100] == 0).all()


def test_logprobs_gradient_in_bf16_keeps_dtype():
    logits, targets = make_inputs(dtype=torch.bfloat16)
    a = logits.clone().requires_grad_()
    token_logprobs(a, targets, chunk_tokens=4).sum().backward()
    b = logits.clone().requires_grad_()
    naive_logprobs(b, targets).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=1e-2, rtol=1e-2)


def test_non_contiguous_logits_view():
    # The usual call: logits[:, :-1] against input_ids[:, 1:] -- a view that cannot be flattened for free.
    logits, targets = make_inputs(T=8)
    view = logits[:, :-1]
    assert not view.is_contiguous()
    got = token_logprobs(view, targets[:, 1:], chunk_tokens=4)
    torch.testing.assert_close(got, naive_logprobs(view, targets[:, 1:]), atol=1e-6, rtol=0)


def test_shape_mismatch_is_an_error():
    logits, targets = make_inputs()
    with pytest.raises(ValueError, match="do not align"):
        token_logprobs(logits[:, 1:], targets)


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
def test_entropy_matches_naive(chunk_tokens):
    logits, _ = make_inputs()
    got = entropy(logits, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float32 and got.shape == logits.shape[:2]
    torch.testing.assert_close(got, naive_entropy(logits), atol=1e-5, rtol=0)


def test_entropy_gradient_matches_naive():
    logits, _ = make_inputs()
    weights = torch.randn(logits.shape[:2])
    a = logits.clone().requires_grad_()
    (entropy(a, chunk_tokens=4) * weights).sum().backward()
    b = logits.clone().requires_grad_()
    (naive_entropy(b) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_entropy_with_masked_vocabulary_is_finite():
    logits, _ = make_inputs()
    logits[..., V // 2 :] = float("-inf")
    a = logits.clone().requires_grad_()
    got = entropy(a)
    got.sum().backward()
    torch.testing.assert_close(got, naive_entropy(logits[..., : V // 2]), atol=1e-5, rtol=0)
    assert torch.isfinite(a.grad).all()


def test_uniform_logits_have_known_values():
    logits = torch.zeros(2, 3, V)
    targets = torch.zeros(2, 3, dtype=torch.long)
    expected = torch.full((2, 3), -torch.log(torch.tensor(float(V))).item())
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    torch.testing.assert_close(entropy(logits), -expected)


@pytest.mark.parametrize("fn", [token_logprobs, entropy], ids=["logprobs", "entropy"])
def test_backward_keeps_no_fp32_copy_of_the_logits(fn):
    # Memory check by construction: autograd holds only the caller's logits (no copy) and [B, T] tensors,
    # where the naive version holds a full [B, T, V] fp32 log_softmax.
    logits, targets = make_inputs(dtype=torch.bfloat16)
    logits.requires_grad_()
    out = fn(logits, targets) if fn is token_logprobs else fn(logits)
    saved = out.grad_fn.saved_tensors
    big = [s for s in saved if s.numel() > targets.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr() and big[0].dtype == torch.bfloat16
