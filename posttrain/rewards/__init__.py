"""Reward fns for online RL: verifiers (math, code, exact match), format and length shaping, a
learned reward model, and their weighted combination.

Every reward fn has the signature ``fn(prompts, completions, **row_fields) -> list[float]``: row
fields are the dataset columns, as lists aligned with ``completions`` (``answer=[...]``,
``tests=[...]``); each fn takes the ones it needs by name and ignores the rest. Prompts may be
strings or chat message lists, completions strings or assistant message lists.

    from posttrain.rewards import combine
    reward = combine(["math_answer", {"name": "overlong_penalty", "max_length": 512, "cache": 128}])
    scores = reward.score(prompts, completions, answer=answers)   # .total, .components, .seconds
"""

from posttrain.rewards.basic import (
    RewardFn,
    completion_text,
    exact_match,
    format_regex,
    length_penalty,
    overlong_penalty,
    success_gated_length_penalty,
)
from posttrain.rewards.code import code_tests, extract_code
from posttrain.rewards.combine import (
    REWARD_FACTORIES,
    REWARD_FNS,
    Combined,
    RewardScores,
    combine,
    resolve,
)
from posttrain.rewards.math import extract_answer, math_answer, math_equal
from posttrain.rewards.model import reward_model
from posttrain.sandbox import Result, run_many, run_python  # the sandbox's names, kept here for callers

__all__ = [
    "REWARD_FACTORIES",
    "REWARD_FNS",
    "Combined",
    "Result",
    "RewardFn",
    "RewardScores",
    "code_tests",
    "combine",
    "completion_text",
    "exact_match",
    "extract_answer",
    "extract_code",
    "format_regex",
    "length_penalty",
    "math_answer",
    "math_equal",
    "overlong_penalty",
    "success_gated_length_penalty",
    "resolve",
    "reward_model",
    "run_many",
    "run_python",
]
