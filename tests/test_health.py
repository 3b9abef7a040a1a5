"""Health rules inside the loop: alerts.jsonl, stop, and roll back with a changed setting."""

import json

import pytest

from posttrain.engine import checkpoint
from posttrain.engine.run import read_metrics
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    build_tiny(root / "tiny", size="tiny")
    files = arithmetic.write_task_files(root / "data", n_sft=512, n_prompts=10, n_pretrain_docs=10)
    return root, files


def config(task, out, rules, **train_opts):
    root, files = task
    return {
        "algorithm": "sft",
        "out": str(out),
        "model": {"path": str(root / "tiny")},
        "data": {"train": str(files["sft_train"]), "max_length": 128},
        "monitor": {"rules": rules, "max_rollbacks": 1},
        "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 8, "schedule": "constant", "progress": False,
                  "tensorboard": False, **train_opts},
    }  # fmt: skip


def alerts(run_dir):
    path = run_dir / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_stop_rule_checkpoints_and_ends_the_run(task, tmp_path):
    rule = {
        "rule": "threshold",
        "name": "tiny_loss",
        "metric": "loss",
        "below": 100.0,
        "action": "stop",
        "warmup": 3,
    }
    res = train(config(task, tmp_path / "stop", [rule]))
    assert res.interrupted == "health: tiny_loss" and res.final is None and res.step == 4
    assert [a["step"] for a in alerts(res.run_dir)] == [4] and alerts(res.run_dir)[0]["action"] == "stop"
    assert checkpoint.latest(res.run_dir / "checkpoints").name == "step-4"


def test_rollback_restores_the_checkpoint_with_a_lower_lr_then_stops_at_the_limit(task, tmp_path):
    # fires at step 5 (after warmup): back to step-4 with lr x 0.5; the condition persists, so it fires
    # again, beyond max_rollbacks=1, which turns the rollback into a stop.
    rule = {"rule": "threshold", "name": "always", "metric": "grad_norm", "above": 0.0, "action": "rollback",
            "adjust": {"lr": 0.5}, "warmup": 4}  # fmt: skip
    res = train(config(task, tmp_path / "rb", [rule], save_every=4))
    fired = alerts(res.run_dir)
    assert [(a["step"], a["action"]) for a in fired] == [(5, "rollback"), (5, "stop")]
    lrs = [(m["step"], m["lr"]) for m in read_metrics(res.run_dir)]
    assert lrs[:5] == [(s, pytest.approx(1e-3)) for s in range(1, 6)]
    assert lrs[5] == (5, pytest.approx(5e-4))  # step 5 again, from the step-4 checkpoint, at half the lr
    assert res.interrupted == "health: always"


def test_healthy_run_raises_no_alert_with_the_default_rules(task, tmp_path):
    cfg = config(task, tmp_path / "ok", None)
    cfg["monitor"] = {}
    res = train(cfg)
    assert res.interrupted is None and alerts(res.run_dir) == []
