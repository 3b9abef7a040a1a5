"""Replay of stored agent episodes (a run's ``trajectories.jsonl``): determinism checks, regrading, reuse.

    records = load_records(run_dir)                 # (step, line, Episode), in file order
    factory, tasks = run_env(run_dir)               # today's environment code and the run's task rows
    result = execute(episode, factory, tasks[episode.task_hash])

:func:`execute` makes a fresh environment from the episode's task row, checks its opening against the
recorded one, then feeds it the recorded actions (each assistant turn's text and parsed calls, exactly as
the runner did) and compares, turn by turn, the state key before the turn and every tool result (tool
name, status, failure label, content) and per-turn reward of the observation; at the end it grades the
environment and compares the grade. A tool whose output differs on the same calls is nondeterministic
(or its code changed) and is reported by name and turn (:class:`Diff`).

Environments do not serialise their state, so "the stored final state" that ``--regrade`` grades is the
state the recorded actions reach in a fresh environment (the same walk as :func:`execute`): when
``--execute`` reports no observation diff the state is the recorded one, and a grade diff is the
grader's doing (a grader regression, or a fix).

Contents truncated by the runner (``ToolResult.truncated``) are compared by status only: the stored text is
cut by the run's token budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.agents.env import Action, Grade
from posttrain.agents.threads import call_all
from posttrain.agents.trajectory import Episode, task_hash
from posttrain.errors import DataError

SKIP_STOPS = ("env_error", "task_invalid", "engine_error")
"""Episodes that never ran as recorded (the environment or the engine broke): nothing to replay."""


@dataclass
class Record:
    """One line of trajectories.jsonl: the episode and where it is (``step``, ``line``, ``run_id``)."""

    step: int | None
    line: int
    episode: Episode
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``step/index`` (``line N`` for records without a step)."""
        return f"{self.step}/{self.episode.index}" if self.step is not None else f"line {self.line}"


def trajectories_file(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    path = path if path.is_file() else path / "trajectories.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no trajectories.jsonl (is {run_dir} an agent run directory?)")
    return path


def load_records(run_dir: str | Path) -> list[Record]:
    """Every episode of a run (a run directory or a trajectories.jsonl), with its step and line number."""
    from dataclasses import fields

    path = trajectories_file(run_dir)
    known = {f.name for f in fields(Episode)}
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ep = Episode.from_json({k: v for k, v in d.items() if k in known})
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{n}: not an episode record ({e})") from None
        out.append(Record(d.get("step"), n, ep, {k: v for k, v in d.items() if k not in known}))
    return out


def run_env(run_dir: str | Path, tasks_files: list[str] | None = None):
    """Today's environment factory of a run (its ``config.yaml``'s ``env`` section) and its task rows by
    task hash: the run's own (``data.train`` / ``data.eval`` files, or the environment's generator with
    the run's seed and counts), or the rows of ``tasks_files``."""
    from posttrain.agents.config import env_factory, task_rows
    from posttrain.config import load_config

    run_dir = Path(run_dir)
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise DataError(f"{config}: not found (replay needs the run's config for its environment)")
    cfg = load_config(config)
    if cfg.env is None:
        raise DataError(f"{config}: no env section (not an agent run)")
    rows = []
    if tasks_files:
        rows = task_rows(cfg.env, list(tasks_files), split="train")
    else:
        rows = task_rows(cfg.env, _files(cfg.data.train), split="train")
        rows += task_rows(cfg.env, _files(cfg.data.eval), split="held_out")
    return env_factory(cfg.env), {task_hash(t): t for t in rows}, cfg


# --- execute ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    """One difference between the record and the replay: ``turn`` indexes ``episode.turns``; ``tool`` is
    the tool whose result differs (None for the opening, state keys, rewards, the grade)."""

    episode: str
    turn: int
    what: str  # opening, state_key, result, reward, done, grade, error
    tool: str | None
    recorded: str
    replayed: str


@dataclass
class Replayed:
    """What replaying one episode gave: its diffs and today's grade (None when it could not grade)."""

    record: Record
    diffs: list[Diff] = field(default_factory=list)
    grade: Grade | None = None
    skipped: str | None = None

    @property
    def observation_diffs(self) -> list[Diff]:
        return [d for d in self.diffs if d.what != "grade"]


def _call(fn: Callable, timeout: float):
    status, value = call_all([fn], [timeout])[0]
    if status != "ok":
        raise RuntimeError("timed out" if status == "timeout" else f"{type(value).__name__}: {value}")
    return value


