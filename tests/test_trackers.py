"""Trackers: the interface with a fake one, clear errors for unknown or missing ones, and real offline
logging to TensorBoard, MLflow and W&B where their packages are installed (skipped otherwise)."""

import importlib.util
import json

import pytest

from posttrain.errors import ConfigError
from posttrain.monitor import trackers
from posttrain.monitor.trackers import check_trackers, flatten, make_trackers, scalars

CONFIG = {"algorithm": "sft", "train": {"lr": 1e-3, "batch_size": 4}, "model": {"path": "m"}}


class FakeTracker:
    events: list = []

    def open(self, run_dir, config, *, resume=False):
        self.events.append(("open", run_dir.name, config["train"]["lr"], resume))

    def log(self, step, metrics):
        self.events.append(("log", step, scalars(metrics)))

    def close(self):
        self.events.append(("close",))


class PlainTracker:
    """The interface without the resume keyword."""

    def open(self, run_dir, config):
        self.opened = True

    def log(self, step, metrics):
        pass

    def close(self):
        pass


class Broken:
    def open(self, run_dir, config):
        raise RuntimeError("cannot open")

    log = close = PlainTracker.close


def test_fake_tracker_sees_open_log_close(tmp_path, monkeypatch):
    FakeTracker.events = []
    monkeypatch.setitem(trackers.TRACKERS, "fake", FakeTracker)
    monkeypatch.setattr(trackers, "available", lambda name: True)
    (t,) = make_trackers(["fake"], tmp_path / "run", CONFIG, resume=True)
    t.log(3, {"loss": 0.5, "eval/pass@1": 1, "flag": True, "note": "x"})
    t.close()
    assert FakeTracker.events == [
        ("open", "run", 1e-3, True),
        ("log", 3, {"loss": 0.5, "eval/pass@1": 1.0}),
        ("close",),
    ]


def test_import_path_tracker_and_cleanup_on_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "fake", FakeTracker)
    monkeypatch.setattr(trackers, "available", lambda name: True)
    (t,) = make_trackers([f"{__name__}:PlainTracker"], tmp_path, CONFIG)
    assert t.opened
    FakeTracker.events = []
    with pytest.raises(RuntimeError, match="cannot open"):
        make_trackers(["fake", f"{__name__}:Broken"], tmp_path, CONFIG)
    assert FakeTracker.events[-1] == ("close",)  # the tracker opened first was closed


def test_unknown_missing_and_bad_trackers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'wandb'"):
        check_trackers(["wandbb"])
    monkeypatch.setattr(trackers, "available", lambda name: False)
    with pytest.raises(ConfigError, match="pip install mlflow"):
        check_trackers(["mlflow"])
    with pytest.raises(ConfigError, match="cannot import"):
        check_trackers(["no.such.module:Tracker"])
    with pytest.raises(ConfigError, match="lacks the method"):
        check_trackers(["json:dumps"])
    with pytest.raises(ConfigError, match="named twice"):
        check_trackers(["tensorboard", "tensorboard"])


def test_flatten_config():
    assert flatten(CONFIG) == {"algorithm": "sft", "train.lr": 1e-3, "train.batch_size": 4, "model.path": "m"}


def test_tensorboard_writes_events(tmp_path):
    (t,) = make_trackers(["tensorboard"], tmp_path, CONFIG)
    t.log(1, {"loss": 1.0})
    t.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_mlflow_logs_to_a_local_file_store_and_resumes(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (t,) = make_trackers(["mlflow"], tmp_path, CONFIG)
    t.log(1, {"loss": 1.0, "eval/pass@1": 0.25, "nan": float("nan")})
    t.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    (t,) = make_trackers(["mlflow"], tmp_path, CONFIG, resume=True)
    t.log(2, {"loss": 0.5})
    t.close()
    has_sql = importlib.util.find_spec("sqlalchemy") is not None
    uri = (
        f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
        if has_sql
        else (tmp_path / "mlruns").resolve().as_uri()
    )
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5]
    run = client.get_run(run_id)
    assert run.data.metrics["eval/pass_1"] == 0.25 and run.data.params["train.lr"] == "0.001"


def test_wandb_logs_offline(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (t,) = make_trackers(["wandb"], tmp_path, CONFIG)
    t.log(1, {"loss": 1.0})
    t.log(1, {"loss": 0.9})  # a step logged again (rollback) is not an error
    t.close()
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
