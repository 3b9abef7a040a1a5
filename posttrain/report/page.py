"""report.html: one self-contained page for a run directory, or for a pipeline directory of
stage runs (a section per stage). Plots are embedded as base64 PNG data URIs and the CSS is
inline; the page has no script and its Content-Security-Policy forbids fetching anything, so
it reads the same offline, attached to an email, or years later."""

from __future__ import annotations

import base64
import html
import math
import shlex
import shutil
import struct
from datetime import datetime, timezone
from pathlib import Path

from posttrain import __version__
from posttrain.errors import PosttrainError
from posttrain.report.agents import CSS as AGENT_CSS
from posttrain.report.agents import agent_section
from posttrain.report.plots import ACTION_COLOURS, draw_panel, draw_rm_audit, plan_panels
from posttrain.report.runs import RunData, is_run, load_run, stage_dirs

N_SAMPLES = 3
"""Best and worst samples of the last step shown."""
MAX_ALERT_ROWS = 200
TEXT_CHARS = 600
"""Prompts and completions longer than this are cut in the samples table."""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html for a run directory (or a pipeline directory of stage runs) and the
    plots as PNG files under ``RUN_DIR/report/``.

    Args:
        run_dir: a run directory (metrics.jsonl and/or manifest.json in it), or a directory
            whose subdirectories are runs (``posttrain quickstart``'s output, a pipeline).
        out: the HTML file to write; default ``RUN_DIR/report.html``.

    Returns:
        The path of the HTML file.

    Raises:
        PosttrainError: run_dir is neither a run nor holds any.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PosttrainError(f"{run_dir}: no such directory")
    stages = [] if (run_dir / "metrics.jsonl").is_file() else stage_dirs(run_dir)
    if not stages and not is_run(run_dir):
        raise PosttrainError(
            f"{run_dir}: not a run directory (no metrics.jsonl or manifest.json) and no runs inside it"
        )
    out = Path(out) if out else run_dir / "report.html"
    plots = run_dir / "report"
    plots.mkdir(exist_ok=True)
    for old in plots.glob("*.png"):  # plots of metrics no longer logged must not linger
        old.unlink()

    name = run_dir.resolve().name
    if stages:
        runs = [load_run(d) for d in stages]
        anchors = {r.path.resolve(): r.name for r in runs}
        body = _pipeline_overview(runs, load_run(run_dir).summary) + "".join(
            _run_section(r, plots, prefix=f"{r.name}-", anchors=anchors) for r in runs
        )
        nav = "".join(f'<a href="#run-{_esc(r.name)}">{_esc(r.name)}</a>' for r in runs)
        title = f"Pipeline report: {name}"
    else:
        body = _run_section(load_run(run_dir), plots, prefix="", anchors={})
        nav, title = "", f"Run report: {name}"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{_esc(title)}</title>
<style>{CSS}{AGENT_CSS}</style>
</head>
<body>
<header><div class="wrap">
<h1>{_esc(title)}</h1>
<p class="muted mono">{_esc(str(run_dir.resolve()))}</p>
{f"<nav>Stages: {nav}</nav>" if nav else ""}
</div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap muted">Generated {generated} by posttrain {__version__}. Self-contained: no scripts, nothing fetched;
the plots are also in {_esc(str(plots))}/.</footer>
</body>
</html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------- sections


def _run_section(run: RunData, plots: Path, *, prefix: str, anchors: dict[Path, str]) -> str:
    series, nonfinite = run.series(), run.nonfinite()
    parts = [
        f'<section class="run" id="run-{_esc(run.name)}">',
        f"<h2>{_esc(run.name)} {_badge(run.algorithm or 'run')}</h2>" if prefix else "",
        _overview(run, anchors),
    ]
    if run.alerts:
        parts.append(_alerts(run.alerts))
    figures = []  # (html, height in pixels)
    for panel, subplots in plan_panels(series):
        png = draw_panel(plots / f"{prefix}{panel.key}.png", panel, subplots, series, run.alerts, nonfinite)
        metrics = [m for names in subplots for m in names]
        alt = f"{panel.title}: {', '.join(metrics)}"
        figures.append((_figure(png, f"plot-{prefix}{panel.key}", alt, metrics), _png_height(png)))
    parts.append("<h3>Curves</h3>")
    parts.append(_two_columns(figures) if figures else '<p class="muted">No metrics logged.</p>')
    if run.eval:
        parts += ["<h3>Evaluation (eval.json)</h3>", _kv_table(_flatten(run.eval))]
    if run.rm_audit or run.rm_audit_png:
        parts.append(_rm_audit(run, plots, prefix))
    if run.samples:
        parts.append(_samples(run.samples))
    parts.append(agent_section(run.path))  # agent runs: labels, stops, episodes with the mask view
    if series or nonfinite:
        parts.append(_metric_table(series, nonfinite))
    if run.config_text:
        parts.append(f"<details><summary>config.yaml</summary><pre>{_esc(run.config_text)}</pre></details>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _overview(run: RunData, anchors: dict[Path, str]) -> str:
    m, cfg = run.manifest, run.config
    rows: list[tuple[str, str]] = [("algorithm", _esc(run.algorithm or "?"))]
    models = m.get("models") or [(cfg.get("model") or {}).get("path")]
    rows.append(("model", "<br>".join(f'<span class="mono">{_esc(x)}</span>' for x in models if x)))
    steps = run.last_step
    if steps is not None:
        rows.append(("steps", f"{steps} ({len(run.metrics)} log lines)"))
    if wall := _wall_time(run):
        rows.append(("wall time", wall))
    for key in ("created", "seed", "git_commit", "processes"):
        if m.get(key) is not None:
            rows.append((key.replace("_", " "), f'<span class="mono">{_esc(m[key])}</span>'))
    if m.get("command"):
        rows.append(("command", f'<span class="mono">{_esc(shlex.join(map(str, m["command"])))}</span>'))
    if host := m.get("host"):
        rows.append(
            ("host", _esc(" · ".join(f"{v} CPUs" if k == "cpus" else str(v) for k, v in host.items())))
        )
    if params := m.get("parameters"):
        rows.append(("parameters", _esc(" · ".join(f"{k} {_fmt_int(v)}" for k, v in params.items()))))
    if data := m.get("data"):
        rows.append(("data", _esc(" · ".join(f"{k} {v}" for k, v in data.items()))))
    if "parents" in m:
        links = [
            f'<a href="#run-{_esc(anchors[Path(p)])}">{_esc(anchors[Path(p)])}</a>'
            if Path(p) in anchors
            else f'<span class="mono">{_esc(p)}</span>'
            for p in m["parents"]
        ]
        rows.append(("parents", ", ".join(links) or '<span class="muted">none</span>'))
    if versions := m.get("versions"):
        rows.append(("versions", _esc(" · ".join(f"{k} {v}" for k, v in versions.items() if v))))
    table = _rows_table(rows, header=None, cls="kv")
    inputs = m.get("inputs") or {}
    if inputs:
        files = [
            (
                f'<span class="mono">{_esc(path)}</span>',
                f'<span class="mono" title="{_esc(h)}">{_esc(h[:12])}</span>',
            )
            for path, h in inputs.items()
        ]
        table += "<details><summary>Input files and models (sha256)</summary>"
        table += _rows_table(files, header=("file", "sha256")) + "</details>"
    return table


def _alerts(alerts: list[dict]) -> str:
    counts: dict[str, int] = {}
    for a in alerts:
        counts[a.get("action", "warn")] = counts.get(a.get("action", "warn"), 0) + 1
    summary = " ".join(_badge(f"{n} {action}", action) for action, n in counts.items())
    rows = [
        (str(a["step"]), _badge(a.get("action", "warn"), a.get("action", "warn")), _esc(a.get("rule", "")),
         _esc(a.get("message", "")))
        for a in alerts[:MAX_ALERT_ROWS]
    ]  # fmt: skip
    more = (
        f'<p class="muted">{len(alerts) - MAX_ALERT_ROWS} more in alerts.jsonl.</p>'
        if len(alerts) > MAX_ALERT_ROWS
        else ""
    )
    table = _rows_table(rows, header=("step", "action", "rule", "message"), cls="alerts")
    return f'<h3>Alerts {summary}</h3>\n<p class="muted">Dashed lines on every plot below.</p>{table}{more}'


def _figure(png: Path, id_: str, alt: str, metrics: list[str]) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return (
        f'<figure class="plot"><img id="{_esc(id_)}" alt="{_esc(alt)}" data-metrics="{_esc(" ".join(metrics))}" '
        f'src="data:image/png;base64,{data}"></figure>'
    )


def _two_columns(figures: list[tuple[str, int]]) -> str:
    """Plots in two columns, each into the shorter one so far: they read left to right, top to
    bottom, and a tall plot (several subplots) leaves no hole beside it, as it would in a grid."""
    columns: list[list[str]] = [[], []]
    heights = [0, 0]
    for html_, height in figures:
        i = heights.index(min(heights))
        columns[i].append(html_)
        heights[i] += height
    return '<div class="grid">' + "".join(f'<div class="col">{"".join(c)}</div>' for c in columns) + "</div>"


def _png_height(png: Path) -> int:
    with open(png, "rb") as f:
        return struct.unpack(">I", f.read(24)[20:24])[0]  # IHDR: width at bytes 16-19, height at 20-23


def _rm_audit(run: RunData, plots: Path, prefix: str) -> str:
    png, audit = plots / f"{prefix}rm_audit.png", run.rm_audit or {}
    parts = ["<h3>Reward-model audit</h3>"]
    if run.rm_audit_png or "held_out" in audit:
        if run.rm_audit_png:
            shutil.copyfile(run.rm_audit_png, png)
        else:
            draw_rm_audit(png, audit)
        parts.append(_figure(png, f"plot-{prefix}rm_audit", "Reward-model audit", []))
    if "held_out" in audit:
        verdict_of = {"short_better": audit.get("verdicts", {}).get("length"), **audit.get("verdicts", {})}
        rows = []
        for name, e in [("held-out", audit["held_out"]), *audit.get("probes", {}).items()]:
            lo, hi = e.get("ci95") or (None, None)
            verdict = verdict_of.get(name) or ""
            badge = _badge(verdict, "stop" if verdict == "detected" else "ok") if verdict else ""
            ci = f"[{_fmt(lo)}, {_fmt(hi)}]"
            rows.append(
                (_esc(name), _num(e.get("n")), _num(e.get("accuracy")), ci, _num(e.get("flip_rate")), badge)
            )
        parts.append(_rows_table(rows, header=("set", "n", "accuracy", "95% CI", "flip rate", "verdict")))
        cal, length = audit.get("calibration", {}), audit.get("length", {})
        parts.append(
            f"<p>Calibration: ECE {_fmt(cal.get('ece'))}, Bradley-Terry log-loss {_fmt(cal.get('log_loss'))} "
            f"(log 2 = 0.693). Score vs length: Spearman {_fmt(length.get('spearman'))}, Pearson "
            f"{_fmt(length.get('pearson'))}, length bias {_esc(length.get('verdict', '?'))}.</p>"
        )
    return "\n".join(parts)


def _samples(samples: list[dict]) -> str:
    # One of each distinct (prompt, completion): a group's identical samples would fill the table.
    distinct = {(str(s.get("prompt")), str(s.get("completion"))): s for s in samples}.values()
    scored = sorted(
        (s for s in distinct if isinstance(s.get("reward"), (int, float))), key=lambda s: -s["reward"]
    )
    if len(scored) <= 2 * N_SAMPLES:
        picked = [("", s) for s in scored]
    else:
        picked = [("best", s) for s in scored[:N_SAMPLES]] + [("worst", s) for s in scored[-N_SAMPLES:]]
    rewards = [s["reward"] for s in samples if isinstance(s.get("reward"), (int, float))]
    truncated = sum(s.get("finish_reason") == "length" for s in samples)
    head = (
        f'<h3>Samples at step {_esc(samples[0].get("step"))}</h3><p class="muted">{len(samples)} samples'
        + (f", mean reward {_fmt(sum(rewards) / len(rewards))}" if rewards else "")
        + f", {truncated} cut at the length limit. The {N_SAMPLES} best and worst distinct ones by reward "
        "(samples.jsonl).</p>"
    )
    rows = []
    for rank, s in picked:
        components = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("components") or {}).items())
        rows.append(
            (_esc(rank), _num(s.get("reward")), _esc(components), _num(s.get("tokens")),
             _esc(s.get("finish_reason", "")), _text(s.get("prompt")), _text(s.get("completion")))
        )  # fmt: skip
    header = ("", "reward", "components", "tokens", "finish", "prompt", "completion")
    return head + _rows_table(rows, header=header, cls="samples")


