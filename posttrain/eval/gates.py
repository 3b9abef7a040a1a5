"""Regression gates: thresholds on an eval.json, absolute or relative to a baseline eval.json.

A gates file (YAML) is a list of gates, or a mapping with the list under ``gates``::

    - {metric: pass@1, max_drop: 0.01}              # current >= baseline - 0.01
    - {metric: over_refusal_rate, max_rise: 0.0}    # current <= baseline
    - {metric: refusal_rate, min: 0.9}              # current >= 0.9
    - {metric: completion_length/truncated_share, max: 0.05}

    posttrain eval gates --current eval.json --baseline base/eval.json --gates gates.yaml
    posttrain eval run SUITE.yaml --model M --baseline base/eval.json --gates gates.yaml

Metric names are the keys of eval.json's ``metrics`` (see :mod:`posttrain.eval.suite`). A gate
fails when its metric is missing or not a number in either file (null, NaN): a gate that cannot
be checked must not pass silently in CI. Differences are absolute (pass@1 0.50 -> 0.48 is a drop
of 0.02), compared with a 1e-9 tolerance so that float rounding in the files cannot flip a gate
set at exactly the observed change. The command prints a table and exits 1 when any gate fails.

A gate naming a metric that the results cannot hold (a typo: ``pass@l``) is a config error (exit 2, with
the closest name), not a failed gate: ``posttrain eval run --gates`` and pipelines check the names against
the suite's metrics before anything is generated, ``posttrain eval gates`` against the files' metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from posttrain.errors import ConfigError, unknown
from posttrain.sections import Section, read_yaml, validate

TOLERANCE = 1e-9


class Gate(Section):
    """One threshold on one metric; any combination of the four bounds, at least one."""

    metric: str = Field(description="A key of eval.json's metrics, e.g. pass@1 or over_refusal_rate.")
    max_drop: float | None = Field(None, ge=0, description="current >= baseline - max_drop.")
    max_rise: float | None = Field(None, ge=0, description="current <= baseline + max_rise.")
    min: float | None = Field(None, description="current >= min.")
    max: float | None = Field(None, description="current <= max.")

    @model_validator(mode="after")
    def _has_bound(self) -> Gate:
        if all(v is None for v in (self.max_drop, self.max_rise, self.min, self.max)):
            raise ValueError(f"gate on {self.metric!r} has no bound; give max_drop, max_rise, min or max")
        return self

    @property
    def relative(self) -> bool:
        return self.max_drop is not None or self.max_rise is not None

    def rule(self) -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(f"drop <= {self.max_drop:g}")
        if self.max_rise is not None:
            parts.append(f"rise <= {self.max_rise:g}")
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return ", ".join(parts)


class GatesFile(Section):
    gates: list[Gate] = Field(min_length=1)


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    current: float | None
    baseline: float | None
    passed: bool
    reason: str  # why it failed; "" when it passed


def load_gates(path: str | Path) -> list[Gate]:
    """The gates of a YAML file (a list, or a mapping with ``gates``); errors name file and key."""
    raw = read_yaml(path)
    if isinstance(raw, list):
        raw = {"gates": raw}
    return validate(GatesFile, raw, str(path), "gates file").gates


def load_metrics(path: str | Path) -> dict:
    """The ``metrics`` mapping of an eval.json."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval results not found: {path}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    metrics = report.get("metrics") if isinstance(report, dict) else None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path}: no 'metrics' mapping; is this an eval.json written by posttrain eval?")
    return metrics


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def check_gate(gate: Gate, current: Mapping, baseline: Mapping | None) -> GateResult:
    """Check one gate; see the module docstring for what fails."""
    now = _number(current.get(gate.metric))
    base = _number(baseline.get(gate.metric)) if baseline is not None and gate.relative else None
    if now is None:
        why = (
            "missing in current" if gate.metric not in current else f"not a number ({current[gate.metric]!r})"
        )
        return GateResult(gate, None, base, False, why)
    if gate.relative and base is None:
        if baseline is None:
            why = "no baseline given"
        elif gate.metric not in baseline:
            why = "missing in baseline"
        else:
            why = f"baseline not a number ({baseline[gate.metric]!r})"
        return GateResult(gate, now, None, False, why)
    failures = []
    if gate.max_drop is not None and base - now > gate.max_drop + TOLERANCE:
        failures.append(f"dropped {base - now:.4g} > {gate.max_drop:g}")
    if gate.max_rise is not None and now - base > gate.max_rise + TOLERANCE:
        failures.append(f"rose {now - base:.4g} > {gate.max_rise:g}")
    if gate.min is not None and now < gate.min - TOLERANCE:
        failures.append(f"{now:.4g} < min {gate.min:g}")
    if gate.max is not None and now > gate.max + TOLERANCE:
        failures.append(f"{now:.4g} > max {gate.max:g}")
    return GateResult(gate, now, base, not failures, "; ".join(failures))


