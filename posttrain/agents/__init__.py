"""Agentic, multi-turn, tool-use episodes: environments at the level of messages, a runner that owns
every token, failure labels with a loss policy, four bundled environments.

    env.py          the protocol (Env, Action, Observation, Grade), ToolEnv + @tool, typed parse statuses
    formats.py      tool-call formats: tiny ``<call>f(x)</call>``, hermes ``<tool_call>{json}</tool_call>``
    bridge.py       template bridge tokens between turns, the per-episode render check, token truncation
    runner.py       EpisodeRunner: turn waves through an engine, concurrent tool steps, budgets, labels
    policies.py     ScriptedPolicy: golden trajectories and hack probes through the same runner
    failures.py     the taxonomy, the loss policy, masked group advantages
    trajectory.py   Episode / Turn records (trajectories.jsonl), training_arrays, completion
    sandbox.py      the one interface through which tools run untrusted code
    envs/           calculator, sql, fix_bug, guess
    check.py        golden trajectories and hack probes (``posttrain env check ENV``, in cli/env.py)
    demos.py        golden trajectories as SFT rows (``posttrain env demos ENV``)
    config.py       the `env:` config section: environment, options, budgets, format, task rows
    source.py       EnvSource: episodes as rollouts in the one online loop (GRPO family, RLOO, PPO)

Running a batch (what an environment step source does each step)::

    runner = EpisodeRunner(tokenizer, "tiny", budgets=Budgets(max_turns=4), sampling=Sampling(seed=0))
    episodes = runner.run(engine, get_env("calculator"), task_rows, group_size=8)
    advantages = masked_group_advantages([e.reward for e in episodes], [e.failure for e in episodes], 8)
    for ep in episodes:
        input_ids, loss_mask, logprobs = training_arrays(ep)   # or completion(ep) for the rollout buffer
"""

from posttrain.agents.env import (
    Action,
    Env,
    Grade,
    InfraError,
    Observation,
    ParseStatus,
    TaskError,
    ToolCall,
    ToolEnv,
    ToolResult,
    tool,
)
from posttrain.agents.envs import BUNDLED, get_env
from posttrain.agents.failures import LABELS, LOSS_POLICY, is_masked, masked_group_advantages, primary_failure
from posttrain.agents.formats import FORMATS, HermesFormat, TinyFormat, ToolFormat, get_format
from posttrain.agents.policies import Call, Forge, ScriptedPolicy
from posttrain.agents.runner import Budgets, DriftError, EpisodeRunner
from posttrain.agents.trajectory import (
    Episode,
    Turn,
    completion,
    read_jsonl,
    summarize,
    training_arrays,
    write_jsonl,
)

__all__ = [
    "BUNDLED",
    "FORMATS",
    "LABELS",
    "LOSS_POLICY",
    "Action",
    "Budgets",
    "Call",
    "DriftError",
    "Env",
    "Episode",
    "EpisodeRunner",
    "Forge",
    "Grade",
    "HermesFormat",
    "InfraError",
    "Observation",
    "ParseStatus",
    "ScriptedPolicy",
    "TaskError",
    "TinyFormat",
    "ToolCall",
    "ToolEnv",
    "ToolFormat",
    "ToolResult",
    "Turn",
    "completion",
    "get_env",
    "get_format",
    "is_masked",
    "masked_group_advantages",
    "primary_failure",
    "read_jsonl",
    "summarize",
    "tool",
    "training_arrays",
    "write_jsonl",
]
