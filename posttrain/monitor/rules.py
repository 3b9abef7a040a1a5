"""Health rules over the stream of logged metrics, and the monitor that runs them.

A run that goes wrong rarely crashes: KL from the reference explodes, entropy collapses
to a single answer, responses grow to the length limit, or the proxy reward keeps rising
while the task it stands for gets worse (reward hacking, Gao et al. 2023, "Scaling Laws for
Reward Model Overoptimization"; Skalse et al. 2022). Each rule here watches for one such
pattern in the per-step metric dicts the loop logs, and says so in an :class:`Alert`:

    monitor = MonitorConfig().build("online", alerts_path=run.path / "alerts.jsonl")
    for step ...:
        alerts = monitor.observe(step, metrics)        # printed and written to alerts.jsonl
        if HealthMonitor.decision(alerts) == "stop": ...

Metric names are those logged (metrics.jsonl): ``loss``, ``grad_norm``, ``kl``, ``entropy``,
``reward/mean``, ``completion_length/mean``, ``policy_lag``, ``eval/<name>`` (e.g.
``eval/loss``, ``eval/pass@1``); every rule takes the name it watches as a field.

Conventions shared by every rule:

- ``check(step, metrics, history)`` sees the history of steps *before* this one, so a spike
  is compared with the past, not with itself. A rule whose metric is absent at a step (an
  eval metric between evals, KL in an offline stage) says nothing at that step.
- ``warmup``: silent while ``step <= warmup`` (the first steps of a run are noisy).
  Windows (``window``, ``initial_window``) count logged values of the metric, not steps.
- ``action``: ``warn`` (print and record), ``stop`` (checkpoint and end the run) or
  ``rollback`` (return to the last checkpoint before the alert and go on with the settings in
  ``adjust`` multiplied: ``adjust: {lr: 0.5, kl_coef: 2.0}`` halves the learning rate and
  doubles the KL coefficient; names are those the loop knows how to change). The monitor
  keeps the product of every rollback's multipliers in ``scales``, which survives checkpoint
  loads. After ``max_rollbacks`` rollbacks a rollback alert is escalated to ``stop``.
- The monitor reports a condition when it starts, not at every step it lasts: a rule that
  fired stays quiet until it has been checked and found healthy again.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from posttrain.sections import Section

Action = Literal["warn", "stop", "rollback"]
# When several rules fire at one step, the strongest action wins.
_STRENGTH = {"warn": 0, "rollback": 1, "stop": 2}
# Fewest values of a metric a rolling median is taken over.
MIN_POINTS = 5


@dataclass
class Alert:
    """One rule firing at one step. ``metrics`` is the snapshot of everything logged at the step."""

    step: int
    rule: str
    message: str
    action: Action
    metrics: dict[str, float] = field(default_factory=dict)
    adjust: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of alerts.jsonl. NaN/Inf become the strings "nan"/"inf"/"-inf" (strict JSON)."""
        record = asdict(self)
        record["metrics"] = {k: _jsonable(v) for k, v in self.metrics.items()}
        return json.dumps(record)

    def __str__(self) -> str:
        return f"health: step {self.step} {self.rule} [{self.action}]: {self.message}"


def _jsonable(value):
    """Numbers as plain JSON numbers (numpy scalars included), non-finite ones as strings."""
    x = _number(value)
    if x is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    return x if math.isfinite(x) else str(x)


