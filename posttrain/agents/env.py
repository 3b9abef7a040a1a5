"""The environment protocol: what an agent environment is, at the level of messages.

An environment is made per episode from one task row (``EnvClass(task)``), says what the model sees
first (:meth:`Env.reset`: system / user messages) and which tools it has (:attr:`Env.tools`: JSON
schemas the chat template renders), takes one parsed assistant turn at a time (:meth:`Env.step`: an
:class:`Action`) and answers with an :class:`Observation` (tool results as messages, an optional
per-turn reward, done). At the end :meth:`Env.grade` reads the environment's own final *state* (the
answer it recorded, rows in its database, its files, hidden tests run on a pristine copy), never the
transcript: a tool output that contains the right answer earns nothing unless the policy acts on it.

Environments never see token ids: the episode runner (``runner.py``) owns tokens, masks and log-probs,
so the parts that are easy to get wrong are written once.

:class:`ToolEnv` turns methods decorated with :func:`tool` into tools (schema from the signature and the
Google-style docstring, through ``transformers.utils.get_json_schema``) and dispatches calls, turning
every outcome into a typed result: a parse failure, an unknown tool, bad arguments or a tool that
raised becomes an error message the policy can read and a failure event (``failures.py``), never a
silently dropped call. A toy environment is a few dozen lines (see ``envs/guess.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from transformers.utils import get_json_schema

from posttrain.errors import DataError


class ParseStatus(StrEnum):
    """Outcome of parsing one tool call out of an assistant turn (after renderers PR #22)."""

    OK = "ok"
    INVALID_JSON = "invalid_json"  # the call's payload is not JSON (Hermes)
    MALFORMED = "malformed"  # well delimited, but no recognisable name / structure
    UNCLOSED = "unclosed"  # an opening tag without its closing tag
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGS = "invalid_args"  # missing, unexpected or mistyped arguments


PARSE_EVENTS = {
    ParseStatus.INVALID_JSON: "format.parse_error",
    ParseStatus.MALFORMED: "format.parse_error",
    ParseStatus.UNCLOSED: "format.parse_error",
    ParseStatus.UNKNOWN_TOOL: "tool.unknown",
    ParseStatus.INVALID_ARGS: "tool.bad_args",
}
"""The failure event each non-ok parse status raises."""


@dataclass(frozen=True)
class ToolCall:
    """One tool call as the policy wrote it.

    Attributes:
        name: the tool's name, None when it could not be read.
        args: the validated arguments (``status == ok``), else whatever could be read (or None).
        raw: the exact text of the call, delimiters included.
        status: the :class:`ParseStatus`.
        detail: why the status is not ok (one line), "" when ok.
        chars: (start, end) character span of ``raw`` inside the turn's text.
    """

    name: str | None
    args: dict | None
    raw: str
    status: ParseStatus
    detail: str = ""
    chars: tuple[int, int] = (0, 0)

    def key(self) -> str:
        """Canonical text of the call (name + sorted arguments): equal calls have equal keys."""
        return json.dumps(
            [self.name, self.args if self.status == ParseStatus.OK else self.raw], sort_keys=True
        )


@dataclass(frozen=True)
class Action:
    """One parsed assistant turn: its text (decoded sampled tokens, eos cut), its calls in order, and
    how generation ended ("eos", "stop" (a stop string) or "length")."""

    text: str
    calls: tuple[ToolCall, ...]
    finish: str = "eos"


@dataclass
class ToolResult:
    """What running one call gave: ``content`` (what the policy reads, after truncation), ``status``
    ("ok", "error" or "skipped": not run because an earlier call ended the episode), the failure
    ``label`` of an error, ``seconds``, and token counts filled in by the runner."""

    name: str | None
    content: str
    status: str = "ok"
    label: str | None = None
    seconds: float = 0.0
    truncated: bool = False
    tokens: int | None = None  # content tokens after truncation (runner)
    original_tokens: int | None = None  # before truncation (runner)


@dataclass
class Observation:
    """What the environment answers to one action.

    Attributes:
        messages: tool results (role ``tool``; or ``user`` for feedback), text content only. Empty
            when the episode ends without anything more to show.
        reward: optional per-turn reward (shaping); outcome rewards come from :meth:`Env.grade`.
        done: the episode is over (a terminal tool ran, or the environment gave up).
        events: failure events this step raised (``failures.LABELS``), e.g. ``tool.error``.
        results: one :class:`ToolResult` per call of the action, in order.
    """

    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    events: list[str] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)


