"""The record of one episode (a line of ``trajectories.jsonl``), and what training takes from it.

Token layout: ``prompt_ids`` is the rendered opening (shared by a GRPO group); ``ids`` is everything
after it, sampled tokens and bridge tokens in order; ``mask[t]`` is True exactly where ``ids[t]`` was
sampled by the policy and ``logprobs[t]`` is its sampling log-prob (0.0 elsewhere). Turn spans index
``prompt_ids + ids``:

    prompt_ids              ids
    <|user|>12+35<|end|>..  <call>calc(12+35)</call><|end|>  <|tool|>47<|end|><|assistant|>  ...
    turn 0 (prompt)         turn 1 (assistant, sampled)       turn 2 (observation, bridge)
    mask                    1 1 1 ... 1                       0 0 ... 0

:func:`training_arrays` is the one function that turns an episode into what a loss needs; everything
length-dependent must count ``sum(mask)`` (policy tokens), never ``len(ids)``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.agents.env import Grade, ParseStatus, ToolCall, ToolResult
from posttrain.rollout.engine import Completion


def task_hash(task: dict) -> str:
    """A short content hash of a task row (stable across runs and machines)."""
    return hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Turn:
    """One segment of the episode.

    Attributes:
        role: "prompt" (the opening), "assistant" (sampled) or "observation" (bridge: end of the turn,
            tool results, next generation prompt).
        text: the segment's text (the sampled text; the bridge text).
        start, end: its span in ``prompt_ids + ids``.
        sampled: True for assistant turns (the mask is True on exactly their span).
        messages: the chat messages the segment stands for (the opening; the assistant message; the
            observation messages as rendered, after truncation).
        calls: parsed tool calls (assistant turns), with ``call_spans`` their token spans.
        results: tool results (observation turns), with duration, truncation and token counts.
        reward: per-turn reward of the observation.
        policy_version: the weights that sampled the turn.
        finish: how generation ended ("eos", "stop", "length").
        seconds: generation (assistant) or tool (observation) wall time of this episode's share.
        events: failure events of this turn.
        state_key: the environment's state key before the turn (anchor-state credit), JSON-able.
        dropped: an observation that did not fit in the context and was not appended (span empty).
    """

    role: str
    text: str
    start: int
    end: int
    sampled: bool = False
    messages: list[dict] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    call_spans: list[tuple[int, int]] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    reward: float = 0.0
    policy_version: int | None = None
    finish: str | None = None
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)
    state_key: Any = None
    dropped: bool = False


@dataclass
class Episode:
    """One finished episode: tokens, turns, outcome. ``to_json`` / ``from_json`` round-trip exactly."""

    env: str
    env_version: str
    task_id: str
    task_hash: str
    group: int
    index: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    stop: str = ""
    failure: str | None = None
    events: list[str] = field(default_factory=list)
    grade: Grade | None = None
    reward: float = 0.0
    masked: bool = False
    verification: dict | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def policy_tokens(self) -> int:
        return sum(self.mask)

    def messages(self) -> list[dict]:
        """The conversation as chat messages (dropped observations left out)."""
        return [m for t in self.turns if not t.dropped for m in t.messages]

    def assistant_text(self) -> str:
        """The policy's own text, turns joined by newlines: what reward functions may read (tool output
        excluded, so a tool result that contains the answer earns nothing by itself)."""
        return "\n".join(t.text for t in self.turns if t.sampled)

    def to_json(self) -> dict:
        d = asdict(self)
        for t in d["turns"]:
            for c in t["calls"]:
                c["status"] = str(c["status"])
        return d

    @classmethod
    def from_json(cls, d: dict) -> Episode:
        d = dict(d)
        missing = {"env", "task_id", "prompt_ids", "turns", "grade"} - set(d)
        if missing:
            raise ValueError(f"episode record lacks field(s) {', '.join(sorted(missing))}")
        turns = []
        for t in d.pop("turns"):
            t = dict(t)
            t["calls"] = [
                ToolCall(**{**c, "status": ParseStatus(c["status"]), "chars": tuple(c["chars"])})
                for c in t["calls"]
            ]
            t["call_spans"] = [tuple(s) for s in t["call_spans"]]
            t["results"] = [ToolResult(**r) for r in t["results"]]
            turns.append(Turn(**t))
        grade = d.pop("grade")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"turns", "grade"}
        if unknown:
            raise ValueError(f"episode record has unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d, turns=turns, grade=Grade(**grade) if grade is not None else None)


def training_arrays(episode: Episode) -> tuple[Tensor, Tensor, Tensor]:
    """What a policy loss needs from an episode, aligned on ``prompt_ids + ids``.

    Returns:
        input_ids_L: [L] long.
        loss_mask_L: [L] bool, True exactly on the tokens the policy sampled; all False for a masked
            episode (infra, data, drift), which must not train at all.
        logprobs_L: [L] float32, the sampling log-prob of each sampled token, 0.0 elsewhere.

    The logits at position t-1 predict token t, so a token-level loss is
    ``-(token_logprobs(logits[:-1], input_ids[1:]) * loss_mask[1:])``.
    """
    P = len(episode.prompt_ids)
    input_ids = torch.tensor(episode.prompt_ids + episode.ids, dtype=torch.long)
    mask = torch.tensor([False] * P + [bool(m) for m in episode.mask], dtype=torch.bool)
    if episode.masked:
        mask = torch.zeros_like(mask)
    logprobs = torch.tensor([0.0] * P + list(episode.logprobs), dtype=torch.float32)
    return input_ids, mask, logprobs


def completion(episode: Episode) -> tuple[Completion, list[bool]]:
    """The episode as the rollout buffer holds a sample: a :class:`Completion` of ``ids`` after the shared
    prompt (its text the assistant's own), and the loss mask over those ids (all False when masked)."""
    sampled = [t for t in episode.turns if t.sampled]
    finish = "length" if sampled and sampled[-1].finish == "length" else "stop"
    c = Completion(
        token_ids=list(episode.ids),
        logprobs=list(episode.logprobs),
        text=episode.assistant_text(),
        finish_reason=finish,
        policy_version=sampled[0].policy_version or 0 if sampled else 0,
    )
    return c, [bool(m) and not episode.masked for m in episode.mask]


def write_jsonl(path: str | Path, episodes: Iterable[Episode], **extra) -> None:
    """Append one line per episode (``extra`` fields, e.g. ``step``, added to each)."""
    with open(path, "a") as f:
        for ep in episodes:
            f.write(json.dumps({**extra, **ep.to_json()}) + "\n")


def read_jsonl(path: str | Path) -> list[Episode]:
    """Episodes of a ``trajectories.jsonl`` (fields other than the episode's, like ``step``, dropped)."""
    known = {f.name for f in fields(Episode)}
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                d = json.loads(line)
                out.append(Episode.from_json({k: v for k, v in d.items() if k in known}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not an episode record ({e})") from e
    return out


def summarize(episodes: list[Episode]) -> dict[str, float]:
    """Per-batch agent metrics: rates of failure labels and stop reasons, turns, tool calls and errors
    per tool, the share of environment tokens, the share of drifted episodes."""
    n = max(1, len(episodes))
    out: dict[str, float] = {}
    for label, k in Counter(ep.failure for ep in episodes if ep.failure).items():
        out[f"agent/failure/{label}"] = k / n
    for stop, k in Counter(ep.stop for ep in episodes).items():
        out[f"agent/stop/{stop}"] = k / n
    calls, errors = Counter(), Counter()
    for ep in episodes:
        for t in ep.turns:
            for r in t.results:
                calls[r.name or "?"] += r.status != "skipped"
                errors[r.name or "?"] += r.status == "error"
    out.update({f"agent/tool_calls/{k}": v / n for k, v in calls.items()})
    out.update({f"agent/tool_errors/{k}": v / n for k, v in errors.items()})
    out["agent/turns"] = sum(sum(t.sampled for t in ep.turns) for ep in episodes) / n
    total = sum(len(ep.ids) for ep in episodes)
    out["agent/env_token_frac"] = sum(len(ep.ids) - ep.policy_tokens for ep in episodes) / max(1, total)
    out["agent/masked_frac"] = sum(ep.masked for ep in episodes) / n
    out["agent/reward"] = sum(ep.reward for ep in episodes) / n
    return out
