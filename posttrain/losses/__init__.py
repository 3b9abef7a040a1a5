"""Pure loss functions, in two files of one idea each:

- `losses.preference`: sequence-level offline losses on [B] summed log-probs: `reward_loss` (Bradley–Terry),
  `kto_loss`, and `preference_loss(kind, ...)` for the DPO family (sigmoid, ipo, ..., simpo, orpo).
- `losses.policy`: token-level online losses on [B, T]: `policy_loss` / `policy_loss_sum` (PPO, GRPO, DAPO,
  Dr. GRPO) and `value_loss` / `value_loss_sum` (PPO), with `loss_units`, the one place their denominators
  are counted.

The names DESIGN.md lists as stable are importable from here: `from posttrain.losses import preference_loss`.
"""

from posttrain.losses.policy import (
    POLICY_AGGREGATIONS,
    loss_units,
    policy_loss,
    policy_loss_sum,
    value_loss,
    value_loss_sum,
)
from posttrain.losses.preference import (
    PREFERENCE_KINDS,
    REFERENCE_FREE_KINDS,
    kind_option_defaults,
    kind_options,
    kto_loss,
    preference_loss,
    preference_rewards,
    reward_loss,
)

__all__ = [
    "POLICY_AGGREGATIONS",
    "PREFERENCE_KINDS",
    "REFERENCE_FREE_KINDS",
    "kind_option_defaults",
    "kind_options",
    "kto_loss",
    "loss_units",
    "policy_loss",
    "policy_loss_sum",
    "preference_loss",
    "preference_rewards",
    "reward_loss",
    "value_loss",
    "value_loss_sum",
]
