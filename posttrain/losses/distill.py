"""Distillation divergences between a student's and a teacher's next-token distributions.

Shapes: any leading dims (`...`), V the vocabulary; the result has the leading dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["generalized_jsd"]


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 1.0) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD: Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649 (Eq. 1). With p_S, p_T the
    softmax of each and the mixture m = β·p_T + (1 − β)·p_S:

        JSD_β = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m)

    β = 0 and β = 1 are taken as their limits as TRL 1.16 does (GKDTrainer.generalized_jsd_loss,
    DistillationTrainer's `beta`): β = 0 is the forward KL(p_T ‖ p_S), β = 1 the reverse KL(p_S ‖ p_T),
    the mode-seeking divergence of on-policy distillation (the default there and here).

    Args:
        student_logits: [..., V] (differentiable).
        teacher_logits: [..., V] (treated as constants).
        beta: in [0, 1].

    Returns:
        [...] float32 divergence per position.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (same tokenizer and vocabulary needed)"
        )
    s = torch.log_softmax(student_logits.float(), -1)
    t = torch.log_softmax(teacher_logits.detach().float(), -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
