"""``posttrain env check``: an environment's golden trajectories must score 1 and its hack probes 0 with
their labels, through the real runner (tokens, bridges, verification), on train and held-out tasks."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.agents.envs import get_env
from posttrain.agents.policies import ScriptedPolicy
from posttrain.agents.runner import Budgets, EpisodeRunner


@dataclass(frozen=True)
class CheckRow:
    task_id: str
    script: str  # "golden" or the probe's name
    expected: str | None  # the probe's label; None for golden (no failure)
    reward: float
    failure: str | None
    stop: str
    ok: bool
    detail: str = ""


def check_env(
    spec,
    *,
    n: int = 3,
    seed: int = 0,
    tokenizer=None,
    tool_format: str = "tiny",
    budgets: Budgets | None = None,
) -> list[CheckRow]:
    """Run ``spec``'s golden policy on ``n`` train and ``n`` held-out tasks and every probe on the train
    tasks. A row is ok when golden scores 1 with no failure, or a probe scores 0 with its label. The
    first row checks that no key is in both splits."""
    cls = get_env(spec) if isinstance(spec, str) else spec
    if tokenizer is None:
        from posttrain.tasks.tiny import build_tokenizer

        tokenizer = build_tokenizer()
    runner = EpisodeRunner(tokenizer, tool_format, budgets=budgets)
    train, held = cls.tasks(n, split="train", seed=seed), cls.tasks(n, split="held_out", seed=seed)
    shared = {tuple(t["key"]) for t in train} & {tuple(t["key"]) for t in held}
    rows = [CheckRow("*", "split", None, 0.0, None, "", not shared, f"{len(shared)} key(s) in both splits")]
    golden = runner.run(ScriptedPolicy(tokenizer, tool_format, cls.golden), cls, train + held)
    for ep in golden:
        ok = ep.reward == 1.0 and ep.failure is None
        rows.append(CheckRow(ep.task_id, "golden", None, ep.reward, ep.failure, ep.stop, ok, _detail(ep)))
    names = dict.fromkeys(name for t in train for name in cls.probes(t))
    for name in names:
        tasks = [t for t in train if name in cls.probes(t)]
        label = {t["id"]: cls.probes(t)[name][0] for t in tasks}
        policy = ScriptedPolicy(
            tokenizer, tool_format, lambda task, name=name: cls.probes(task)[name][1](task)
        )
        for ep in runner.run(policy, cls, tasks):
            ok = ep.reward == 0.0 and ep.failure == label[ep.task_id]
            rows.append(
                CheckRow(ep.task_id, name, label[ep.task_id], ep.reward, ep.failure, ep.stop, ok, _detail(ep))
            )
    return rows


def _detail(ep) -> str:
    return ep.error or (ep.grade.detail if ep.grade else "")