def _metric_table(series: dict[str, tuple[list[int], list[float]]], nonfinite: dict[str, list[int]]) -> str:
    rows = []
    for name in sorted(series.keys() | nonfinite.keys(), key=lambda n: (n.startswith("eval/"), n)):
        steps, values = series.get(name, ([], []))
        bad = f' <span class="badge stop">+{len(nonfinite[name])} NaN/Inf</span>' if name in nonfinite else ""
        cells = [f'<span class="mono">{_esc(name)}</span>', _num(len(values)) + bad]
        if values:
            lo = min(range(len(values)), key=values.__getitem__)
            hi = max(range(len(values)), key=values.__getitem__)
            cells += [_num(values[0]), _num(values[-1]),
                      f'{_num(values[lo])} <span class="muted">@{steps[lo]}</span>',
                      f'{_num(values[hi])} <span class="muted">@{steps[hi]}</span>']  # fmt: skip
        rows.append(cells + [_num(None)] * (6 - len(cells)))
    table = _rows_table(rows, header=("metric", "points", "first", "last", "min @step", "max @step"))
    return f"<details open><summary>Every metric: first, last, min and max</summary>{table}</details>"


def _pipeline_overview(runs: list[RunData], summary: dict | None) -> str:
    rows = []
    for r in runs:
        last = {k: v[-1] for k, (_, v) in r.series().items()}
        evals = ", ".join(f"{k[5:]} {_fmt(v)}" for k, v in last.items() if k.startswith("eval/"))
        n = len(r.alerts)
        alerts = _badge(f"{n} alert{'s' * (n > 1)}", "warn") if n else '<span class="muted">none</span>'
        rows.append(
            (f'<a href="#run-{_esc(r.name)}">{_esc(r.name)}</a>', _esc(r.algorithm or "?"), _num(r.last_step),
             _num(last.get("loss")), _esc(evals), alerts)
        )  # fmt: skip
    parts = [
        "<h2>Stages</h2>",
        _rows_table(rows, header=("stage", "algorithm", "steps", "last loss", "last eval", "alerts")),
    ]
    if summary:
        parts += ["<h3>Pipeline summary (summary.json)</h3>", _kv_table(_flatten(summary))]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------- helpers