def _short(x) -> str:
    text = x if isinstance(x, str) else json.dumps(x, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def grade_text(g: Grade | None) -> str:
    if g is None:
        return "-"
    return f"{g.reward:g} {'passed' if g.passed else g.failure or 'failed'}"


def execute(record: Record, factory, task: dict | None, *, timeout: float = 30.0) -> Replayed:
    """Re-run one recorded episode in a fresh environment and diff it (module docstring)."""
    ep, out = record.episode, Replayed(record)
    if ep.stop in SKIP_STOPS or not ep.turns:
        out.skipped = f"stop {ep.stop}: never ran as recorded"
        return out
    if task is None:
        out.skipped = f"task {ep.task_id} (hash {ep.task_hash}) not among the run's task rows"
        return out
    name = record.name

    def diff(turn, what, tool, recorded, replayed):
        out.diffs.append(Diff(name, turn, what, tool, _short(recorded), _short(replayed)))

    env = None
    try:
        env = _call(lambda: factory(task), timeout)
        opening = _call(env.reset, timeout)
        if [dict(m) for m in opening] != ep.turns[0].messages:
            diff(0, "opening", None, ep.turns[0].messages, opening)
        turns = ep.turns
        for k, turn in enumerate(turns):
            if not turn.sampled:
                continue
            key_fn = getattr(env, "state_key", None)
            key = json.loads(json.dumps(key_fn(), default=str)) if key_fn else None
            if key != turn.state_key:
                diff(k, "state_key", None, turn.state_key, key)
            nxt = turns[k + 1] if k + 1 < len(turns) else None
            if nxt is None or nxt.role != "observation":
                continue  # the runner stopped before stepping (a budget, a loop, a forged observation)
            action = Action(turn.text, tuple(turn.calls), turn.finish or "eos")
            obs = _call(lambda a=action: env.step(a), timeout * max(1, len(turn.calls)))
            _diff_observation(diff, k + 1, nxt, obs, last=k + 2 >= len(turns), stop=ep.stop)
        out.grade = _call(env.grade, timeout)
    except Exception as e:  # noqa: BLE001 — a replay that breaks is a finding, reported as a diff
        diff(len(ep.turns), "error", None, "-", f"{type(e).__name__}: {e}")
    finally:
        if env is not None and hasattr(env, "close"):
            try:
                env.close()
            except Exception:  # noqa: BLE001, S110 — closing is best effort here
                pass
    if out.grade is not None and ep.grade is not None:
        old, new = ep.grade, out.grade
        if (old.reward, old.passed, old.failure) != (new.reward, new.passed, new.failure):
            diff(len(ep.turns), "grade", None, grade_text(old), grade_text(new))
    return out


def _diff_observation(diff, k: int, recorded, obs, *, last: bool, stop: str) -> None:
    rec_results = recorded.results
    if len(rec_results) != len(obs.results):
        diff(k, "result", None, f"{len(rec_results)} results", f"{len(obs.results)} results")
    for old, new in zip(rec_results, obs.results):
        tool = old.name or new.name
        if (old.status, old.label) != (new.status, new.label):
            diff(
                k,
                "result",
                tool,
                f"{old.status} {old.label or ''}".strip(),
                f"{new.status} {new.label or ''}".strip(),
            )
        elif not old.truncated and old.content != new.content:
            diff(k, "result", tool, old.content, new.content)
    if abs(float(recorded.reward) - float(obs.reward)) > 1e-9:
        diff(k, "reward", None, recorded.reward, obs.reward)
    if not last and obs.done:
        diff(k, "done", None, "episode went on", "done")
    elif last and stop in ("env_done", "no_action") and not obs.done:
        diff(k, "done", None, "done", "episode would go on")


def replay_run(run_dir, *, tasks_files=None, timeout: float = 30.0, progress: bool = True) -> list[Replayed]:
    """:func:`execute` on every episode of a run (a progress bar on stderr)."""
    from tqdm.auto import tqdm

    records = load_records(run_dir)
    factory, tasks, _ = run_env(run_dir, tasks_files)
    return [
        execute(r, factory, tasks.get(r.episode.task_hash), timeout=timeout)
        for r in tqdm(records, desc="replay", unit="episode", disable=not progress)
    ]


def environment_changes(run_dir, tasks_files=None) -> list[str]:
    """What changed in the environment since the run, by its manifest's ``env`` block (``agents.audit``):
    source files whose sha256 differs, a different task set. Empty when nothing did (or no record)."""
    from posttrain.agents.audit import changed_sources, tasks_digest

    path = Path(run_dir)
    manifest = (path.parent if path.is_file() else path) / "manifest.json"
    if not manifest.is_file():
        return []
    block = json.loads(manifest.read_text()).get("env") or {}
    if not block:
        return []
    factory, tasks, _ = run_env(run_dir, tasks_files)
    out = [f"source changed: {f}" for f in changed_sources(block, factory.cls)]
    if block.get("all_tasks_sha256") and not tasks_files:
        if tasks_digest(list(tasks.values())) != block["all_tasks_sha256"]:
            out.append("the task rows differ from the run's (env.tasks_sha256 in manifest.json)")
    return out


def table(header: list[str], rows: list[list]) -> str:
    """A plain-text table (columns padded to their widest cell)."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def regrade_rows(results: list[Replayed]) -> list[list[str]]:
    """``[episode, task, old grade, new grade, note]`` for each episode whose grade changed; the note says
    when the replayed state itself diverged (then the grade diff is not the grader's alone)."""
    rows = []
    for r in results:
        if r.skipped or r.grade is None:
            continue
        old, new = r.record.episode.grade, r.grade
        if old is None or (old.reward, old.passed, old.failure) != (new.reward, new.passed, new.failure):
            diverged = r.observation_diffs
            note = f"state diverged at turn {diverged[0].turn} ({diverged[0].what})" if diverged else ""
            rows.append([r.record.name, r.record.episode.task_id, grade_text(old), grade_text(new), note])
    return rows


def _files(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)
