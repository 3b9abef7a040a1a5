"""The health monitor the loop calls each step (it runs the rules of rules.py over the logged metrics,
keeps their history, records and prints alerts), and its config section `monitor`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.monitor.rules import (
    _STRENGTH,
    Action,
    Alert,
    AnyRule,
    History,
    Rule,
    default_rules,
)
from posttrain.sections import Section


class HealthMonitor:
    """Runs rules over each step's metrics, remembers the history, records and prints alerts.

    Every process may run one (the metrics are reduced, so all reach the same decision); give
    ``alerts_path`` and ``echo`` on the main process only. ``state_dict``/``load_state_dict``
    let it travel with checkpoints (e.g. ``accelerator.register_for_checkpointing(monitor)``).
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        alerts_path: str | Path | None = None,
        echo: Callable[[str], object] | None = print,
        max_rollbacks: int = 2,
        history: History | None = None,
    ):
        self.rules = list(rules)
        ids = [r.id for r in self.rules]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(
                f"rules need distinct names; give each a `name` ({', '.join(twice)} appear twice)"
            )
        self.alerts_path = Path(alerts_path) if alerts_path is not None else None
        self.echo = echo
        self.max_rollbacks = max_rollbacks
        # Keep at least what the rules look back over.
        head = max([100, *(getattr(r, "initial_window", 0) for r in self.rules)])
        tail = max([2000, *(getattr(r, "window", 0) for r in self.rules)])
        self.history = history or History(head=head, tail=tail)
        self.rollbacks = 0
        # Product of the `adjust` multipliers of every rollback so far: the loop sets each setting
        # to its configured value x scale after any load (resume or rollback), so it is idempotent.
        self.scales: dict[str, float] = {}
        self._active: dict[str, bool] = {}  # rule id -> fired at its last check

    def open(self, *, resume_step: int | None = None) -> None:
        """Start alerts.jsonl: a fresh run starts it empty; a resumed one drops the alerts of
        steps after the checkpoint (they are about to be run again), as the metrics log does."""
        if self.alerts_path is None or not self.alerts_path.exists():
            return
        if resume_step is None:
            self.alerts_path.unlink()
            return
        kept = [
            line
            for line in self.alerts_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= resume_step
        ]
        self.alerts_path.write_text("".join(line + "\n" for line in kept))

    def observe(self, step: int, metrics: dict) -> list[Alert]:
        """Check every rule on this step's metrics (then add them to the history); returns the
        new alerts, after printing them and appending them to alerts.jsonl.

        Call it once per logged step with everything logged at that step (training and eval
        metrics merged). Two calls for one step work for the trend rules, but each call re-arms
        rules it finds healthy, so a condition lasting several steps could be reported again."""
        alerts = []
        for rule in self.rules:
            if step <= rule.warmup or not rule.applies(metrics):
                continue
            alert = rule.check(step, metrics, self.history)
            was_active = self._active.get(rule.id, False)
            self._active[rule.id] = alert is not None
            if alert is None or was_active:
                continue
            alerts.append(alert)
        rollbacks = [a for a in alerts if a.action == "rollback"]
        if rollbacks:  # one rollback per step, however many rules ask for it
            self.rollbacks += 1
            for alert in rollbacks:
                if self.rollbacks > self.max_rollbacks:
                    alert.action = "stop"
                    alert.message += f" (rollback limit {self.max_rollbacks} reached: stopping instead)"
                else:
                    for k, v in alert.adjust.items():
                        self.scales[k] = self.scales.get(k, 1.0) * v
        self.history.add(step, metrics)
        for alert in alerts:
            if self.echo is not None:
                self.echo(str(alert))
            if self.alerts_path is not None:
                self.alerts_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.alerts_path, "a") as f:
                    f.write(alert.to_json() + "\n")
        return alerts

    @staticmethod
    def decision(alerts: list[Alert]) -> Action | None:
        """The strongest action among alerts (stop > rollback > warn), None for no alerts."""
        return max((a.action for a in alerts), key=_STRENGTH.__getitem__, default=None)

    def state_dict(self) -> dict:
        """Plain lists, dicts and numbers (safe for torch.load(weights_only=True) and JSON)."""
        return {
            "history": self.history.state_dict(),
            "active": dict(self._active),
            "rollbacks": self.rollbacks,
            "scales": dict(self.scales),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore history and alert state. Rollbacks and their scales are never undone: loading
        the checkpoint a rollback returns to (saved before it) keeps this process's count and
        scales, so the run gets no fresh budget of rollbacks and keeps its adjusted settings;
        a fresh process resuming takes them from the checkpoint."""
        self.history.load_state_dict(state["history"])
        self._active = dict(state["active"])
        if int(state["rollbacks"]) >= self.rollbacks:
            self.rollbacks, self.scales = int(state["rollbacks"]), dict(state["scales"])


class MonitorConfig(Section):
    """Health checks over the logged metrics (section `monitor`); alerts go to alerts.jsonl.

    ``rules`` left out gives :func:`default_rules` for the stage's kind; a list replaces them:

        monitor:
          rules:
            - rule: kl_spike
              max_value: 0.5
              action: rollback
              adjust: {lr: 0.5, kl_coef: 2.0}
            - {rule: reward_hacking, gold: eval/accuracy}
    """

    enabled: bool = Field(True, description="Run the health rules.")
    rules: list[AnyRule] | None = Field(None, description="Rules to run; default: the stage kind's defaults.")
    max_rollbacks: int = Field(
        2, ge=0, description="Rollbacks allowed before a rollback alert stops the run."
    )

    @model_validator(mode="after")
    def _distinct_names(self):
        ids = [r.id for r in self.rules or []]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(
                f"monitor.rules: give each rule of one kind a distinct `name` ({', '.join(twice)})"
            )
        return self

    def build(
        self,
        kind: Literal["online", "offline"],
        *,
        alerts_path: str | Path | None = None,
        echo: Callable[[str], object] | None = print,
    ) -> HealthMonitor | None:
        """The monitor for a stage of this kind, or None when disabled."""
        if not self.enabled:
            return None
        rules = list(self.rules) if self.rules is not None else default_rules(kind)
        return HealthMonitor(rules, alerts_path=alerts_path, echo=echo, max_rollbacks=self.max_rollbacks)
