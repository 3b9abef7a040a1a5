"""The report's view of an agent run: the last step's failure labels and stop reasons, and episodes
rendered turn by turn with the trainable spans (what the policy sampled) highlighted and the environment's
greyed, so that a masking bug shows at a glance (trajectories.jsonl)."""

from __future__ import annotations

import html
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
"""


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
    return "\n".join(
        [
            f"<h3>Agent episodes at step {_esc(episodes[0].get('step'))}</h3>",
            f'<p class="muted">{n} episodes of {_esc(episodes[0].get("env", "?"))} (trajectories.jsonl). '
            "Green: tokens the policy sampled (the loss mask); grey: the environment's.</p>",
            "<table><thead><tr><th>failure label</th><th>episodes</th><th>share</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>",
            "<table><thead><tr><th>stop reason</th><th>episodes</th><th>share</th></tr></thead>"
            f"<tbody>{stop_rows}</tbody></table>",
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
        if t.get("role") == "prompt":
            text = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in t.get("messages", []))
            parts.append(f'<pre class="env">{_esc(text)}</pre>')
        elif t.get("sampled"):
            calls = ", ".join(f"{c.get('name')}: {c.get('status')}" for c in t.get("calls", []))
            label = f"  [{calls}]" if calls else ""
            parts.append(f'<pre class="sampled">{_esc(t.get("text", ""))}{_esc(label)}</pre>')
        else:
            parts.append(f'<pre class="env">{_esc(t.get("text", ""))}</pre>')
    return f'<div class="episode"><p>{head}</p>{"".join(parts)}</div>'


def _esc(v) -> str:
    return html.escape(str(v), quote=True)