def _number(value) -> float | None:
    """The value as a float if it is a real number (bools and strings are not metrics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _finite(metrics: dict, name: str) -> float | None:
    v = _number(metrics.get(name))
    return v if v is not None and math.isfinite(v) else None


# --------------------------------------------------------------------------------------- history


class History:
    """What the rules remember of each metric: finite values only, as (step, value) pairs.

    Per metric: the first ``head`` values (initial windows), the last ``tail`` values (rolling
    windows, trends) and the best (max and min) ever seen, so memory and the checkpointed
    state stay bounded however long the run.
    """

    def __init__(self, head: int = 100, tail: int = 2000):
        self.head, self.tail = head, tail
        self._first: dict[str, list[tuple[int, float]]] = {}
        self._last: dict[str, deque[tuple[int, float]]] = {}
        self._max: dict[str, float] = {}
        self._min: dict[str, float] = {}

    def add(self, step: int, metrics: dict) -> None:
        for name, raw in metrics.items():
            v = _number(raw)
            if v is None or not math.isfinite(v):
                continue
            first = self._first.setdefault(name, [])
            if len(first) < self.head:
                first.append((step, v))
            self._last.setdefault(name, deque(maxlen=self.tail)).append((step, v))
            self._max[name] = max(self._max.get(name, v), v)
            self._min[name] = min(self._min.get(name, v), v)

    def first(self, name: str, n: int) -> list[float]:
        """The first n values of the metric (fewer if fewer were logged)."""
        return [v for _, v in self._first.get(name, [])[:n]]

    def last(self, name: str, n: int) -> list[float]:
        """The last n values of the metric, oldest first."""
        points = self._last.get(name, ())
        return [v for _, v in list(points)[-n:]]

    def points(self, name: str) -> list[tuple[int, float]]:
        """Every kept recent (step, value) pair of the metric, oldest first."""
        return list(self._last.get(name, ()))

    def best(self, name: str, mode: Literal["max", "min"]) -> float | None:
        return (self._max if mode == "max" else self._min).get(name)

    def state_dict(self) -> dict:
        return {
            "first": {k: [list(p) for p in v] for k, v in self._first.items()},
            "last": {k: [list(p) for p in v] for k, v in self._last.items()},
            "max": dict(self._max),
            "min": dict(self._min),
        }

    def load_state_dict(self, state: dict) -> None:
        self._first = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state["first"].items()}
        self._last = {
            k: deque(((int(s), float(v)) for s, v in pts), maxlen=self.tail)
            for k, pts in state["last"].items()
        }
        self._max, self._min = dict(state["max"]), dict(state["min"])


# --------------------------------------------------------------------------------------- rules


class Rule(Section):
    """Fields every rule has; subclasses add what they watch and implement ``evaluate``."""

    rule: str = Field(description="The rule's kind; each subclass fixes it (kl_spike, ...).")
    name: str | None = Field(
        None, description="Name in alerts; default: the rule kind. Tells two rules of one kind apart."
    )
    action: Action = Field("warn", description="warn, stop (checkpoint and end), or rollback.")
    adjust: dict[str, float] = Field(
        default_factory=dict,
        description="rollback only: settings to multiply on rollback, e.g. {lr: 0.5, kl_coef: 2.0}.",
    )
    warmup: int = Field(0, ge=0, description="Silent while step <= warmup.")

    @model_validator(mode="after")
    def _check_adjust(self):
        if self.adjust and self.action != "rollback":
            raise ValueError(f"adjust applies on rollback only (action is {self.action!r})")
        bad = {k: v for k, v in self.adjust.items() if not v > 0}
        if bad:
            raise ValueError(f"adjust multipliers must be > 0 (got {bad})")
        return self

    @property
    def id(self) -> str:
        return self.name or self.rule

    def applies(self, metrics: dict) -> bool:
        """Whether this step holds what the rule checks (default: its ``metric``)."""
        return self.metric in metrics

    def check(self, step: int, metrics: dict, history: History) -> Alert | None:
        """An alert if the rule fires at ``step``; ``history`` holds the steps before it."""
        if step <= self.warmup or not self.applies(metrics):
            return None
        message = self.evaluate(step, metrics, history)
        if message is None:
            return None
        return Alert(step, self.id, message, self.action, dict(metrics), dict(self.adjust))

    def evaluate(self, step: int, metrics: dict, history: History) -> str | None:
        """The alert's message if the rule fires, else None."""
        raise NotImplementedError


def _median_spike(value: float, recent: list[float], factor: float, floor: float) -> float | None:
    """value / baseline if value exceeds factor x baseline, baseline = max(median(recent), floor)."""
    if len(recent) < MIN_POINTS:
        return None
    baseline = max(statistics.median(recent), floor)
    return value / baseline if value > factor * baseline else None


def _initial_mean(history: History, name: str, n: int) -> float | None:
    """Mean of the metric's first n values, once n are known."""
    first = history.first(name, n)
    return sum(first) / n if len(first) == n else None


