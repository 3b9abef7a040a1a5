"""Per-token log-probabilities and entropies from logits, without a full fp32 copy of the logits.

The naive `log_softmax(logits.float(), -1).gather(...)` allocates a [B, T, V] fp32 tensor (and autograd
keeps it for the backward pass). With V = 150k and B*T = 16k tokens that is ~10 GB, more than the model.
Here both functions walk the logits in chunks of about `chunk_tokens` tokens, upcast only the chunk to
fp32 and reduce it to one number per token at once (`logit[target] - logsumexp(logits)`).

Gradients flow through custom autograd functions that save only the [B, T] results and recompute each
chunk's softmax in the backward pass (the trick Liger-Kernel and torchtune's chunked losses use). The only
[B, T, V] tensor the backward pass allocates is the gradient itself, in the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["token_logprobs", "entropy", "sum_by_example"]


def token_logprobs(
    logits: Tensor, targets: Tensor, *, ignore_index: int = -100, chunk_tokens: int = 4096
) -> Tensor:
    """Log-probability of each target token under the logits.

    Args:
        logits: [B, T, V], any float dtype. May be a non-contiguous view (e.g. `logits[:, :-1]`).
        targets: [B, T] token ids, already aligned: `logits[:, t]` predicts `targets[:, t]`.
        ignore_index: targets equal to this get log-probability 0.0 (and zero gradient).
        chunk_tokens: tokens upcast to fp32 at a time; bounds the extra memory to ~chunk_tokens * V floats.

    Returns:
        logps_BT: [B, T] float32, `log_softmax(logits)[b, t, targets[b, t]]`, 0.0 where ignored.
        Differentiable with respect to `logits`.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not align")
    return _TokenLogprobs.apply(logits, targets, ignore_index, chunk_tokens)


def entropy(logits: Tensor, *, chunk_tokens: int = 4096) -> Tensor:
    """Entropy of the next-token distribution at every position.

    Args:
        logits: [B, T, V], any float dtype.
        chunk_tokens: as in `token_logprobs`.

    Returns:
        entropy_BT: [B, T] float32, `-(p * log p).sum(-1)` with `p = softmax(logits)`. Differentiable.
    """
    return _Entropy.apply(logits, chunk_tokens)


def _chunks(B: int, T: int, chunk_tokens: int) -> Iterator[tuple[slice, slice]]:
    """Index pairs (rows, times) covering [B, T] in blocks of at most ~chunk_tokens tokens.

    Chunking over (rows, time) slices instead of a flattened [B*T, V] view keeps every chunk a view of
    the caller's tensor even when it is not contiguous (a flatten would silently copy all of it).
    """
    chunk_tokens = max(1, chunk_tokens)
    if T == 0:
        return
    if T <= chunk_tokens:
        rows = chunk_tokens // T
        for b0 in range(0, B, rows):
            yield slice(b0, b0 + rows), slice(None)
    else:
        for b in range(B):
            for t0 in range(0, T, chunk_tokens):
                yield slice(b, b + 1), slice(t0, t0 + chunk_tokens)


class _TokenLogprobs(torch.autograd.Function):
    """logp[t] = x[t, y_t] - logsumexp(x[t]);  d logp[t] / d x[t, v] = 1[v = y_t] - softmax(x[t])_v."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int, chunk_tokens: int) -> Tensor:
        B, T, _ = logits.shape
        valid_BT = targets != ignore_index
        safe_targets_BT = torch.where(valid_BT, targets, 0)  # any in-range id; masked out below
        logps_BT = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
        lse_BT = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
        for rows, times in _chunks(B, T, chunk_tokens):
            x = logits[rows, times].float()  # the only fp32 copy: one chunk
            lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, safe_targets_BT[rows, times].unsqueeze(-1)).squeeze(-1)
            logps_BT[rows, times] = picked - lse
            lse_BT[rows, times] = lse
        logps_BT = logps_BT.masked_fill(~valid_BT, 0.0)
        # Saved: the caller's logits (no copy) and two [B, T] tensors; the softmax is recomputed in backward.
        ctx.save_for_backward(logits, safe_targets_BT, valid_BT, lse_BT)
        ctx.chunk_tokens = chunk_tokens
        return logps_BT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BT: Tensor):
        logits, targets_BT, valid_BT, lse_BT = ctx.saved_tensors
        B, T, _ = logits.shape
        grad_BT = grad_BT.float() * valid_BT  # ignored positions get no gradient
        grad_logits = torch.empty_like(logits)
        for rows, times in _chunks(B, T, ctx.chunk_tokens):
            g = grad_BT[rows, times].unsqueeze(-1)
            probs = torch.exp(logits[rows, times].float() - lse_BT[rows, times].unsqueeze(-1))
            chunk_grad = -probs * g
            chunk_grad.scatter_add_(-1, targets_BT[rows, times].unsqueeze(-1), g)
            grad_logits[rows, times] = chunk_grad.to(logits.dtype)
        return grad_logits, None, None, None


class _Entropy(torch.autograd.Function):
    """H = lse - E_p[x];  dH / dx_v = -p_v * (x_v - E_p[x])."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_tokens: int) -> Tensor:
        B, T, _ = logits.shape
        entropy_BT = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
        lse_BT = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
        for rows, times in _chunks(B, T, chunk_tokens):
            x = logits[rows, times].float()
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            probs = torch.exp(x - lse)
            # where(): a -inf logit (masked vocabulary) has p = 0 and contributes 0, not 0 * inf = nan.
            p_logp = torch.where(probs > 0, probs * (x - lse), 0.0)
            entropy_BT[rows, times] = -p_logp.sum(-1)
            lse_BT[rows, times] = lse.squeeze(-1)
        ctx.save_for_backward(logits, lse_BT, entropy_BT)
        ctx.chunk_tokens = chunk_tokens
        return entropy_BT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BT: Tensor):
        logits, lse_BT, entropy_BT = ctx.saved_tensors
        B, T, _ = logits.shape
        grad_BT = grad_BT.float()
        mean_logit_BT = lse_BT - entropy_BT  # E_p[x] = lse - H
        grad_logits = torch.empty_like(logits)
        for rows, times in _chunks(B, T, ctx.chunk_tokens):
            x = logits[rows, times].float()
            probs = torch.exp(x - lse_BT[rows, times].unsqueeze(-1))
            centred = x - mean_logit_BT[rows, times].unsqueeze(-1)
            chunk_grad = -torch.where(probs > 0, probs * centred, 0.0) * grad_BT[rows, times].unsqueeze(-1)
            grad_logits[rows, times] = chunk_grad.to(logits.dtype)
        return grad_logits, None


def sum_by_example(values: Tensor, example_index: Tensor, num_examples: int) -> Tensor:
    """Sum per-token values into per-example totals, for padded and packed batches alike.

    Args:
        values: [R, L] per-token values (e.g. `token_logprobs`, 0 where not a loss token).
        example_index: [R, L] which example each token belongs to, -1 on padding (from `collate`).
        num_examples: N.

    Returns:
        [N] float32 sums, differentiable with respect to `values`.
    """
    keep = example_index >= 0
    out = torch.zeros(num_examples, dtype=torch.float32, device=values.device)
    return out.index_add(0, example_index[keep], values[keep].float())
