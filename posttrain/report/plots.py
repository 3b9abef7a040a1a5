"""The report's plots: metric curves grouped into panels, alerts marked on every one.

A panel is one PNG with one or more stacked subplots sharing the step axis. The panels below
name the metrics the loop and the algorithms log (see posttrain/monitor for the names); a
metric none of them claims still gets a curve, in a panel of its own prefix (``rewards/*``
for DPO, ``value_*`` for PPO, ...), so a new algorithm's metrics show up without a change
here. Only metrics present in the log are drawn; a panel with none is left out.

Matplotlib is used through ``Figure`` directly (no pyplot): no global state, no backend switch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

ACTION_COLOURS = {"warn": "#bf8700", "rollback": "#8250df", "stop": "#cf222e"}
SMOOTH_MIN_POINTS = 50
"""Noisy curves with at least this many points are drawn raw (faint) under a moving average."""
NOT_SMOOTHED = ("lr", "kl_ctl", "eval/*")
"""Schedules and sparse eval points: drawn as logged."""
SCALE_GAP = 20.0
"""In panels that split by scale, metrics whose typical size differs by more get their own subplot."""
MAX_ALERT_LABELS = 12
"""Above this many alerts in a run, only the first firing of each rule is labelled."""


@dataclass(frozen=True)
class Panel:
    key: str  # file name and HTML id
    title: str
    axes: tuple[tuple[str, ...], ...]  # per subplot, metric names or fnmatch patterns
    log_y: bool = False
    split_by_scale: bool = False
    last: bool = False  # engineering panels: after the algorithm's own metrics


PANELS = (
    Panel("loss", "Loss", (("loss", "eval/loss"),)),
    Panel(
        "reward",
        "Reward and its components",
        (("reward/mean", "reward/*/mean", "eval/reward"), ("reward/std",)),
    ),
    Panel("kl", "KL to the reference", (("kl", "kl_to_ref", "eval/kl"), ("kl_ctl",))),
    Panel("entropy", "Entropy (nats per token)", (("entropy", "eval/entropy"),)),
    Panel(
        "length",
        "Completion length (tokens)",
        (
            ("completion_length/mean", "completion_length/max", "eval/completion_length"),
            ("completion_length/truncated_share",),
        ),
    ),
    Panel("eval", "Pass rate and eval metrics", (("pass_rate", "eval/*"),), split_by_scale=True),
    Panel(
        "policy", "Policy update", (("clip_fraction", "value_clip_fraction"), ("approx_kl",), ("ratio_mean",))
    ),
    Panel(
        "agent",
        "Agent episodes: outcomes, failure labels, stop reasons",
        (
            ("agent/success", "agent/hack_frac", "agent/infra_frac", "agent/drift_frac", "agent/masked_frac"),
            ("agent/failure/*",),
            ("agent/stop/*",),
        ),
    ),
    Panel(
        "agent-tools",
        "Agent turns and tools",
        (
            ("agent/turns", "agent/tool_calls/*", "agent/tool_errors/*"),
            ("agent/env_token_frac",),
            ("agent/policy_tokens",),
        ),
    ),
    Panel("optim", "Learning rate and gradient norm", (("lr",), ("grad_norm",)), last=True),
    Panel(
        "throughput",
        "Throughput",
        (("tokens_per_s", "generation/tokens_per_s"), ("generation/samples_per_s",)),
        last=True,
    ),
    Panel(
        "time",
        "Seconds per step (log scale)",
        (
            (
                "step_s",
                "rollout/seconds",
                "generation/seconds",
                "agent/*_seconds",
                "reward/seconds",
                "reward/*/seconds",
            ),
        ),
        log_y=True,
        last=True,
    ),
)


def plan_panels(series: dict[str, tuple[list, list]]) -> list[tuple[Panel, list[list[str]]]]:
    """The panels to draw for these metrics, each with the metric names of each subplot.

    Every metric goes to the first panel that names it; the rest are grouped by the prefix of
    their name (before the first '/' or '_'), leaving out the ones that never change."""
    claimed: set[str] = set()
    plan = []
    for panel in PANELS:
        subplots = []
        for patterns in panel.axes:
            names = [n for p in patterns for n in sorted(series) if fnmatchcase(n, p) and n not in claimed]
            names = list(dict.fromkeys(names))
            claimed.update(names)
            if names:
                subplots += _split_by_scale(names, series) if panel.split_by_scale else [names]
        if subplots:
            plan.append((panel, subplots))
    rest: dict[str, list[str]] = {}
    for name in sorted(series):
        if name not in claimed and len(set(series[name][1])) > 1:
            rest.setdefault(re.split(r"[/_]", name)[0], []).append(name)
    for prefix, names in rest.items():
        panel = Panel("more-" + _slug(prefix), prefix if len(names) > 1 else names[0], ())
        plan.append((panel, _split_by_scale(names, series)))
    return sorted(plan, key=lambda p: p[0].last)  # stable: otherwise in the order above


def _split_by_scale(names: list[str], series) -> list[list[str]]:
    """Metrics in groups of similar size (median |value| within SCALE_GAP), at most 4 groups."""
    size = {n: float(np.median(np.abs(series[n][1]))) or 1e-12 for n in names}
    groups: list[list[str]] = []
    for name in sorted(names, key=lambda n: size[n]):
        if groups and (size[name] / size[groups[-1][0]] <= SCALE_GAP or len(groups) == 4):
            groups[-1].append(name)
        else:
            groups.append([name])
    order = {n: i for i, n in enumerate(names)}
    return [sorted(g, key=order.get) for g in groups]


def draw_panel(
    path: Path,
    panel: Panel,
    subplots: list[list[str]],
    series: dict[str, tuple[list, list]],
    alerts: list[dict],
    nonfinite: dict[str, list[int]] | None = None,
) -> Path:
    """One PNG: the subplots stacked on a shared step axis, alerts as dashed vertical lines."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    nonfinite = nonfinite or {}
    n = len(subplots)  # the first subplot holds the panel's main metrics; the others are shorter
    fig = Figure(figsize=(7.2, 3.4 + 1.7 * (n - 1)), dpi=110, layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False, height_ratios=[1.0] + [0.65] * (n - 1))[:, 0]
    fig.suptitle(panel.title, fontsize=12, fontweight="bold", x=0.02, ha="left")
    for ax, names in zip(axes, subplots):
        for name in names:
            _curve(ax, name, series)
            if nonfinite.get(name):  # loud: a NaN / Inf step is a red x on the bottom edge
                ax.plot(nonfinite[name], [0.03] * len(nonfinite[name]), "x", color="#cf222e", ms=7,
                        transform=ax.get_xaxis_transform(), clip_on=False, label=f"{name}: non-finite")  # fmt: skip
        if panel.log_y:  # plain numbers (0.2, 0.05), not 2x10^-1; minor ticks labelled within a decade
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
        else:  # 1.04e-4 as "1.04" under a "1e-4" on the axis, not 0.000104
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        if len(names) == 1:
            ax.set_ylabel(names[0], fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    _mark_alerts(axes, alerts)
    handles, labels = axes[0].get_legend_handles_labels()
    for action in dict.fromkeys(a.get("action", "warn") for a in alerts):
        handles.append(Line2D([], [], color=ACTION_COLOURS.get(action, "k"), ls="--", lw=1))
        labels.append(f"alert ({action})")
    for i, ax in enumerate(axes):
        h, lab = (handles, labels) if i == 0 else ax.get_legend_handles_labels()
        if lab != subplots[i][:1]:  # a lone curve is named by its y label already
            ax.legend(h, lab, fontsize=8, loc="best", framealpha=0.85)
    axes[-1].set_xlabel("step", fontsize=9)
    fig.savefig(path, format="png")
    return path


def _curve(ax, name: str, series) -> None:
    steps, values = np.asarray(series[name][0]), np.asarray(series[name][1])
    # A reward component is dashed over the total, so one equal to the total still shows.
    ls = "--" if fnmatchcase(name, "reward/*/mean") else "-"
    if name.startswith("eval/"):
        ax.plot(steps, values, "o-", ms=4, lw=1.3, label=name)
    elif _noisy(values) and not any(fnmatchcase(name, p) for p in NOT_SMOOTHED):
        window = int(np.clip(len(values) // 15, 5, 101)) | 1  # odd: centred on its point
        (line,) = ax.plot(steps, values, ls=ls, lw=0.8, alpha=0.3)
        ax.plot(steps, smooth(values, window), ls=ls, lw=1.7, color=line.get_color(),
                label=f"{name} (mean of {window})")  # fmt: skip
    else:
        ax.plot(steps, values, ls=ls, marker="." if len(values) <= 30 else None, ms=4, lw=1.5, label=name)


def _noisy(values: np.ndarray) -> bool:
    """Enough points, and step-to-step jitter large against the curve's range: worth smoothing."""
    if len(values) < SMOOTH_MIN_POINTS:
        return False
    return float(np.std(np.diff(values))) > 0.05 * (float(np.ptp(values)) or 1.0)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (fewer at the ends). Centred, not an EMA:
    an EMA lags the curve it smooths, which misplaces a trend against the alert lines."""
    half, n = window // 2, len(values)
    cumsum = np.r_[0.0, np.cumsum(values)]
    i = np.arange(n)
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, n)
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def _mark_alerts(axes, alerts: list[dict]) -> None:
    seen: set[str] = set()
    for alert in alerts:
        colour = ACTION_COLOURS.get(alert.get("action"), "k")
        for ax in axes:
            ax.axvline(alert["step"], color=colour, ls="--", lw=1.3, alpha=0.9)
        rule = str(alert.get("rule", "alert"))
        if len(alerts) <= MAX_ALERT_LABELS or rule not in seen:
            axes[0].text(alert["step"], 0.98, f" {rule} ", transform=axes[0].get_xaxis_transform(),
                         rotation=90, ha="right", va="top", fontsize=7, color=colour)  # fmt: skip
        seen.add(rule)


def draw_rm_audit(path: Path, audit: dict) -> Path:
    """From rm_audit.json alone (no rm_audit.png): accuracy per set with its 95% CI, and the
    reliability diagram."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2)
    verdicts = {"short_better": audit.get("verdicts", {}).get("length"), **audit.get("verdicts", {})}
    sets = [("held-out", audit["held_out"]), *audit.get("probes", {}).items()]
    acc = np.array([e.get("accuracy") or 0.0 for _, e in sets])
    ci = np.array([e.get("ci95") or [a, a] for a, (_, e) in zip(acc, sets)], dtype=float)
    colours = ["tab:blue"] + ["tab:red" if verdicts.get(n) == "detected" else "tab:gray" for n, _ in sets[1:]]
    left.bar([n for n, _ in sets], acc, yerr=np.abs(ci.T - acc), color=colours, capsize=4)
    left.axhline(0.5, color="k", ls=":", lw=1, label="chance")
    left.set(ylim=(0, 1.05), ylabel="accuracy", title="accuracy per set (red: bias detected)")
    left.tick_params(axis="x", labelrotation=20)
    left.legend(fontsize=8)
    bins = [b for b in audit.get("calibration", {}).get("bins", []) if b.get("n")]
    right.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["frequency"] for b in bins],
              width=0.1, edgecolor="k", alpha=0.6, label="observed frequency")  # fmt: skip
    right.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ece = audit.get("calibration", {}).get("ece")
    title = f"reliability (ECE {ece:.3f})" if isinstance(ece, float) else "reliability"
    right.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed", title=title)
    right.legend(fontsize=8)
    fig.savefig(path, format="png")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
