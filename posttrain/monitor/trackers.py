"""Experiment trackers: the metrics a run logs, mirrored to TensorBoard, MLflow or Weights & Biases.

metrics.jsonl in the run directory is always written (:meth:`posttrain.engine.run.Run.log`) and is
the record every posttrain tool reads; a tracker is a copy for a dashboard. Each one is switched on
by name and imports its package only then, so none is a dependency of posttrain:

    trackers = make_trackers(["tensorboard", "wandb"], run_dir, config)   # ConfigError if not installed
    for t in trackers: t.log(step, {"loss": 0.5, "eval/pass@1": 0.25})
    for t in trackers: t.close()

    name          pip package    where it writes
    tensorboard   tensorboard    RUN_DIR/tensorboard/
    mlflow        mlflow         $MLFLOW_TRACKING_URI, else a store of the run's own: RUN_DIR/mlflow.db
                                 (sqlite; RUN_DIR/mlruns without sqlalchemy); experiment
                                 $MLFLOW_EXPERIMENT_NAME, else "posttrain"
    wandb         wandb          RUN_DIR/wandb/; project $WANDB_PROJECT, else "posttrain". Offline (sync
                                 later with `wandb sync RUN_DIR/wandb/offline-run-*`) unless WANDB_MODE
                                 says otherwise or WANDB_API_KEY is set

A name of the form ``"package.module:Class"`` is a user tracker: any class with the three methods
of :class:`Tracker` and a no-argument constructor.

Settings come from each library's own environment variables rather than from posttrain's config:
they are about where a dashboard lives, not about the run, and a config that names a server would
not run on another machine. A resumed run (``resume=True``) reattaches to the same MLflow / W&B run
(ids kept in RUN_DIR/trackers.json) instead of opening a second one.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from posttrain.errors import ConfigError


@runtime_checkable
class Tracker(Protocol):
    """What the run calls: ``open`` once before the first step, ``log`` per logged step, ``close`` at the end."""

    def open(self, run_dir: Path, config: dict, *, resume: bool = False) -> None: ...

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (bools and strings dropped), as floats."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``: trackers show parameters as flat keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _ids(run_dir: Path) -> dict:
    path = run_dir / "trackers.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _save_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = _ids(run_dir)
    ids[name] = run_id
    (run_dir / "trackers.json").write_text(json.dumps(ids, indent=2) + "\n")


class TensorBoardTracker:
    """Scalars to RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR``)."""

    package = "tensorboard"

    def __init__(self):
        self._writer = None

    def open(self, run_dir: Path, config: dict, *, resume: bool = False) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in scalars(metrics).items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# MLflow metric and parameter names allow letters, digits and _ - . / and spaces: "pass@1" does not pass.
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")
# Parameter values longer than this are rejected by older MLflow servers.
_MLFLOW_PARAM_CHARS = 500


class MLflowTracker:
    """One MLflow run per posttrain run: the flattened config as parameters, metrics per step."""

    package = "mlflow"

    def __init__(self):
        self._mlflow = None

    def open(self, run_dir: Path, config: dict, *, resume: bool = False) -> None:
        import mlflow

        run_dir = Path(run_dir).resolve()
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "posttrain")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A store of the run's own. MLflow 3 keeps the file store in maintenance mode and wants a
            # database; sqlite needs sqlalchemy, which full mlflow has and mlflow-skinny may lack.
            has_sql = importlib.util.find_spec("sqlalchemy") is not None
            mlflow.set_tracking_uri(
                f"sqlite:///{run_dir / 'mlflow.db'}" if has_sql else (run_dir / "mlruns").as_uri()
            )
            if mlflow.get_experiment_by_name(experiment) is None:  # artifacts beside it, not in the cwd
                mlflow.create_experiment(experiment, artifact_location=(run_dir / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        previous = _ids(run_dir).get("mlflow") if resume else None
        run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_dir.name)
        _save_id(run_dir, "mlflow", run.info.run_id)
        if not previous:
            params = {
                _MLFLOW_BAD.sub("_", k): str(v)[:_MLFLOW_PARAM_CHARS] for k, v in flatten(config).items()
            }
            for i in range(0, len(params), 100):  # log_params takes at most 100 per call
                mlflow.log_params(dict(list(params.items())[i : i + 100]))
        self._mlflow = mlflow

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = {_MLFLOW_BAD.sub("_", k): v for k, v in scalars(metrics).items() if math.isfinite(v)}
        if values:
            self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None


class WandbTracker:
    """One W&B run per posttrain run; offline unless W&B is set up for online logging.

    Metrics are logged against a ``step`` metric of their own, not W&B's internal step, which must only
    grow: a health-monitor rollback logs earlier steps again, and W&B would silently drop them.
    """

    package = "wandb"

    def __init__(self):
        self._run = None

    def open(self, run_dir: Path, config: dict, *, resume: bool = False) -> None:
        import wandb

        run_dir = Path(run_dir)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        previous = _ids(run_dir).get("wandb") if resume else None
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "posttrain"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            mode=mode,
            id=previous or None,
            resume="allow" if previous else None,
        )
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        _save_id(run_dir, "wandb", self._run.id)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._run.log({**scalars(metrics), "step": step})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


TRACKERS: dict[str, type] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}
"""Built-in trackers by name; each class names the pip package it needs in ``package``."""


def available(name: str) -> bool:
    """Whether the built-in tracker ``name`` can be used here (its package is installed)."""
    package = TRACKERS[name].package
    module = "torch.utils.tensorboard" if package == "tensorboard" else package
    try:
        return importlib.util.find_spec(package) is not None and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve(name: str) -> type:
    """The tracker class for a name; ConfigError for an unknown name, a missing package or a bad path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"tracker {name!r}: cannot import it ({e})") from None
        missing = [m for m in ("open", "log", "close") if not callable(getattr(cls, m, None))]
        if missing:
            raise ConfigError(f"tracker {name!r} lacks the method(s) {missing} of a Tracker")
        return cls
    if name not in TRACKERS:
        close = difflib.get_close_matches(name, TRACKERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown tracker {name!r}{hint} (built in: {', '.join(TRACKERS)}; or 'module:Class')"
        )
    if not available(name):
        package = TRACKERS[name].package
        raise ConfigError(f"tracker {name!r} needs the '{package}' package: pip install {package}")
    return TRACKERS[name]


def check_trackers(names: list[str]) -> list[str]:
    """Validate tracker names when a config is read (a field validator), long before the first step."""
    if len(set(names)) != len(names):
        raise ConfigError(f"trackers {names}: a tracker is named twice")
    for name in names:
        resolve(name)
    return names


def make_trackers(
    names: list[str], run_dir: str | Path, config: dict | None = None, *, resume: bool = False
) -> list[Tracker]:
    """Open one tracker per name, in order; ConfigError naming the pip package when one is missing.

    If a tracker fails to open, those already opened are closed before the error propagates.
    """
    check_trackers(list(names))
    opened: list[Tracker] = []
    try:
        for name in names:
            tracker = resolve(name)()
            # a user tracker may take just (run_dir, config), the interface without resume
            takes_resume = "resume" in inspect.signature(tracker.open).parameters
            extra = {"resume": resume} if takes_resume else {}
            tracker.open(Path(run_dir), dict(config or {}), **extra)
            opened.append(tracker)
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