def _rows_table(rows, *, header: tuple[str, ...] | None, cls: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _kv_table(items: dict) -> str:
    rows = [(f'<span class="mono">{_esc(k)}</span>', _num(v)) for k, v in items.items()]
    return _rows_table(rows, header=None, cls="kv")


def _flatten(obj, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys; lists of scalars joined."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and len(obj) > 8:
        return {prefix: f"[{len(obj)} items]"}
    if isinstance(obj, list):
        return {prefix: ", ".join(_fmt(x) for x in obj)}
    return {prefix: obj}


def _wall_time(run: RunData) -> str | None:
    times = [r["time"] for r in run.metrics if isinstance(r.get("time"), (int, float))]
    if not times:
        return None
    start = min(times)
    try:
        start = min(start, datetime.fromisoformat(run.manifest["created"]).timestamp())
    except (KeyError, TypeError, ValueError):
        pass
    seconds = max(times) - start
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        return f"{v:.3e}" if a and (a < 1e-3 or a >= 1e6) else f"{v:.4g}"
    return "–" if v is None else str(v)


def _fmt_int(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else _fmt(v)


def _num(v) -> str:
    return f'<span class="num">{_esc(_fmt(v))}</span>'


def _text(v) -> str:
    s = "" if v is None else str(v)
    cut = s[:TEXT_CHARS] + (f" … (+{len(s) - TEXT_CHARS} chars)" if len(s) > TEXT_CHARS else "")
    return f'<pre class="text">{_esc(cut)}</pre>'


def _badge(text: str, kind: str = "") -> str:
    return f'<span class="badge {_esc(kind)}">{_esc(text)}</span>'


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


CSS = """
:root { --fg: #1f2328; --muted: #656d76; --border: #d0d7de; --soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
.wrap { max-width: 1320px; margin: 0 auto; padding: 0 28px; }
header { background: var(--soft); border-bottom: 1px solid var(--border); padding: 18px 0 12px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 20px; margin: 28px 0 8px; }
h3 { font-size: 16px; margin: 24px 0 8px; }
nav { margin-top: 6px; } nav a { margin-right: 14px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
section.run { border-top: 3px solid var(--border); margin-top: 28px; }
section.run:first-of-type { border-top: none; }
.muted { color: var(--muted); }
.mono, pre { font-family: ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12px; }
.grid { display: flex; gap: 16px; align-items: flex-start; }
.grid .col { flex: 1 1 0; min-width: 0; }
@media (max-width: 1000px) { .grid { display: block; } }
figure.plot { margin: 0 0 16px; padding: 6px; border: 1px solid var(--border); border-radius: 8px; }
figure.plot img { display: block; width: 100%; height: auto; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--border); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.samples pre.text { margin: 0; max-width: 420px; max-height: 140px; overflow: auto; white-space: pre-wrap;
  word-break: break-word; background: var(--soft); padding: 4px 6px; border-radius: 4px; }
pre { background: var(--soft); padding: 10px; border-radius: 6px; overflow: auto; max-height: 420px; }
details { margin: 8px 0 14px; } summary { cursor: pointer; color: var(--muted); }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 500;
  vertical-align: middle; border: 1px solid var(--border); background: var(--soft); color: var(--fg); }
.badge.ok { color: #1a7f37; border-color: #1a7f37; background: #dafbe1; }
footer { margin: 40px auto 24px; font-size: 12px; }
""" + "".join(
    f".badge.{a} {{ color: {c}; border-color: {c}; background: {c}14; }}\n" for a, c in ACTION_COLOURS.items()
)
