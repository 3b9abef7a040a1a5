"""The episode runner: runs a batch of agent episodes in turn waves and owns every token.

    runner = EpisodeRunner(tokenizer, "tiny", budgets=Budgets(max_turns=4))
    episodes = runner.run(engine, CalculatorEnv, tasks, group_size=4)   # task-major, 4 per task

Each *wave* asks the policy for one turn of every active episode at once (one ``engine.generate``
call: prompts are token ids, the engine batches and KV-caches them); the sampled tokens are appended as
they are (mask True, their sampling log-probs kept); each turn is parsed by the tool-call format; the
environment steps of the wave run concurrently, one thread each, under a wall-clock limit; each
observation is appended as template bridge tokens (``bridge.py``; mask False). Finished episodes drop
out of the next wave. At the end every episode is graded on the environment's state (concurrently),
its ids are checked against a full render of its conversation, and it gets one failure label and the
loss policy's verdict (``failures.py``).

A turn's prompt extends the last one by its sampled and bridge tokens, so with an engine that can (the HF
engine) each episode's KV cache is carried between turns (``rollout.turn_cache``; ``kv_carry=False``: not).

Every way an episode ends is a named stop reason (``failures.STOP_LABELS``): the environment said done,
no action, a forged observation, a repeated call, or one of the budgets (:class:`Budgets`). Nothing an
environment, a tool, the grader or the engine raises crashes the batch: it becomes an ``infra.*`` (or
``data.task_invalid``) label on the episodes it touched, which are then masked. Only
``verify="strict"`` raises, on drift, by request.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from posttrain.agents.bridge import TemplateBridge, truncate_tokens
from posttrain.agents.env import Action, Env, InfraError, Observation, TaskError, ToolCall
from posttrain.agents.failures import STOP_LABELS, is_masked, primary_failure
from posttrain.agents.formats import ToolFormat, get_format
from posttrain.agents.threads import call_all
from posttrain.agents.trajectory import Episode, Turn, task_hash
from posttrain.errors import ConfigError
from posttrain.rollout.engine import Completion, Sampling
from posttrain.rollout.turn_cache import TurnCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budgets:
    """Limits of one episode; each one, when hit, ends the episode with its own stop reason.

    Attributes:
        max_turns: assistant turns (``max_turns``).
        max_tool_calls: tool calls over the episode; a turn that would pass it is not run
            (``max_tool_calls``).
        max_context: prompt + appended tokens; a turn starts only if ``max_new_tokens`` more still fit,
            and an observation that does not fit is not appended (``context``). None: the tokenizer's
            ``model_max_length``.
        max_new_tokens: tokens per assistant turn; a turn cut there ends the episode (``max_new_tokens``).
        max_tool_tokens: tokens of one tool result's content; longer ones are cut by
            ``bridge.truncate_tokens`` (the episode goes on).
        truncate: which end of a long tool result to keep, "tail" or "head".
        tool_timeout_s: wall time of one environment step, per call in it (``tool_time``).
        episode_timeout_s: wall time of the episode, checked between turns (``episode_time``).
        grade_timeout_s: wall time of ``grade()``; past it the episode is ``infra.grader``.
        max_repeats: the same call this many times in a row ends the episode (``loop``).
    """

    max_turns: int = 8
    max_tool_calls: int = 16
    max_context: int | None = None
    max_new_tokens: int = 128
    max_tool_tokens: int = 256
    truncate: str = "tail"
    tool_timeout_s: float = 30.0
    episode_timeout_s: float = 600.0
    grade_timeout_s: float = 120.0
    max_repeats: int = 3


class DriftError(RuntimeError):
    """``verify="strict"``: an episode's ids are not what the chat template renders."""


@dataclass
class EpisodeState:
    """A running episode, as the runner and the policy see it."""

    episode: Episode
    task: dict
    env: Env | None = None
    started: float = field(default_factory=time.monotonic)
    stop: str | None = None
    last_token: int | None = None  # the last sampled token of the latest assistant turn
    open_turn: bool = False  # the ids end with a generation prompt
    n_calls: int = 0
    repeat: tuple[str, int] = ("", 0)  # last call's key, times in a row
    abandoned: bool = False  # a step overran its time and may still be running: do not touch the env
    scratch: dict = field(default_factory=dict)  # for policies (a scripted policy keeps its script here)

    @property
    def context(self) -> list[int]:
        return self.episode.prompt_ids + self.episode.ids

    def end(self, stop: str, error: str | None = None) -> None:
        if self.stop is None:
            self.stop, self.episode.error = stop, error

    def last_observation(self) -> list[str]:
        """Contents of the messages of the latest observation (empty before the first one)."""
        turns = self.episode.turns
        if turns and turns[-1].role == "observation":
            return [m.get("content", "") for m in turns[-1].messages]
        return []


