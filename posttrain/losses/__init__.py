"""Pure loss functions, one idea a file:

- `losses.preference`: `preference_loss(kind, ...)` for the DPO family (sigmoid, ipo, ..., simpo, orpo) on [B]
  summed log-probs; `losses.sequence`: the other sequence-level offline losses, `reward_loss` (Bradley–Terry)
  and `kto_loss`.
- `losses.policy`: token-level online losses on [B, T]: `policy_loss` / `policy_loss_sum` (PPO, GRPO, DAPO,
  Dr. GRPO, GSPO, LUSPO, CISPO, SAPO as options), with `loss_units`, the one place their denominators are
  counted; `losses.masks`: the token multipliers it takes (off-policy sequence mask, top-entropy tokens,
  sampler-mismatch importance weights); `losses.distill`: GKD's generalised JSD; `losses.value`: `value_loss` / `value_loss_sum` (PPO).

The names DESIGN.md lists as stable are importable from here: `from posttrain.losses import preference_loss`.
"""

from posttrain.losses.distill import generalized_jsd
from posttrain.losses.masks import (
    IS_MODES,
    entropy_threshold,
    high_entropy_mask,
    importance_weights,
    mismatch_stats,
    off_policy_mask,
)
from posttrain.losses.policy import (
    IMPORTANCE_LEVELS,
    POLICY_AGGREGATIONS,
    POLICY_KINDS,
    loss_units,
    policy_loss,
    policy_loss_sum,
)
from posttrain.losses.preference import (
    PREFERENCE_KINDS,
    REFERENCE_FREE_KINDS,
    kind_option_defaults,
    kind_options,
    preference_loss,
    preference_rewards,
)
from posttrain.losses.sequence import kto_loss, reward_loss
from posttrain.losses.value import value_loss, value_loss_sum

__all__ = [
    "IMPORTANCE_LEVELS",
    "IS_MODES",
    "POLICY_AGGREGATIONS",
    "POLICY_KINDS",
    "entropy_threshold",
    "generalized_jsd",
    "high_entropy_mask",
    "importance_weights",
    "mismatch_stats",
    "off_policy_mask",
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