class NonFinite(Rule):
    """Any watched metric is NaN or +-Inf. The loop skips such updates; this records them.

    Note: with fp16 loss scaling an occasional Inf ``grad_norm`` is expected; watch other
    metrics then (``metrics: [loss, kl, reward/mean]``)."""

    rule: Literal["non_finite"] = "non_finite"
    metrics: list[str] | None = Field(None, description="Metrics to watch; default: every number logged.")

    def applies(self, metrics: dict) -> bool:
        return self.metrics is None or any(m in metrics for m in self.metrics)

    def evaluate(self, step, metrics, history):
        watched = metrics if self.metrics is None else {k: metrics[k] for k in self.metrics if k in metrics}
        bad = {k: v for k, v in watched.items() if (x := _number(v)) is not None and not math.isfinite(x)}
        return "non-finite " + ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else None


class KLSpike(Rule):
    """KL to the reference above an absolute bound, or above ``factor`` x its rolling median.

    KL starts at 0 (policy = reference), so the median is floored at ``min_baseline``: early
    growth from 0.001 to 0.004 is not a spike. Units are those logged (per-token by default)."""

    rule: Literal["kl_spike"] = "kl_spike"
    metric: str = "kl"
    max_value: float | None = Field(None, gt=0, description="Absolute bound; None: none.")
    factor: float | None = Field(5.0, gt=1, description="Spike: value > factor x rolling median. None: off.")
    window: int = Field(20, ge=MIN_POINTS, description="Values in the rolling median.")
    min_baseline: float = Field(0.01, ge=0, description="Floor of the rolling median.")
    warmup: int = Field(10, ge=0, description="Silent while step <= warmup.")

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        if v is None:
            return None
        if self.max_value is not None and v > self.max_value:
            return f"{self.metric} {v:.4g} is above its bound {self.max_value:.4g}"
        if self.factor is not None:
            recent = history.last(self.metric, self.window)
            ratio = _median_spike(v, recent, self.factor, self.min_baseline)
            if ratio is not None:
                return (
                    f"{self.metric} {v:.4g} is {ratio:.1f}x its median {statistics.median(recent):.4g} "
                    f"over the last {len(recent)} values"
                )
        return None


class EntropyCollapse(Rule):
    """Policy entropy below a floor, or below ``fraction`` of its initial value (mean of the
    first ``initial_window`` values): the policy has stopped exploring (DAPO, Yu et al. 2025,
    sec. 3.1; Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs")."""

    rule: Literal["entropy_collapse"] = "entropy_collapse"
    metric: str = "entropy"
    min_value: float | None = Field(None, ge=0, description="Absolute floor; None: none.")
    fraction: float | None = Field(0.1, gt=0, lt=1, description="Fires below fraction x initial. None: off.")
    initial_window: int = Field(10, gt=0)

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        if v is None:
            return None
        if self.min_value is not None and v < self.min_value:
            return f"{self.metric} {v:.4g} is below its floor {self.min_value:.4g}"
        initial = _initial_mean(history, self.metric, self.initial_window)
        if self.fraction is not None and initial is not None and v < self.fraction * initial:
            return f"{self.metric} {v:.4g} fell below {self.fraction:g} x its initial {initial:.4g}"
        return None


class GradNormSpike(Rule):
    """Gradient norm (before clipping) above ``factor`` x its rolling median: a loss spike or
    a bad batch; a run of them precedes divergence."""

    rule: Literal["grad_norm_spike"] = "grad_norm_spike"
    metric: str = "grad_norm"
    factor: float = Field(10.0, gt=1)
    window: int = Field(50, ge=MIN_POINTS)
    warmup: int = Field(20, ge=0, description="Silent while step <= warmup.")

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        recent = history.last(self.metric, self.window)
        ratio = None if v is None else _median_spike(v, recent, self.factor, 1e-12)
        if ratio is None:
            return None
        return f"{self.metric} {v:.4g} is {ratio:.1f}x its median {statistics.median(recent):.4g}"


class LengthExplosion(Rule):
    """Mean response length above ``factor`` x its initial value: the policy pads or rambles
    (length is the commonest reward-model shortcut, Singhal et al. 2023)."""

    rule: Literal["length_explosion"] = "length_explosion"
    metric: str = "completion_length/mean"
    factor: float = Field(3.0, gt=1)
    initial_window: int = Field(10, gt=0)

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        initial = _initial_mean(history, self.metric, self.initial_window)
        if v is None or initial is None or not v > self.factor * initial:
            return None
        return f"{self.metric} {v:.4g} is {v / initial:.1f}x its initial {initial:.4g}"