@dataclass(frozen=True)
class Grade:
    """The outcome of an episode, read from the environment's final state.

    Attributes:
        reward: the outcome reward (1.0 passed, 0.0 not, by default).
        passed: the task was done.
        components: named numbers to log (``correct``, ``tests_passed_frac``, ``collateral``...).
        failure: None when passed, else ``answer.wrong``, ``answer.none``, ``hack.attempt`` or
            ``data.task_invalid``.
        detail: one human-readable line for the report.
    """

    reward: float
    passed: bool
    components: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    detail: str = ""


class TaskError(DataError):
    """A task row is unusable (a field is missing or wrong); episodes made from it are labelled
    ``data.task_invalid`` and masked, never trained on."""


class InfraError(Exception):
    """Something outside the policy's control broke (the sandbox would not start, a service is down).
    ``label`` is an ``infra.*`` label; the episode is masked out of the loss and the group baseline."""

    def __init__(self, message: str, label: str = "infra.env"):
        super().__init__(message)
        self.label = label


class Env(Protocol):
    """What the episode runner needs from an environment (``EnvClass(task, **options)`` makes one)."""

    name: ClassVar[str]
    tools: list[dict]

    def reset(self) -> list[dict]: ...

    def step(self, action: Action) -> Observation: ...

    def grade(self) -> Grade: ...

    def state_key(self) -> Hashable | None: ...

    def close(self) -> None: ...


def tool(fn: Callable | None = None, *, terminal: bool = False):
    """Mark a :class:`ToolEnv` method as a tool. ``terminal=True``: the episode ends after it runs.

    The schema comes from the signature and the Google-style docstring (every argument needs a type
    hint and an ``Args:`` line, else ``transformers`` raises naming the argument). The method returns
    the text the policy reads; raising ``ValueError`` (or any exception) becomes a ``tool.error``
    result, raising :class:`InfraError` ends the episode as an infrastructure failure.
    """

    def mark(f: Callable) -> Callable:
        f.__tool__ = {"terminal": terminal}
        return f

    return mark(fn) if fn is not None else mark


