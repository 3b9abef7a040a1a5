"""Per-token log-probabilities and entropies from logits, without a full fp32 copy of the logits.

The naive `log_softmax(logits.float(), -1).gather(...)` allocates a [B, T, V] fp32 tensor (and autograd
keeps it for the backward pass). With V = 150k and B*T = 16k tokens that is ~10 GB, more than the model.
Here both functions walk the logits in chunks of about `chunk_tokens` tokens, upcast only the chunk to
fp32 and reduce it to one number per token at once (`logit[target] - logsumexp(logits)`).

Gradients flow through custom autograd functions that save only the [B, T] results and recompute each
chunk's softmax in the backward pass (the trick Liger-Kernel and torchtune's chunked losses use). The only
[B, T, V] tensor the backward pass allocates is the gradient itself, in the logits' dtype.

`head_logprobs` goes one step further and never builds the logits at all: from the last hidden states and
the output layer's weight it walks the vocabulary in chunks with an online logsumexp (Milakov & Gimelshein
2018, "Online normalizer calculation for softmax", arXiv:1805.02867), so at most [chunk_tokens,
chunk_vocab] fp32 logits exist at once, in the forward and the backward pass. This is the objectives'
path (`models.forward_hidden` gives it the hidden states); `token_logprobs` is the fallback for models
whose head is not a plain linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HeadStats",
    "HiddenHead",
    "entropy",
    "head_logprobs",
    "sum_by_example",
    "token_logprobs",
    "token_stats",
]


def token_logprobs(
    logits: Tensor, targets: Tensor, *, ignore_index: int = -100, chunk_tokens: int = 4096
) -> Tensor:
    """Log-probability of each target token under the logits.

    Args:
        logits: [B, T, V], any float dtype. May be a non-contiguous view (e.g. `logits[:, :-1]`). Or a
            `HiddenHead` (what a forward returns that kept the hidden states): then `head_logprobs`.
        targets: [B, T] token ids, already aligned: `logits[:, t]` predicts `targets[:, t]`.
        ignore_index: targets equal to this get log-probability 0.0 (and zero gradient).
        chunk_tokens: tokens upcast to fp32 at a time; bounds the extra memory to ~chunk_tokens * V floats.

    Returns:
        logps_BT: [B, T] float32, `log_softmax(logits)[b, t, targets[b, t]]`, 0.0 where ignored.
        Differentiable with respect to `logits`.
    """
    if isinstance(logits, HiddenHead):  # a forward that kept the hidden states instead of the logits
        return (
            token_stats(logits, targets).logps
            if ignore_index == -100
            else _head(logits, targets, ignore_index)
        )
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
    if isinstance(logits, HiddenHead):
        targets = torch.zeros(logits.hidden.shape[:2], dtype=torch.long, device=logits.hidden.device)
        return token_stats(logits, targets, with_entropy=True).entropy
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


def _head(out: HiddenHead, targets: Tensor, ignore_index: int) -> Tensor:
    return head_logprobs(
        out.hidden, out.weight, targets, bias=out.bias, temperature=out.temperature, ignore_index=ignore_index
    ).logps


class HeadStats(NamedTuple):
    """Per-token results of `head_logprobs`, each [B, T] (None where not asked for)."""

    logps: Tensor  # float32, differentiable
    entropy: Tensor | None  # float32, differentiable
    argmax: Tensor | None  # int64, the most likely token id


class HiddenHead(NamedTuple):
    """Last hidden states with the output layer that turns them into (temperature-scaled) logits: what a
    forward returns in place of [B, T, V] logits (`models.forward_head`, `rollout.buffer`)."""

    hidden: Tensor  # [B, T, H]
    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    temperature: float = 1.0


def token_stats(
    out: Tensor | HiddenHead, targets: Tensor, *, with_entropy: bool = False, with_argmax: bool = False
) -> HeadStats:
    """Per-token log-probs (and entropies, argmax) from either logits [B, T, V] or a `HiddenHead`: the one
    entry point of every objective, whichever form its forward produced."""
    if isinstance(out, HiddenHead):
        return head_logprobs(
            out.hidden, out.weight, targets, bias=out.bias, temperature=out.temperature,
            with_entropy=with_entropy, with_argmax=with_argmax,
        )  # fmt: skip
    return HeadStats(
        token_logprobs(out, targets),
        entropy(out) if with_entropy else None,
        out.argmax(-1) if with_argmax else None,
    )


def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    with_argmax: bool = False,
    chunk_tokens: int = 2048,
    chunk_vocab: int = 8192,
) -> HeadStats:
    """Log-probabilities of the targets (and the entropies) under `(hidden @ weight.T + bias) / temperature`,
    without building the [B, T, V] logits.

    The logits of a [chunk_tokens, chunk_vocab] block are computed in the weights' dtype (as the model's own
    head would), upcast to fp32 and folded into running max / sum-of-exp / sum-of-p·x statistics per
    token (online logsumexp); the backward pass recomputes each block and accumulates the gradients of the
    hidden states and of the weight block by block. Entropy: H = lse − E_p[x]. Gradients, with
    p = softmax(x), g the incoming gradients:

        ∂/∂x_v = g_logp · (1[v = y] − p_v) − g_H · p_v · (x_v − E_p[x])

    Args:
        hidden: [B, T, H] last hidden states (after the final norm), any float dtype; `hidden[:, t]`
            predicts `targets[:, t]`.
        weight: [V, H] the output layer's weight (tied or not); bias: [V] or None.
        targets: [B, T] token ids; `ignore_index` gives log-probability 0.0 and no gradient.
        temperature: the logits are divided by it (the sampling distribution of the rollout).
        with_entropy, with_argmax: also return the entropy / the argmax of each position.
        chunk_tokens, chunk_vocab: the block size; peak extra memory ~ 3 · chunk_tokens · chunk_vocab fp32.

    Returns:
        HeadStats(logps [B, T] float32, entropy [B, T] float32 or None, argmax [B, T] int64 or None).
    """
    if hidden.dim() != 3 or hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not align")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, H={hidden.shape[2]}], got {tuple(weight.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, H = hidden.shape
    logps, ent, argmax = _HeadLogprobs.apply(
        hidden.reshape(B * T, H), weight, bias, targets.reshape(B * T), ignore_index, float(temperature),
        with_entropy, max(1, chunk_tokens), max(1, chunk_vocab),
    )  # fmt: skip
    return HeadStats(
        logps.view(B, T),
        ent.view(B, T) if with_entropy else None,
        argmax.view(B, T) if with_argmax else None,
    )


def _block_logits(h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int, temperature: float):
    x = h @ weight[v0:v1].T
    if bias is not None:
        x = x + bias[v0:v1]
    x = x.float()
    return x / temperature if temperature != 1.0 else x


class _HeadLogprobs(torch.autograd.Function):
    """Blockwise log-softmax (and entropy) of the output layer; see `head_logprobs`."""

    @staticmethod
    def forward(ctx, h_NH, weight, bias, targets_N, ignore_index, temperature, with_entropy, ct, cv):
        N, V = h_NH.shape[0], weight.shape[0]
        valid_N = targets_N != ignore_index
        if valid_N.any() and (targets_N[valid_N].min() < 0 or targets_N[valid_N].max() >= V):
            raise ValueError(f"target ids outside the vocabulary [0, {V})")
        dev = h_NH.device
        lse_N = torch.empty(N, dtype=torch.float32, device=dev)
        picked_N = torch.zeros(N, dtype=torch.float32, device=dev)
        mean_x_N = torch.zeros(N, dtype=torch.float32, device=dev)
        argmax_N = torch.zeros(N, dtype=torch.long, device=dev)
        with torch.no_grad():
            for n0 in range(0, N, ct):
                h, y = h_NH[n0 : n0 + ct], targets_N[n0 : n0 + ct]
                m = torch.full((len(h),), -math.inf, device=dev)
                s = torch.zeros(len(h), device=dev)
                t = torch.zeros(len(h), device=dev)  # Σ exp(x − m)·x, for E_p[x]
                best = torch.zeros(len(h), dtype=torch.long, device=dev)
                for v0 in range(0, V, cv):
                    x = _block_logits(h, weight, bias, v0, min(v0 + cv, V), temperature)
                    block_max, block_arg = x.max(-1)
                    new_m = torch.maximum(m, block_max)
                    best = torch.where(block_max > m, block_arg + v0, best)
                    scale = torch.exp(m - new_m)  # exp(−inf) = 0 on the first block
                    e = torch.exp(x - new_m[:, None])
                    s = s * scale + e.sum(-1)
                    if with_entropy:  # where(): a −inf logit has p = 0 and adds 0, not 0·inf
                        t = t * scale + torch.where(e > 0, e * x, 0.0).sum(-1)
                    m = new_m
                    inside = (y >= v0) & (y < v0 + x.shape[1])
                    idx = (y - v0).clamp(0, x.shape[1] - 1)
                    picked_N[n0 : n0 + ct] += torch.where(inside, x.gather(1, idx[:, None]).squeeze(1), 0.0)
                lse_N[n0 : n0 + ct] = m + torch.log(s)
                mean_x_N[n0 : n0 + ct] = t / s
                argmax_N[n0 : n0 + ct] = best
        logps_N = torch.where(valid_N, picked_N - lse_N, 0.0)
        entropy_N = lse_N - mean_x_N if with_entropy else torch.zeros_like(lse_N)
        ctx.save_for_backward(h_NH, weight, bias, targets_N, valid_N, lse_N, mean_x_N)
        ctx.opts = (temperature, ct, cv)
        ctx.mark_non_differentiable(argmax_N)
        return logps_N, entropy_N, argmax_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp_N, g_ent_N, _g_argmax):
        h_NH, weight, bias, targets_N, valid_N, lse_N, mean_x_N = ctx.saved_tensors
        temperature, ct, cv = ctx.opts
        N, V = h_NH.shape[0], weight.shape[0]
        g_logp_N = torch.zeros(N, device=h_NH.device) if g_logp_N is None else g_logp_N.float() * valid_N
        use_ent = g_ent_N is not None and bool(g_ent_N.any())
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros(h_NH.shape, dtype=torch.float32, device=h_NH.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        # Vocabulary blocks outside, tokens inside: each weight block's gradient is complete (fp32) before
        # it is written back in the weight's dtype.
        for v0 in range(0, V, cv):
            v1 = min(v0 + cv, V)
            gw = torch.zeros((v1 - v0, weight.shape[1]), dtype=torch.float32, device=weight.device)
            gb = torch.zeros(v1 - v0, dtype=torch.float32, device=weight.device)
            for n0 in range(0, N, ct):
                h = h_NH[n0 : n0 + ct]
                x = _block_logits(h, weight, bias, v0, v1, temperature)
                p = torch.exp(x - lse_N[n0 : n0 + ct, None])
                g = g_logp_N[n0 : n0 + ct]
                gx = -p * g[:, None]
                y = targets_N[n0 : n0 + ct]
                inside = (y >= v0) & (y < v1) & valid_N[n0 : n0 + ct]
                rows = inside.nonzero().squeeze(1)
                gx[rows, y[rows] - v0] += g[rows]
                if use_ent:
                    centred = x - mean_x_N[n0 : n0 + ct, None]
                    gx -= torch.where(p > 0, p * centred, 0.0) * g_ent_N[n0 : n0 + ct, None].float()
                if temperature != 1.0:
                    gx = gx / temperature
                gx = gx.to(h.dtype)
                if need_h:
                    grad_h[n0 : n0 + ct] += (gx @ weight[v0:v1]).float()
                if need_w:
                    gw += (gx.T @ h).float()
                if need_b:
                    gb += gx.float().sum(0)
            if need_w:
                grad_w[v0:v1] = gw.to(weight.dtype)
            if need_b:
                grad_b[v0:v1] = gb.to(bias.dtype)
        if grad_h is not None:
            grad_h = grad_h.to(h_NH.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None
