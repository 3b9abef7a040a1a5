"""Sequence-level offline losses outside the DPO family (losses/preference.py): the reward model's
Bradley–Terry loss and KTO, each on per-example [B] tensors, returning a per-example loss [B] (the caller
takes the mean); and the [B] shape check every sequence-level loss makes. Where the maths is the same, the
numbers are TRL's (tests/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_same_shape", "kto_loss", "reward_loss"]


def check_same_shape(**tensors: Tensor) -> None:
    """Every sequence-level loss takes per-example tensors of one shape [B]."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected tensors of the same shape [B], got {shapes}")


# ---------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------


def reward_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, *, margin: Tensor | float | None = None
) -> Tensor:
    """Bradley–Terry loss of a reward model: −log σ(s_c − s_r − m).

    Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
    arXiv:2203.02155 (Eq. 1). The margin m (how much better the chosen answer was rated) is from Touvron et
    al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288 (Eq. 2). Same as TRL's
    RewardTrainer (without its optional centring term, which is not per-example).

    Args:
        chosen_scores: [B] scalar reward of each chosen completion.
        rejected_scores: [B] scalar reward of each rejected completion.
        margin: None (0), a float, or [B] per-pair margins.

    Returns:
        loss_B: [B].
    """
    check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff_B = chosen_scores - rejected_scores
    if margin is not None:
        diff_B = diff_B - margin
    return -F.logsigmoid(diff_B)


# ---------------------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_estimate: Tensor | float,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """KTO loss on unpaired completions, each labelled desirable or undesirable.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306
    (Eq. 7): with r = π − ref and z = max(0, kl_estimate),

        desirable:    λ_D · (1 − σ(β·(r − z)))
        undesirable:  λ_U · (1 − σ(β·(z − r)))

    z is the paper's reference point z_ref: the caller estimates KL(π‖ref) on mismatched pairs (each prompt
    with another example's completion), as mean(π(y'|x) − ref(y'|x)) over the batch. Here it is detached
    (no gradient flows through it, as in the paper and TRL) and clamped at 0 (the paper's max(0, ·)), so a
    caller may pass the raw estimate. The mean of the result equals TRL's KTO loss (TRL concatenates the
    desirable then the undesirable losses; here they stay in batch order).

    Args:
        policy_logps: [B] summed log-probs of each completion under the policy.
        ref_logps: [B] the same under the reference model.
        labels: [B] bool (or 0/1): True where the completion is desirable.
        kl_estimate: float, 0-d tensor or [B] tensor.
        beta: β, the strength of the KL regularisation (TRL's default: 0.1).
        desirable_weight, undesirable_weight: λ_D, λ_U (the paper balances them so that
            λ_D·n_D / (λ_U·n_U) lies in [1, 4/3]).

    Returns:
        loss_B: [B].
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    z = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device)
    z = z.detach().clamp(min=0)
    logratio_B = policy_logps - ref_logps
    desirable_B = desirable_weight * (1 - torch.sigmoid(beta * (logratio_B - z)))
    undesirable_B = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratio_B)))
    return torch.where(labels.bool(), desirable_B, undesirable_B)
