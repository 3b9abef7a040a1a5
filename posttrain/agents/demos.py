"""SFT rows from golden trajectories: an environment's scripted optimal policy, run through the episode
runner (tokens, bridges, verification and all), written as chat rows that SFT trains on.

    rows = demo_rows("calculator", tokenizer, n=512)     # [{"messages": [...], "tools": [...]}, ...]

A row holds the episode's conversation (opening, assistant turns, tool results) and its tools; SFT renders
it with the same chat template, so its loss tokens are the assistant turns: exactly the positions the
episode's policy mask marks (``tests/test_agents_loop.py`` checks it token by token). Only episodes that
pass are kept (a golden script that fails on a task is a grader or task bug, reported by
``posttrain env check``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from posttrain.agents.envs import get_env
from posttrain.agents.policies import ScriptedPolicy
from posttrain.agents.runner import Budgets, EpisodeRunner
from posttrain.agents.trajectory import Episode


def demo_episodes(
    spec,
    tokenizer,
    *,
    n: int,
    seed: int = 0,
    split: str = "train",
    tool_format: str = "tiny",
    script: Callable | None = None,
    budgets: Budgets | None = None,
) -> list[Episode]:
    """Episodes of ``script`` (default: the environment's ``golden``) on ``n`` generated tasks."""
    cls = get_env(spec) if isinstance(spec, str) else spec
    runner = EpisodeRunner(tokenizer, tool_format, budgets=budgets)
    policy = ScriptedPolicy(tokenizer, tool_format, script or cls.golden)
    return runner.run(policy, cls, cls.tasks(n, split=split, seed=seed))


def demo_rows(spec, tokenizer, *, n: int, seed: int = 0, split: str = "train", tool_format: str = "tiny",
              script: Callable | None = None, budgets: Budgets | None = None, passed_only: bool = True) -> list[dict]:  # fmt: skip
    """SFT rows (``{"messages", "tools", "task_id"}``) of the episodes of :func:`demo_episodes`."""
    episodes = demo_episodes(
        spec, tokenizer, n=n, seed=seed, split=split, tool_format=tool_format, script=script, budgets=budgets
    )
    return [
        {"messages": ep.messages(), "tools": ep.tools, "task_id": ep.task_id}
        for ep in episodes
        if not passed_only or (ep.failure is None and ep.reward > 0)
    ]


_WORDS = "has and sold gave cups coins left more in all the of items price".split()


def copy_rows(n: int, *, seed: int = 0) -> list[dict]:
    """Chat rows whose assistant turn repeats the user's text: numbers, operators and a few words.

    A randomly initialised character-level model trained on golden agent demos alone stays on the
    plateau before copying (it writes plausible digits of the right length whatever the task: the copy
    signal is a dozen tokens of a 150-token demo). A short warm-up on these rows, the stand-in for a
    pretrained base (any real LM copies), teaches it to copy first; the demos then teach the format.
    """
    rng = random.Random(f"copy/{seed}")

    def piece() -> str:
        r = rng.random()
        if r < 0.5:
            return str(rng.randint(0, 10 ** rng.randint(1, 5)))
        if r < 0.7:
            return f"{rng.randint(10, 9999)}{rng.choice('+-')}{rng.randint(10, 9999)}"
        return rng.choice(_WORDS)

    rows = []
    for _ in range(n):
        text = " ".join(piece() for _ in range(rng.randint(1, 5)))
        rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]})
    return rows