class ToolEnv:
    """Base class: methods marked :func:`tool` become the tools; subclasses write :meth:`reset`,
    :meth:`grade` and the tools, and list the task row's required ``fields``.

    Dispatch rules (:meth:`step`): calls run in order; a call that did not parse, names an unknown
    tool or has bad arguments gets an error message and its event; a tool that raises gets an error
    message and ``tool.error``; a terminal tool ends the episode (later calls of the turn are
    ``skipped``); a turn without any call ends the episode with ``format.no_action``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    fields: ClassVar[tuple[str, ...]] = ()
    _schemas: ClassVar[dict[type, list[dict]]] = {}

    def __init__(self, task: dict, **options: Any):
        missing = [f for f in self.fields if f not in task]
        if missing:
            where = f"task {task.get('id', '?')!r} of environment {self.name!r}"
            raise TaskError(
                f"{where}: missing field(s) {', '.join(missing)} (has: {', '.join(sorted(task))})"
            )
        if options:
            raise TypeError(f"environment {self.name!r} takes no options; got {', '.join(sorted(options))}")
        self.task = task
        self.flags: list[str] = []  # events the environment's own guards raised (hack.attempt)
        self.n_calls: dict[str, int] = {}

    # --- tools ---------------------------------------------------------------------------

    @classmethod
    def tool_names(cls) -> list[str]:
        """Names of the tools, in definition order (base classes first)."""
        names: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            names.update((n, None) for n, v in vars(klass).items() if hasattr(v, "__tool__"))
        return list(names)

    @property
    def tools(self) -> list[dict]:
        """JSON schemas of the tools (computed once per class)."""
        cls = type(self)
        if cls not in ToolEnv._schemas:
            schemas = []
            for n in cls.tool_names():
                schema = get_json_schema(getattr(self, n))
                schema["function"].pop("return", None)
                schemas.append(schema)
            ToolEnv._schemas[cls] = schemas
        return ToolEnv._schemas[cls]

    def flag(self, label: str) -> None:
        """Record an event the environment's guards detected (``hack.attempt``); the runner adds it to
        the episode's events and the grade can read it."""
        self.flags.append(label)

    # --- protocol ------------------------------------------------------------------------

    def reset(self) -> list[dict]:
        raise NotImplementedError

    def grade(self) -> Grade:
        raise NotImplementedError

    def state_key(self) -> Hashable | None:
        return None

    def close(self) -> None:
        pass

    def tool_message(self, name: str | None, content: str) -> dict:
        return {"role": "tool", "name": name or "", "content": content}

    def step(self, action: Action) -> Observation:
        obs = Observation()
        if not action.calls:
            obs.done = True
            obs.events.append("format.no_action")
            return obs
        for call in action.calls:
            if obs.done:
                obs.results.append(ToolResult(call.name, "not run: the episode had ended", "skipped"))
                continue
            result, terminal = self._dispatch(call)
            obs.results.append(result)
            if result.label:
                obs.events.append(result.label)
            if terminal:
                obs.done = True
            else:
                obs.messages.append(self.tool_message(call.name, result.content))
        if obs.done:
            obs.messages = []  # nothing more to show: the episode ends on the terminal call
        return obs

    def _dispatch(self, call: ToolCall) -> tuple[ToolResult, bool]:
        if call.status != ParseStatus.OK:
            label = PARSE_EVENTS[call.status]
            return ToolResult(call.name, f"error: {call.status}: {call.detail}", "error", label), False
        spec = getattr(self, call.name).__tool__
        self.n_calls[call.name] = self.n_calls.get(call.name, 0) + 1
        start = time.monotonic()
        try:
            out = getattr(self, call.name)(**call.args)
        except InfraError:
            raise
        except Exception as e:  # the policy's call went wrong (bad SQL, missing file): it can read why
            seconds = time.monotonic() - start
            return ToolResult(
                call.name, f"error: {type(e).__name__}: {e}", "error", "tool.error", seconds
            ), False
        return ToolResult(call.name, str(out), seconds=time.monotonic() - start), spec["terminal"]


# --- argument validation (used by the tool-call formats) ------------------------------------

_TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
}


def validate_args(schema: dict, args: dict) -> tuple[dict | None, str]:
    """Check ``args`` against a tool's JSON schema, coercing where the intent is unambiguous.

    Coercions: a number for a string parameter becomes its text (``answer(42)``); a string of
    digits for an integer / number parameter becomes the number. Anything else that does not match
    the declared type is an error, as are missing required and unexpected arguments.

    Returns:
        (validated args, "") or (None, reason).
    """
    params = schema["function"]["parameters"]
    props, required = params.get("properties", {}), params.get("required", [])
    unexpected = [k for k in args if k not in props]
    if unexpected:
        return None, f"unexpected argument(s) {', '.join(unexpected)}"
    missing = [k for k in required if k not in args]
    if missing:
        return None, f"missing argument(s) {', '.join(missing)}"
    out = {}
    for k, v in args.items():
        kind = props[k].get("type")
        if kind == "string" and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        elif kind in ("integer", "number") and isinstance(v, str):
            try:
                v = int(v.strip()) if kind == "integer" else float(v.strip())
            except ValueError:
                return None, f"argument {k} must be a {kind}, got {v!r}"
        expected = _TYPES.get(kind)
        if expected is not None and (
            not isinstance(v, expected) or (kind != "boolean" and isinstance(v, bool))
        ):
            return None, f"argument {k} must be a {kind}, got {type(v).__name__}"
        out[k] = v
    return out, ""
