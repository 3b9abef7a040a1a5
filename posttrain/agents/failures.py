"""The failure taxonomy: one primary label per episode, and what the loss does with it.

Labels are ``class.kind``. Policy and budget failures are the policy's own doing: they stay in the loss
with their (zero) reward, which is how the policy learns not to repeat them. Infrastructure, data and
tokenization failures are not: a sandbox that would not start says nothing about the policy, so those
episodes are masked out of the loss *and* out of the group baseline (a masked sample left in a GRPO
group's mean and std would bias every other sample's advantage).

    label                       class         raised by
    format.no_action            policy        env: a turn with no tool call
    format.parse_error          policy        format: invalid JSON, unclosed or malformed call
    format.forged_observation   policy        runner: the policy wrote the tool-result wrapper itself
    tool.unknown / tool.bad_args policy       format: unknown name / arguments not matching the schema
    tool.error                  policy        env: the tool raised (bad SQL, missing file); recoverable
    loop.repeat                 policy        runner: the same call `max_repeats` times in a row
    answer.wrong / answer.none  policy        grade: wrong answer / none given
    hack.attempt                policy        env guards / grade: touched what it must not
    budget.turns|tool_calls|context|tokens|time  budget   runner
    infra.engine|env|sandbox|grader              infra    runner (exceptions outside the policy's control)
    data.task_invalid           data          env: unusable task row
    tokenization.drift          tokenization  runner: the re-rendered conversation differs from the ids
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from posttrain.advantages import group_advantages

LABELS: dict[str, str] = {
    "format.no_action": "policy",
    "format.parse_error": "policy",
    "format.forged_observation": "policy",
    "tool.unknown": "policy",
    "tool.bad_args": "policy",
    "tool.error": "policy",
    "loop.repeat": "policy",
    "answer.wrong": "policy",
    "answer.none": "policy",
    "hack.attempt": "policy",
    "budget.turns": "budget",
    "budget.tool_calls": "budget",
    "budget.context": "budget",
    "budget.tokens": "budget",
    "budget.time": "budget",
    "infra.engine": "infra",
    "infra.env": "infra",
    "infra.sandbox": "infra",
    "infra.grader": "infra",
    "data.task_invalid": "data",
    "tokenization.drift": "tokenization",
}
"""Every label and its class."""

LOSS_POLICY: dict[str, str] = {
    "policy": "keep",
    "budget": "keep",
    "infra": "mask",
    "data": "mask",
    "tokenization": "mask",
}
"""Default loss policy per class: ``keep`` (in the loss, with its reward) or ``mask`` (out of the loss
and the baseline). A per-label entry in a caller's policy (``{"budget.time": "mask"}``) overrides its
class."""

STOP_LABELS: dict[str, str | None] = {
    "env_done": None,
    "no_action": "format.no_action",
    "forged_observation": "format.forged_observation",
    "loop": "loop.repeat",
    "max_turns": "budget.turns",
    "max_tool_calls": "budget.tool_calls",
    "context": "budget.context",
    "max_new_tokens": "budget.tokens",
    "tool_time": "budget.time",
    "episode_time": "budget.time",
    "engine_error": "infra.engine",
    "env_error": "infra.env",
    "task_invalid": "data.task_invalid",
}
"""Each stop reason of the runner and the label it implies (None: a normal end)."""

# Which label is the episode's primary failure when several happened: the masked classes first (an
# episode with a broken sandbox is not evidence about the policy), then hacks (they must alert even
# when something else also went wrong), then what ended the episode, then the grade, then the
# recoverable step errors.
_PRECEDENCE = (
    "infra.sandbox",
    "infra.grader",
    "infra.engine",
    "infra.env",
    "data.task_invalid",
    "tokenization.drift",
    "hack.attempt",
    "format.forged_observation",
    "budget.turns",
    "budget.tool_calls",
    "budget.context",
    "budget.tokens",
    "budget.time",
    "loop.repeat",
    "format.no_action",
    "answer.wrong",
    "answer.none",
    "format.parse_error",
    "tool.unknown",
    "tool.bad_args",
    "tool.error",
)
_SURVIVES_SUCCESS = {
    "tokenization.drift",
    "infra.engine",
    "infra.env",
    "infra.sandbox",
    "infra.grader",
    "data.task_invalid",
    "hack.attempt",
    "format.forged_observation",
}


def label_class(label: str) -> str:
    if label not in LABELS:
        raise ValueError(f"unknown failure label {label!r}; known: {', '.join(LABELS)}")
    return LABELS[label]


def is_masked(label: str | None, policy: dict[str, str] | None = None) -> bool:
    """True if an episode with this primary label leaves the loss and the baseline."""
    if label is None:
        return False
    policy = {**LOSS_POLICY, **(policy or {})}
    action = policy.get(label, policy[label_class(label)])
    if action not in ("keep", "mask"):
        raise ValueError(f"loss policy for {label!r} must be 'keep' or 'mask', got {action!r}")
    return action == "mask"


def primary_failure(events: Iterable[str], passed: bool) -> str | None:
    """The one label that describes an episode: the highest-precedence event; none when the task was
    passed, unless an event that outranks success happened (masked classes, hacks, forgeries)."""
    seen = set(events)
    for label in seen:
        label_class(label)  # an unknown label is a bug in an environment: say so
    for label in _PRECEDENCE:
        if label in seen and (not passed or label in _SURVIVES_SUCCESS):
            return label
    return None


def masked_group_advantages(
    rewards: Sequence[float] | Tensor,
    labels: Sequence[str | None],
    group_size: int,
    *,
    scale: str = "std",
    policy: dict[str, str] | None = None,
) -> Tensor:
    """GRPO group advantages with masked episodes (infra, data, drift) left out of each group's mean and
    std; they get advantage 0 (and must also be left out of the loss, see ``trajectory.training_arrays``).

    Args:
        rewards: [B] episode rewards, in groups of ``group_size`` consecutive episodes.
        labels: [B] primary failure labels (None for success).
        scale: as :func:`posttrain.advantages.group_advantages`.
        policy: loss-policy overrides (:data:`LOSS_POLICY`).

    Returns:
        advantages_B: [B].
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if len(labels) != rewards.numel():
        raise ValueError(f"{len(labels)} labels for {rewards.numel()} rewards")
    valid = torch.tensor([not is_masked(label, policy) for label in labels])
    return group_advantages(rewards, group_size, scale=scale, valid=valid)