class LengthCollapse(Rule):
    """Mean response length below ``fraction`` x its initial value: empty or one-token answers
    (a format reward gamed, or a length penalty too strong)."""

    rule: Literal["length_collapse"] = "length_collapse"
    metric: str = "completion_length/mean"
    fraction: float = Field(1 / 3, gt=0, lt=1)
    initial_window: int = Field(10, gt=0)

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        initial = _initial_mean(history, self.metric, self.initial_window)
        if v is None or initial is None or not v < self.fraction * initial:
            return None
        return f"{self.metric} {v:.4g} fell below {self.fraction:.2g} x its initial {initial:.4g}"


def _trend(points: list[tuple[int, float]]) -> float:
    """Change over the span of the points along their least-squares line: slope x (last - first step)."""
    steps = np.array([s for s, _ in points], dtype=np.float64)
    values = np.array([v for _, v in points], dtype=np.float64)
    span = steps[-1] - steps[0]
    if span <= 0:
        return 0.0
    slope = np.polyfit(steps - steps[0], values, 1)[0]
    return float(slope * span)


class RewardHacking(Rule):
    """The proxy reward trends up while a gold (held-out) metric trends down.

    Checked at each step that logs the gold metric (evals come every N steps). Over the last
    ``window`` gold values, from step s0 to now: the gold trend is the change along their
    least-squares line, the proxy trend the same over every proxy value logged since s0. A
    fitted line, rather than last-minus-first, keeps one noisy eval from deciding. Fires when
    proxy trend >= ``min_proxy_rise`` and gold trend <= -``min_gold_drop`` (metric units).

    Set ``min_gold_drop`` well above the gold trend's noise. For W evaluations with standard
    error sigma each, the trend's standard error is sigma * sqrt(12 (W-1) / (W (W+1))), 1.34 sigma
    for W = 4: with 1,000 problems at ~40% (sigma ~0.015) that is 0.02, so the default 0.05 is
    2.5 standard errors; a 200-problem eval (sigma ~0.035) needs ~0.1 or a longer window."""

    rule: Literal["reward_hacking"] = "reward_hacking"
    proxy: str = Field("reward/mean", description="The reward being optimised.")
    gold: str = Field(
        "eval/pass@1", description="The held-out metric the reward stands for (higher is better)."
    )
    window: int = Field(4, ge=2, description="Gold values the trends are taken over.")
    min_proxy_rise: float = Field(0.05, ge=0)
    min_gold_drop: float = Field(0.05, ge=0)

    def applies(self, metrics: dict) -> bool:
        return self.gold in metrics

    def evaluate(self, step, metrics, history):
        g = _finite(metrics, self.gold)
        if g is None:
            return None
        gold = [*history.points(self.gold)[-(self.window - 1) :], (step, g)]
        if len(gold) < self.window:
            return None
        s0 = gold[0][0]
        proxy = [(s, v) for s, v in history.points(self.proxy) if s >= s0]
        if (p := _finite(metrics, self.proxy)) is not None:
            proxy.append((step, p))
        if len(proxy) < 2:
            return None
        proxy_change, gold_change = _trend(proxy), _trend(gold)
        if proxy_change >= self.min_proxy_rise and gold_change <= -self.min_gold_drop:
            return (
                f"{self.proxy} rose {proxy_change:+.3g} while {self.gold} fell {gold_change:+.3g} "
                f"over steps {s0}-{step} (trend over {len(gold)} evals): the policy may be gaming the reward"
            )
        return None


class EvalRegression(Rule):
    """An eval metric worse than its best so far by more than ``max_drop`` (metric units).

    The best of k noisy evals sits ~sigma * sqrt(2 ln k) above the truth (sigma: the eval's
    standard error), so ``max_drop`` should be 3-4 sigma: the default 0.05 suits an accuracy
    on ~1,000 problems (sigma ~0.015)."""

    rule: Literal["eval_regression"] = "eval_regression"
    metric: str = "eval/pass@1"
    mode: Literal["max", "min"] = Field("max", description="max: higher is better (accuracy); min: a loss.")
    max_drop: float = Field(0.05, gt=0)

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        best = history.best(self.metric, self.mode)
        if v is None or best is None:
            return None
        drop = best - v if self.mode == "max" else v - best
        if drop > self.max_drop:
            return f"{self.metric} {v:.4g} is {drop:.3g} worse than its best {best:.4g}"
        return None


