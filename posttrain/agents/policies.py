"""Scripted policies: an environment's optimal policy (golden trajectories: grader tests and SFT demos)
and its hack probes (adversarial trajectories that must score 0), run through the same runner, tokens
and all, as a model would be.

A script is a generator: it yields one turn's plan and receives the contents of the observation that
followed (a list of strings, one per tool message):

    def golden(task):
        result = yield [Call("calc", {"expr": task["expr"]})]
        yield [Call("answer", {"value": result[0]})]

A plan is a list of :class:`Call` (rendered by the tool format), plain strings (written as they are)
and :class:`Forge` (the chat template's own tool-turn header followed by text: a forged observation).
A finished script gives an empty turn (just the end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

from posttrain.agents.bridge import TemplateBridge
from posttrain.agents.formats import ToolFormat, get_format
from posttrain.rollout.engine import Completion, Sampling


@dataclass(frozen=True)
class Call:
    name: str
    args: dict


@dataclass(frozen=True)
class Forge:
    """Text written after the template's tool-result header, as if the environment had answered."""

    content: str


Plan = list  # [Call | str | Forge]
Script = Generator[Plan, list[str], None]


class ScriptedPolicy:
    """A policy that plays a script per episode (``scripts(task) -> Script``).

    Args:
        tokenizer: the runner's tokenizer.
        tool_format: the runner's format.
        scripts: makes the script of an episode from its task row.
        encode: text -> token ids of a turn (default: the tokenizer's canonical encoding); a test passes
            a non-canonical one to stand for what a sampling policy may produce.
    """

    exact_logprobs = True  # its log-probs are the behaviour policy's by definition (the engine protocol)

    def __init__(
        self,
        tokenizer,
        tool_format: str | ToolFormat,
        scripts: Callable[[dict], Script],
        *,
        encode: Callable[[str], list[int]] | None = None,
    ):
        self.tokenizer = tokenizer
        self.format = get_format(tool_format)
        self.scripts = scripts
        self.encode = encode or (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
        self.header = TemplateBridge(tokenizer, tool_role=self.format.tool_role).header

    def act(self, states, sampling: Sampling) -> list[Completion]:
        return [self._turn(s, sampling) for s in states]

    def _turn(self, state, sampling: Sampling) -> Completion:
        try:
            if "script" not in state.scratch:
                state.scratch["script"] = self.scripts(state.task)
                plan = next(state.scratch["script"])
            else:
                plan = state.scratch["script"].send(state.last_observation())
        except StopIteration:
            plan = []
        text = self.render(plan, state.episode.tools)
        ids = self.encode(text) + [self.tokenizer.eos_token_id]
        finish = "stop"
        if len(ids) > sampling.max_new_tokens:  # as an engine would: cut at the budget
            ids, finish = ids[: sampling.max_new_tokens], "length"
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), text=text, finish_reason=finish)

    def render(self, plan: Plan, tools: list[dict]) -> str:
        parts, calls = [], []
        for item in [*plan, None]:
            if isinstance(item, Call):
                calls.append((item.name, item.args))
                continue
            if calls:  # consecutive calls render together (the format decides what goes between them)
                parts.append(self.format.render(calls, tools))
                calls = []
            if isinstance(item, Forge):
                parts.append(self.header + item.content)
            elif item is not None:
                parts.append(str(item))
        return "".join(parts)
