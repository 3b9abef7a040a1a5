"""The report's view of an agent run: the last step's failure labels and stop reasons, their counts over
the last steps, and episodes rendered turn by turn with the trainable spans highlighted and the
environment's greyed, so that a masking bug shows at a glance (trajectories.jsonl).

A turn's colour comes from the episode's loss mask over the turn's tokens (``mask[start - P : end - P]``),
not from who wrote it: green where the mask trains every token, grey where it trains none, orange where it
is mixed. A turn whose mask disagrees with its role (a sampled turn not trained, a tool result trained) is
outlined red and counted above the episodes."""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from posttrain.report.runs import last_step_samples

SHOWN = 2
"""Episodes rendered: the best and the worst of the last step."""

CSS = """
.episode { border: 1px solid var(--border); border-radius: 6px; margin: 8px 0; padding: 6px 10px; }
.episode pre { margin: 2px 0; white-space: pre-wrap; font-size: 12px; }
.episode pre.sampled { background: #dafbe1; border-left: 3px solid #1a7f37; padding-left: 6px; }
.episode pre.env { color: var(--muted); background: var(--soft); padding-left: 9px; }
.episode pre.mixed { background: #fff1d6; border-left: 3px solid #bc4c00; padding-left: 6px; }
.episode pre.mismatch { outline: 2px solid #cf222e; }
p.mismatch { color: #cf222e; font-weight: bold; }
"""
STEPS_SHOWN = 8
"""Steps (the last ones) in the labels-over-steps table."""


def agent_section(run_dir: Path) -> str:
    """HTML for the agent episodes of the run's last step ("" when the run has no trajectories)."""
    episodes = last_step_samples(Path(run_dir) / "trajectories.jsonl")
    if not episodes:
        return ""
    n = len(episodes)
    failures = Counter(e.get("failure") or "none (passed)" for e in episodes)
    stops = Counter(e.get("stop") or "?" for e in episodes)
    rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{v}</td><td>{v / n:.0%}</td></tr>" for k, v in failures.most_common()
    )
    stop_rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{v}</td><td>{v / n:.0%}</td></tr>" for k, v in stops.most_common()
    )
    ranked = sorted(episodes, key=lambda e: e.get("reward") or 0.0)
    shown = [ranked[-1], ranked[0]][: min(SHOWN, n)] if n > 1 else ranked
    wrong = sum(_mismatch(e, t) for e in episodes for t in e.get("turns", []))
    warning = (
        f'<p class="mismatch">{wrong} turn(s) of this step have a loss mask that disagrees with who wrote '
        "them (outlined red): a masking bug.</p>"
        if wrong
        else ""
    )
    return "\n".join(
        [
            f"<h3>Agent episodes at step {_esc(episodes[0].get('step'))}</h3>",
            f'<p class="muted">{n} episodes of {_esc(episodes[0].get("env", "?"))} (trajectories.jsonl). '
            "Green: turns the loss mask trains (what the policy sampled); grey: turns it does not (the "
            "environment's); orange: mixed.</p>",
            "<table><thead><tr><th>failure label</th><th>episodes</th><th>share</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>",
            "<table><thead><tr><th>stop reason</th><th>episodes</th><th>share</th></tr></thead>"
            f"<tbody>{stop_rows}</tbody></table>",
            _over_steps(Path(run_dir) / "trajectories.jsonl"),
            warning,
            *(_episode(e) for e in shown),
        ]
    )


def _episode(e: dict) -> str:
    grade = e.get("grade") or {}
    head = (
        f"task {_esc(e.get('task_id'))}: reward {e.get('reward')}, stop {_esc(e.get('stop'))}, "
        f"failure {_esc(e.get('failure'))}; {_esc(grade.get('detail', ''))}"
    )
    parts = []
    for t in e.get("turns", []):
        cls = _mask_class(e, t) + (" mismatch" if _mismatch(e, t) else "")
        if t.get("role") == "prompt":
            text = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in t.get("messages", []))
            parts.append(f'<pre class="{cls}">{_esc(text)}</pre>')
        elif t.get("sampled"):
            calls = ", ".join(f"{c.get('name')}: {c.get('status')}" for c in t.get("calls", []))
            label = f"  [{calls}]" if calls else ""
            parts.append(
                f'<pre class="{cls}" data-role="assistant">{_esc(t.get("text", ""))}{_esc(label)}</pre>'
            )
        else:
            parts.append(
                f'<pre class="{cls}" data-role="{_esc(t.get("role"))}">{_esc(t.get("text", ""))}</pre>'
            )
    return f'<div class="episode"><p>{head}</p>{"".join(parts)}</div>'


def _turn_mask(e: dict, t: dict) -> list[bool]:
    """The loss mask over a turn's tokens (turn spans count from the prompt's start, the mask from ids')."""
    P = len(e.get("prompt_ids") or [])
    if t.get("role") == "prompt":
        return [False] * P
    mask = e.get("mask") or []
    return [bool(m) for m in mask[max(0, t.get("start", 0) - P) : max(0, t.get("end", 0) - P)]]


def _mask_class(e: dict, t: dict) -> str:
    m = _turn_mask(e, t)
    if not m:  # an empty span (a dropped observation): as its role
        return "sampled" if t.get("sampled") else "env"
    return "sampled" if all(m) else ("env" if not any(m) else "mixed")


def _mismatch(e: dict, t: dict) -> bool:
    m = _turn_mask(e, t)
    return bool(m) and (not all(m) if t.get("sampled") else any(m))


def _over_steps(path: Path, max_bytes: int = 64 << 20) -> str:
    """A table of failure labels and stop reasons (rows) over the last STEPS_SHOWN steps (columns), from
    the file's last max_bytes (the oldest step read may be partial)."""
    counts: dict[object, Counter] = {}
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - max_bytes))
        if size > max_bytes:
            f.readline()  # cut in the middle
        for line in f:
            try:
                r = json.loads(line.decode(errors="replace"))
            except ValueError:
                continue
            c = counts.setdefault(r.get("step"), Counter())
            c[("failure", r.get("failure") or "none (passed)")] += 1
            c[("stop", r.get("stop") or "?")] += 1
    steps = list(counts)[-STEPS_SHOWN:]
    if len(steps) < 2:
        return ""
    keys = sorted({k for s in steps for k in counts[s]})
    head = "".join(f"<th>{_esc(s)}</th>" for s in steps)
    body = "".join(
        f"<tr><td>{_esc(kind)}</td><td>{_esc(name)}</td>"
        + "".join(f"<td>{counts[s][(kind, name)]}</td>" for s in steps)
        + "</tr>"
        for kind, name in keys
    )
    return (
        '<table class="over-steps"><thead><tr><th>kind</th><th>label</th>'
        f"{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _esc(v) -> str:
    return html.escape(str(v), quote=True)
