"""PPO's clipped value loss, in the same summed-loss-and-units form as the policy loss (`losses.policy`).

Shapes: B sequences, T completion positions; `_BT` tensors are [B, T].
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.policy import loss_units

__all__ = ["value_loss", "value_loss_sum"]


def value_loss_sum(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> tuple[Tensor, float, dict[str, Tensor]]:
    """The clipped value loss of a micro-batch, summed over its valid tokens; see `value_loss`.

    Returns:
        (loss_sum, units, metric_sums): units = valid tokens; metric_sums = {"clip_fraction": number of
        tokens where the clipped error was the larger one (the value gets no gradient there)}.
    """
    if values.dim() != 2 or any(t.shape != values.shape for t in (old_values, returns, mask)):
        shapes = {"values": values, "old_values": old_values, "returns": returns, "mask": mask}
        shapes = {n: tuple(t.shape) for n, t in shapes.items()}
        raise ValueError(f"value loss: expected tensors of the same shape [B, T], got {shapes}")
    if clip is not None and clip < 0:
        raise ValueError(f"value loss: clip must be >= 0 or None, got {clip}")
    valid = mask.bool()
    returns = returns.detach()
    error_BT = (values - returns).pow(2)
    clipped_BT = torch.zeros_like(error_BT, dtype=torch.bool)
    if clip is not None:
        old_values = old_values.detach()
        clipped_values_BT = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error_BT = (clipped_values_BT - returns).pow(2)
        clipped_BT = clipped_error_BT > error_BT
        error_BT = torch.maximum(error_BT, clipped_error_BT)
    loss_sum = 0.5 * torch.where(valid, error_BT, 0.0).sum()
    metric_sums = {"clip_fraction": (clipped_BT & valid).sum().to(error_BT.dtype).detach()}
    return loss_sum, loss_units(mask, "token_mean"), metric_sums


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> Tensor:
    """PPO's clipped value loss, averaged over the valid tokens of the batch.

        ℓ_t = ½ · max((V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)²)

    The clipped term keeps the value head from moving more than c from the values seen at rollout time, as
    in OpenAI baselines' PPO2 and TRL's former PPO trainer (`cliprange_value`, 0.2); Schulman et al. 2017
    (arXiv:1707.06347) state the unclipped squared error. clip=None gives ½·(V_t − R_t)². returns and
    old_values are constants (detached here).

    Args:
        values: [B, T] current value-head outputs (differentiable).
        old_values: [B, T] value-head outputs at rollout time.
        returns: [B, T] regression targets (from `posttrain.advantages.gae`).
        mask: [B, T] 1 on completion tokens.
        clip: c ≥ 0, or None.

    Returns:
        loss: 0-d tensor with gradient.
    """
    loss_sum, units, _ = value_loss_sum(values, old_values, returns, mask, clip=clip)
    if units == 0:
        raise ValueError("value_loss: the mask holds no valid token, there is nothing to average")
    return loss_sum / units
