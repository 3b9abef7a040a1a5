"""Run directories that cannot be lost: an existing run is refused before anything is written, the
directory is locked for the run, and --resume refuses result-changing config changes unless accepted
(and then records them)."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from posttrain.cli import main
from posttrain.engine.run import read_metrics
from posttrain.errors import TrainingError
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    build_tiny(root / "tiny", size="tiny")
    rows = arithmetic.sft_rows(64, seed=0, levels=("add1",))
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(task, out, **train_opts):
    return {
        "algorithm": "sft",
        "out": str(out),
        "model": {"path": str(task / "tiny")},
        "data": {"train": str(task / "sft.jsonl"), "max_length": 64},
        "train": {"lr": 1e-3, "batch_size": 8, "max_steps": 3, "progress": False, "tensorboard": False}
        | train_opts,
    }


def snapshot(run_dir):
    return {name: (run_dir / name).read_bytes() for name in ("config.yaml", "manifest.json", "metrics.jsonl")}


def test_a_refused_run_has_written_nothing(task, tmp_path):
    # the review's case: the refusal ("already holds checkpoints") came after config.yaml and
    # manifest.json had been overwritten with the refused run's
    out = tmp_path / "run"
    train(config(task, out, save_every=2))
    before = snapshot(out)
    with pytest.raises(TrainingError, match="already holds a run .*last checkpoint step-2.*--resume"):
        train(config(task, out, lr=5e-3))
    assert snapshot(out) == before


def test_a_finished_run_without_checkpoints_is_refused_not_overwritten(task, tmp_path):
    out = tmp_path / "run"
    train(config(task, out))  # no save_every: final/ only
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"finished \(final/\), no checkpoint"):
        train(config(task, out))
    with pytest.raises(TrainingError, match="finished run that holds no checkpoint"):
        train(config(task, out), resume=True)
    assert snapshot(out) == before
    res = train(config(task, out, max_steps=2), overwrite=True)
    assert res.step == 2 and [m["step"] for m in read_metrics(out)] == [1, 2]


def test_a_second_concurrent_run_fails_clearly(task, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # another process holds the run (as a live `posttrain train` would)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from posttrain.engine.rundir import Lock; "
         f"Lock(__import__('pathlib').Path({str(out)!r})); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another run \(pid {holder.pid} "):
            train(config(task, out))
        assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train(config(task, out, max_steps=1))  # the lock went with its process


def test_the_lock_is_held_for_the_run_and_dropped_after(task, tmp_path, monkeypatch):
    import posttrain.train as pt
    from posttrain.engine.rundir import Lock

    out, seen = tmp_path / "run", []
    real = pt.train_offline

    def during(cfg, accelerator, run, **kw):
        with pytest.raises(TrainingError, match="in use by another run"):
            Lock(out)
        seen.append(True)
        return real(cfg, accelerator, run, **kw)

    monkeypatch.setattr(pt, "train_offline", during)
    train(config(task, out, max_steps=1))
    assert seen == [True]
    Lock(out).release()  # free again once the stage ended


def test_resume_refuses_result_changing_keys_unless_allowed_and_records_them(task, tmp_path):
    out = tmp_path / "run"
    train(config(task, out, save_every=2, max_steps=2))
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"(?s)train\.batch_size: 8 -> 16.*train\.lr: 0\.001 -> 0\.005"):
        train(config(task, out, save_every=2, max_steps=2, lr=5e-3, batch_size=16), resume=True)
    with pytest.raises(TrainingError, match="--allow-changed train.lr"):
        train(config(task, out, save_every=2, max_steps=2, lr=5e-3), resume=True)
    assert snapshot(out) == before
    # how the run is logged and kept is not the result: free to change
    train(config(task, out, save_every=1, max_steps=2, log_every=2), resume=True)
    res = train(config(task, out, save_every=2, max_steps=4, lr=5e-3), resume=True,
                allow_changed=["train.lr,train.max_steps"])  # fmt: skip
    assert res.step == 4
    manifest = json.loads((out / "manifest.json").read_text())
    last = manifest["resumes"][-1]
    assert last["checkpoint"] == "step-2"
    assert last["changed"] == {
        "train.lr": {"from": 0.001, "to": 0.005},
        "train.max_steps": {"from": 2, "to": 4},
    }
    assert manifest["resumes"][0]["changed"] == {}  # the neutral resume is recorded too
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.005


def test_resume_refuses_a_data_file_changed_in_place(task, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text((task / "sft.jsonl").read_text())
    cfg = config(task, tmp_path / "run", save_every=2, max_steps=2)
    cfg["data"]["train"] = str(data)
    train(cfg)
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic.sft_rows(64, seed=1, levels=("add1",))))
    with pytest.raises(TrainingError, match=r"data\.train: .*sft\.jsonl -> content changed"):
        train(cfg, resume=True)
    train(cfg, resume=True, allow_changed=["data.train"])


def test_cli_refusal_is_a_clear_error(task, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(task, tmp_path / "run", max_steps=1)))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    t0 = time.time()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert time.time() - t0 < 5  # refused before any model or data was loaded
    assert main(["train", str(path), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["train", str(path), "--allow-changed", "train.lr"]) == 2
    assert "only used with --resume" in capsys.readouterr().err
    assert main(["train", str(path), "--overwrite"]) == 0