class EpisodeRunner:
    """Runs agent episodes (module docstring).

    Args:
        tokenizer: the policy's tokenizer, with a chat template that can render a tool turn.
        tool_format: a name of ``formats.FORMATS`` or a :class:`~posttrain.agents.formats.ToolFormat`.
        budgets: :class:`Budgets`.
        sampling: temperature / top-p / top-k / seed (its ``max_new_tokens`` is the budget's; wave w
            samples with seed + w).
        verify: "mask" (drift is labelled ``tokenization.drift`` and masked), "warn" (logged only) or
            "strict" (raises :class:`DriftError`).
        loss_policy: overrides of ``failures.LOSS_POLICY``.
        kv_carry: carry each episode's KV cache across its turns where the engine can (module docstring).

    Raises:
        ConfigError: unknown format or verify mode, a template without a tool turn, a budget that
            cannot work.
    """

    def __init__(
        self,
        tokenizer,
        tool_format: str | ToolFormat = "tiny",
        *,
        budgets: Budgets | None = None,
        sampling: Sampling | None = None,
        verify: str = "mask",
        loss_policy: dict | None = None,
        kv_carry: bool = True,
    ):
        self.tokenizer = tokenizer
        self.format = get_format(tool_format)
        self.budgets = budgets or Budgets()
        if verify not in ("mask", "warn", "strict"):
            raise ConfigError(f"verify must be 'mask', 'warn' or 'strict', got {verify!r}")
        self.verify, self.loss_policy = verify, loss_policy
        self.bridge = TemplateBridge(tokenizer, tool_role=self.format.tool_role)
        self.max_context = self.budgets.max_context or tokenizer.model_max_length
        if self.max_context > 1e7:  # transformers' "no limit" sentinel
            raise ConfigError("the tokenizer has no model_max_length: set budgets.max_context")
        if self.budgets.max_tool_tokens < 8 or self.budgets.max_new_tokens < 1:
            raise ConfigError("budgets: max_tool_tokens must be at least 8 and max_new_tokens at least 1")
        header = (self.bridge.header,) if self.bridge.header else ()
        self.markers = tuple(dict.fromkeys((*self.format.forge_markers, *header)))
        base = sampling or Sampling()
        self.sampling = replace(
            base,
            max_new_tokens=self.budgets.max_new_tokens,
            stop=tuple(dict.fromkeys((*base.stop, *self.format.stop, *self.markers))),
        )
        self.eos_ids = {tokenizer.eos_token_id}
        self.seconds: dict[str, float] = {}  # wall time of the last run: generate, tools, grade
        self.kv_carry = kv_carry
        self.kv_stats: dict[str, int] = {}  # the last run's TurnCache.stats (empty without carry-over)

    # --- the batch ------------------------------------------------------------------------

    def run(
        self,
        policy,
        env_factory: Callable[[dict], Env],
        tasks: Sequence[dict],
        *,
        group_size: int = 1,
        env_name: str | None = None,
    ) -> list[Episode]:
        """Run ``group_size`` episodes of each task (a fresh environment each); episodes in task-major order.

        Args:
            policy: an engine (``generate(prompt_ids, n, sampling)``, e.g. ``HFEngine``) or an object with
                ``act(states, sampling) -> [Completion]`` (``policies.ScriptedPolicy``).
            env_factory: ``task -> Env`` (an environment class works).
        """
        name = env_name or getattr(env_factory, "name", "") or getattr(env_factory, "__name__", "env")
        version = str(getattr(env_factory, "version", ""))
        states = [
            self._start(env_factory, task, g, g * group_size + k, name, version)
            for g, task in enumerate(tasks)
            for k in range(group_size)
        ]
        self.seconds = {"generate": 0.0, "tools": 0.0, "grade": 0.0}
        carry = TurnCache() if self.kv_carry and getattr(policy, "carries_kv", False) else None
        clock = time.perf_counter()
        self._reset(states)
        self.seconds["tools"] += time.perf_counter() - clock
        wave = 0
        while active := [s for s in states if s.stop is None]:
            clock = time.perf_counter()
            self._generate(policy, active, wave, carry)
            stepping = [(s, a) for s in active if s.stop is None and (a := s.scratch.pop("action", None))]
            self.seconds["generate"] += time.perf_counter() - clock
            clock = time.perf_counter()
            self._step(stepping)
            self.seconds["tools"] += time.perf_counter() - clock
            if carry is not None:  # episodes out of the next waves free their caches now
                carry.keep_only({s.episode.index for s in states if s.stop is None})
            wave += 1
        self.kv_stats = {} if carry is None else dict(carry.stats)
        clock = time.perf_counter()
        self._finish(states)
        self.seconds["grade"] += time.perf_counter() - clock
        return [s.episode for s in states]

    def _start(self, factory, task, group, index, name, version) -> EpisodeState:
        tid = str(task.get("id", index)) if isinstance(task, dict) else str(index)
        ep = Episode(
            env=name,
            env_version=version,
            task_id=tid,
            task_hash=task_hash(task) if isinstance(task, dict) else "",
            group=group,
            index=index,
            prompt_ids=[],
        )
        state = EpisodeState(ep, task)
        try:
            if not isinstance(task, dict):
                raise TaskError(f"task {index} is a {type(task).__name__}, not a row (dict)")
            state.env = factory(task)
        except TaskError as e:
            state.end("task_invalid", str(e))
        except Exception as e:  # a bug or an unavailable resource in the environment's constructor
            state.end("env_error", f"creating the environment: {type(e).__name__}: {e}")
        return state

    def _reset(self, states: list[EpisodeState]) -> None:
        live = [s for s in states if s.stop is None]
        outs = call_all([s.env.reset for s in live], [self.budgets.tool_timeout_s] * len(live))
        for s, (status, value) in zip(live, outs):
            if status != "ok":
                self._env_failure(s, status, value, "reset")
                continue
            try:
                s.episode.tools = list(s.env.tools)
                messages = [dict(m) for m in value]
                s.episode.prompt_ids = self.bridge.prompt_ids(messages, s.episode.tools)
            except Exception as e:  # bad messages or tools from the environment
                s.end("env_error", f"rendering the opening: {type(e).__name__}: {e}")
                continue
            P = len(s.episode.prompt_ids)
            s.episode.turns.append(
                Turn(
                    "prompt",
                    self.bridge.render(messages, tools=s.episode.tools, generation=True),
                    0,
                    P,
                    messages=messages,
                )
            )
            s.open_turn = True
            self._check_room(s)

    # --- one wave -------------------------------------------------------------------------

    def _generate(
        self, policy, active: list[EpisodeState], wave: int, carry: TurnCache | None = None
    ) -> None:
        sampling = (
            self.sampling
            if self.sampling.seed is None
            else replace(self.sampling, seed=self.sampling.seed + wave)
        )
        start = time.monotonic()
        try:
            if hasattr(policy, "act"):
                completions = policy.act(active, sampling)
            else:
                contexts = [s.context for s in active]
                kv = {} if carry is None else {"carry": carry, "keys": [s.episode.index for s in active]}
                completions = [g[0] for g in policy.generate(contexts, 1, sampling, **kv)]
            if len(completions) != len(active):
                raise RuntimeError(f"{len(completions)} completions for {len(active)} episodes")
        except Exception as e:  # the engine broke: not the policy's doing; the batch goes on without it
            log.warning("agent episodes: generation failed: %s: %s", type(e).__name__, e)
            for s in active:
                s.end("engine_error", f"{type(e).__name__}: {e}")
            return
        seconds = (time.monotonic() - start) / len(active)
        for s, c in zip(active, completions):
            self._append_turn(s, c, seconds)

    def _append_turn(self, s: EpisodeState, c: Completion, seconds: float) -> None:
        ep, tokens = s.episode, list(c.token_ids)
        if len(c.logprobs) != len(tokens):  # appended as is, the mask and log-probs would be misaligned
            return s.end("engine_error", f"{len(tokens)} tokens with {len(c.logprobs)} log-probs")
        start = len(s.context)
        try:
            key_fn = getattr(s.env, "state_key", None)  # optional in the protocol
            state_key, broken = (key_fn() if key_fn else None), None
        except Exception as e:  # noqa: BLE001 — a bug in the environment, not the policy
            state_key, broken = None, f"state_key: {type(e).__name__}: {e}"
        ep.ids += tokens
        ep.mask += [True] * len(tokens)
        ep.logprobs += [float(x) for x in c.logprobs]
        s.last_token, s.open_turn = (tokens[-1] if tokens else None), False
        closed = bool(tokens) and tokens[-1] in self.eos_ids
        text = self.tokenizer.decode(tokens[:-1] if closed else tokens, skip_special_tokens=False)
        finish = "length" if c.finish_reason == "length" else ("eos" if closed else "stop")
        turn = Turn(
            "assistant",
            text,
            start,
            len(s.context),
            sampled=True,
            messages=[{"role": "assistant", "content": text}],
            policy_version=c.policy_version,
            finish=finish,
            seconds=seconds,
            state_key=_jsonable(state_key),
        )
        ep.turns.append(turn)
        if broken:
            ep.events.append("infra.env")
            return s.end("env_error", broken)
        if any(m in text for m in self.markers):
            turn.events.append("format.forged_observation")
            return s.end("forged_observation")
        if finish == "length":
            return s.end("max_new_tokens")
        turn.calls = list(self.format.parse(text, ep.tools))
        turn.call_spans = self._token_spans(tokens, turn.calls, start)
        if s.n_calls + len(turn.calls) > self.budgets.max_tool_calls:
            return s.end("max_tool_calls")
        for call in turn.calls:
            key = call.key()
            s.repeat = (key, s.repeat[1] + 1 if key == s.repeat[0] else 1)
            if s.repeat[1] >= self.budgets.max_repeats:
                return s.end("loop")
        s.n_calls += len(turn.calls)
        s.scratch["action"] = Action(text, tuple(turn.calls), finish)

    def _token_spans(self, tokens: list[int], calls: list[ToolCall], offset: int) -> list[tuple[int, int]]:
        """Token span (in the episode's coordinates) of each call's character span."""
        if not calls:
            return []
        ends = [
            len(self.tokenizer.decode(tokens[: i + 1], skip_special_tokens=False)) for i in range(len(tokens))
        ]
        spans = []
        for c in calls:
            first = bisect_right(ends, c.chars[0])  # the first token that reaches past the call's start
            last = min(len(tokens), bisect_right(ends, c.chars[1] - 1) + 1)
            spans.append((offset + first, offset + last))
        return spans

    def _step(self, stepping: list[tuple[EpisodeState, Action]]) -> None:
        limits = []  # (seconds, the stop reason if they run out)
        for s, a in stepping:
            tool_s = self.budgets.tool_timeout_s * max(1, len(a.calls))
            left = self.budgets.episode_timeout_s - (time.monotonic() - s.started)
            limits.append((max(0.0, left), "episode_time") if left < tool_s else (tool_s, "tool_time"))
        start = time.monotonic()
        outs = call_all([lambda s=s, a=a: s.env.step(a) for s, a in stepping], [t for t, _ in limits])
        for (s, _), (limit, reason), (status, value) in zip(stepping, limits, outs):
            if status == "timeout":
                s.abandoned = True  # its thread may still be running: the env is not ours to touch again
                s.end(reason, f"the environment step ran past {limit:.1f} s")
            elif status == "raised" or not isinstance(value, Observation):
                self._env_failure(s, status, value, "step")
            else:
                self._append_observation(s, value, time.monotonic() - start)

    def _append_observation(self, s: EpisodeState, obs: Observation, seconds: float) -> None:
        ep, b = s.episode, self.budgets
        messages = []
        pending = list(obs.results)
        for m in obs.messages:
            content = str(m.get("content", ""))
            cut, truncated, before, after = truncate_tokens(
                self.tokenizer, content, b.max_tool_tokens, keep=b.truncate
            )
            messages.append({**m, "content": cut})
            for r in pending:  # the result this message shows (ToolEnv: the same content)
                if r.content == content:
                    r.content, r.truncated, r.tokens, r.original_tokens = cut, truncated, after, before
                    pending.remove(r)
                    break
        turn = Turn(
            "observation",
            "",
            len(s.context),
            len(s.context),
            messages=messages,
            results=list(obs.results),
            reward=float(obs.reward),
            seconds=seconds,
            events=list(obs.events),
        )
        ep.turns.append(turn)
        if obs.done and not messages:
            return s.end("no_action" if "format.no_action" in obs.events else "env_done")
        text, ids = self.bridge.observation(messages, s.last_token)
        if len(s.context) + len(ids) > self.max_context:
            turn.dropped = True
            return s.end("context")
        turn.text, turn.end = text, len(s.context) + len(ids)
        ep.ids += ids
        ep.mask += [False] * len(ids)
        ep.logprobs += [0.0] * len(ids)
        s.open_turn = True
        if obs.done:
            return s.end("no_action" if "format.no_action" in obs.events else "env_done")
        if sum(t.sampled for t in ep.turns) >= b.max_turns:
            return s.end("max_turns")
        if time.monotonic() - s.started > b.episode_timeout_s:
            return s.end("episode_time")
        self._check_room(s)

    def _check_room(self, s: EpisodeState) -> None:
        if len(s.context) + self.budgets.max_new_tokens > self.max_context:
            s.end("context")

    def _env_failure(self, s: EpisodeState, status: str, value, where: str) -> None:
        if status == "timeout":
            s.abandoned = True
            return s.end("tool_time", f"{where} ran past its time")
        if isinstance(value, TaskError):
            return s.end("task_invalid", str(value))
        if status == "ok":
            return s.end("env_error", f"{where} returned {type(value).__name__}, not an Observation")
        label = value.label if isinstance(value, InfraError) else "infra.env"
        s.episode.events.append(label)
        s.end("env_error", f"{where}: {type(value).__name__}: {value}")

    # --- the end --------------------------------------------------------------------------

    def _finish(self, states: list[EpisodeState]) -> None:
        gradable = [
            s
            for s in states
            if s.env is not None
            and not s.abandoned
            and s.stop not in ("env_error", "task_invalid")
            and s.episode.prompt_ids
        ]
        outs = call_all([s.env.grade for s in gradable], [self.budgets.grade_timeout_s] * len(gradable))
        for s, (status, value) in zip(gradable, outs):
            if status == "ok" and hasattr(value, "reward"):
                s.episode.grade = value
            elif status == "raised" and isinstance(value, TaskError):
                s.episode.events.append("data.task_invalid")
                s.episode.error = str(value)
            else:
                label = value.label if isinstance(value, InfraError) else "infra.grader"
                s.episode.events.append(label)
                s.episode.error = f"grade: {status}: {value!r}"
        for s in states:
            self._label(s)
            if s.env is not None and not s.abandoned and hasattr(s.env, "close"):
                try:
                    s.env.close()
                except Exception as e:  # noqa: BLE001 — a leak to report, not a reason to lose the batch
                    log.warning("agent episodes: closing %s failed: %s", s.episode.env, e)

    def _label(self, s: EpisodeState) -> None:
        ep = s.episode
        ep.stop, ep.seconds = s.stop or "env_done", time.monotonic() - s.started
        events = [e for t in ep.turns for e in t.events] + list(getattr(s.env, "flags", []) or [])
        stop_label = STOP_LABELS[ep.stop]
        events += [stop_label] if stop_label else []
        if ep.grade is not None and ep.grade.failure:
            events.append(ep.grade.failure)
        if ep.prompt_ids:
            self._verify(s, events)
        ep.events = list(dict.fromkeys(events + ep.events))
        # An episode cut short by a budget or a loop did not pass, whatever its state says.
        passed = ep.grade is not None and ep.grade.passed and stop_label in (None, "format.no_action")
        ep.failure = primary_failure(ep.events, passed)
        ep.masked = is_masked(ep.failure, self.loss_policy)
        zero = ep.masked or ep.grade is None or ep.failure in ("hack.attempt", "format.forged_observation")
        zero = zero or stop_label not in (None, "format.no_action")
        ep.reward = 0.0 if zero else float(ep.grade.reward) + sum(t.reward for t in ep.turns)

    def _verify(self, s: EpisodeState, events: list[str]) -> None:
        ep = s.episode
        try:
            v = self.bridge.verify(ep.messages(), ep.tools, s.context, open_turn=s.open_turn)
        except Exception as e:  # noqa: BLE001 — a template that cannot render the episode is drift too
            ep.verification = {"text_equal": False, "retokenized": -1, "error": str(e)}
            events.append("tokenization.drift")
            return
        ep.verification = {"text_equal": v.text_equal, "retokenized": v.retokenized}
        if v.text_equal:
            return
        message = (
            f"episode {ep.index} ({ep.env}, task {ep.task_id}): ids differ from the chat template's render"
        )
        if self.verify == "strict":
            raise DriftError(f"{message}; expected text {v.expected!r}")
        log.warning("agent episodes: %s", message)
        if self.verify == "mask":
            events.append("tokenization.drift")


def _jsonable(key):
    """A state key as JSON can hold it (tuples become lists; anything else its repr)."""
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    if isinstance(key, (tuple, list)):
        return [_jsonable(k) for k in key]
    return repr(key)