class PolicyLag(Rule):
    """Samples trained on were generated by a policy more than ``max_value`` updates old
    (asynchronous rollouts): the importance ratios stop correcting for it."""

    rule: Literal["policy_lag"] = "policy_lag"
    metric: str = "policy_lag"
    max_value: float = Field(4.0, ge=0)

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        if v is None or v <= self.max_value:
            return None
        return f"{self.metric} {v:.4g} is above {self.max_value:.4g}"


class Threshold(Rule):
    """A metric above ``above`` or below ``below``: for the conditions one number shows, such as
    most completions cut off at the length budget (``completion_length/truncated_share``, the
    rewards then score truncated answers) or every group's rewards equal
    (``groups/zero_std_share``: group-relative advantages are all 0, nothing is learnt)."""

    rule: Literal["threshold"] = "threshold"
    metric: str
    above: float | None = None
    below: float | None = None

    @model_validator(mode="after")
    def _some_bound(self):
        if self.above is None and self.below is None:
            raise ValueError("threshold needs `above`, `below` or both")
        return self

    def evaluate(self, step, metrics, history):
        v = _finite(metrics, self.metric)
        if v is not None and self.above is not None and v > self.above:
            return f"{self.metric} {v:.4g} is above {self.above:.4g}"
        if v is not None and self.below is not None and v < self.below:
            return f"{self.metric} {v:.4g} is below {self.below:.4g}"
        return None


AnyRule = Annotated[
    NonFinite
    | KLSpike
    | EntropyCollapse
    | GradNormSpike
    | LengthExplosion
    | LengthCollapse
    | RewardHacking
    | EvalRegression
    | PolicyLag
    | Threshold,
    Field(discriminator="rule"),
]


def default_rules(kind: Literal["online", "offline"] = "online") -> list[Rule]:
    """The rules a stage gets unless its config lists its own; every one only warns.

    offline (SFT, RM, DPO family, KTO): non-finite values, gradient-norm spikes, and eval loss
    rising 0.1 above its best (overfitting). online (PPO, GRPO family): every rule, defaults
    as in each class (reward hacking compares ``reward/mean`` with ``eval/pass@1``), plus
    "truncation" (over half the completions hit the length budget), "no_signal" (over 90%
    of groups have all-equal rewards), "sampler_mismatch" (the sampler's log-probs are more than
    0.01 nats of KL from the trainer's: set `rollout.is_correction` or sample in the training precision),
    and for agent runs "agent_hack" (any hack attempt),
    "agent_infra" (over 5% of episodes failed by infrastructure) and "agent_drift" (any drift).
    """
    if kind == "offline":
        return [NonFinite(), GradNormSpike(), EvalRegression(metric="eval/loss", mode="min", max_drop=0.1)]
    if kind == "online":
        return [
            NonFinite(),
            KLSpike(),
            EntropyCollapse(),
            GradNormSpike(),
            LengthExplosion(),
            LengthCollapse(),
            RewardHacking(),
            EvalRegression(),
            PolicyLag(),
            Threshold(name="truncation", metric="completion_length/truncated_share", above=0.5),
            Threshold(name="no_signal", metric="groups/zero_std_share", above=0.9),
            # agent episodes (logged by env runs only): any hack attempt, infrastructure failing more than
            # one episode in 20, any tokenization drift (posttrain/agents/failures.py)
            Threshold(name="agent_hack", metric="agent/hack_frac", above=0.0),
            Threshold(name="agent_infra", metric="agent/infra_frac", above=0.05),
            Threshold(name="agent_drift", metric="agent/drift_frac", above=0.0),
            Threshold(name="sampler_mismatch", metric="mismatch/kl", above=0.01),
        ]
    raise ValueError(f"default_rules: kind must be 'online' or 'offline' (got {kind!r})")