def suite_metric_names(suite, *, against: bool = False) -> set[str]:
    """Every metric name an evaluation of `suite` (eval/suite.py's `evaluate`) can write: what a gate on
    it may name. Known before anything is generated."""
    from posttrain.eval.metrics import length_stats

    cfg = suite.config
    names = {f"completion_length/{k}" for k in length_stats([1.0])} | {"completion_length/truncated_share"}
    if suite.scorer is not None:
        names |= {"accuracy", "reward/mean", *(f"pass@{k}" for k in cfg.pass_k)}
        for name in suite.scorer.components:
            names |= {f"reward/{name}/mean", f"reward/{name}/failure_rate"}
        if against:
            names.add("win_rate")
    if cfg.refusal:
        names |= {"refusal_rate", "over_refusal_rate"}
    return names


def check_metric_names(gates: list[Gate], known, where: str) -> None:
    """A gate on a metric outside `known` is a config error naming the gate and the closest name."""
    bad = [
        f"{where}: gate {i + 1}: {unknown('gate metric', g.metric, known)}"
        for i, g in enumerate(gates)
        if g.metric not in known
    ]
    if bad:
        raise ConfigError("\n".join(bad))


def check_gates(gates: list[Gate], current: Mapping, baseline: Mapping | None = None) -> list[GateResult]:
    """Every gate against ``current`` metrics (and ``baseline`` metrics for relative gates).

    Raises:
        ConfigError: a relative gate (max_drop / max_rise) and no baseline: a usage error, not a
            failed gate.
    """
    relative = [g.metric for g in gates if g.relative]
    if baseline is None and relative:
        raise ConfigError(f"gates on {relative} use max_drop / max_rise, which need a baseline eval.json")
    return [check_gate(g, current, baseline) for g in gates]


def format_gates(results: list[GateResult]) -> str:
    """A pass/fail table, one line per gate, and a summary line."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    width = max([len("metric")] + [len(r.gate.metric) for r in results]) + 2
    rule_w = max([len("rule")] + [len(r.gate.rule()) for r in results]) + 2
    lines = [f"{'metric':<{width}}{'rule':<{rule_w}}{'baseline':>10}{'current':>10}{'change':>10}  result"]
    for r in results:
        change = "-" if r.current is None or r.baseline is None else f"{r.current - r.baseline:+.4f}"
        verdict = "pass" if r.passed else f"FAIL ({r.reason})"
        lines.append(
            f"{r.gate.metric:<{width}}{r.gate.rule():<{rule_w}}{num(r.baseline):>10}{num(r.current):>10}"
            f"{change:>10}  {verdict}"
        )
    failed = sum(not r.passed for r in results)
    lines.append(f"gates: {len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def run_gates(
    gates_path: str | Path, current: str | Path | Mapping, baseline: str | Path | Mapping | None = None
) -> tuple[list[GateResult], bool]:
    """Load the gates and the eval results (paths of eval.json files, or metric mappings), check.

    Returns:
        The results and whether every gate passed.
    """
    gates = load_gates(gates_path)
    now = current if isinstance(current, Mapping) else load_metrics(current)
    base = baseline if baseline is None or isinstance(baseline, Mapping) else load_metrics(baseline)
    where = gates_path if isinstance(gates_path, str) else str(gates_path)
    check_metric_names(gates, {*now, *(base or {})}, where)  # a name in neither file is a typo, not a fail
    results = check_gates(gates, now, base)
    return results, all(r.passed for r in results)
