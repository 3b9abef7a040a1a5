"""Recovery of online runs: samples.jsonl truncated to the checkpoint on resume, asynchronous (lagged) runs
that end cleanly and resume bit-identically, reward fns that misbehave named with their step."""

import json
import shutil

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.engine.run import Run
from posttrain.errors import RewardError, TrainingError
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

REWARD_MODULE = """
calls = [0]


def digit_share(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if c else 0.0 for c in completions]


def nan_from_the_second_call(prompts, completions, **_):
    calls[0] += 1
    return [float("nan") if calls[0] >= 2 and i == 1 else 0.5 for i in range(len(completions))]


def one_short(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    build_tiny(root / "tiny", size="tiny")
    files = arithmetic.write_task_files(
        root / "data", n_sft=10, n_prompts=200, n_pretrain_docs=10, levels=("add1", "add2")
    )
    (root / "recovery_rewards.py").write_text(REWARD_MODULE)
    return root, files


@pytest.fixture(autouse=True)
def _reward_module_importable(task, monkeypatch):
    monkeypatch.syspath_prepend(str(task[0]))


def config(task, out, *, rollout=None, rl=None, **train_opts):
    root, files = task
    return {
        "algorithm": "grpo",
        "out": str(out),
        "model": {"path": str(root / "tiny")},
        "data": {"train": str(files["prompts_train"]), "max_length": 64},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, **(rollout or {})},
        "rl": {"rewards": ["recovery_rewards:digit_share"], **(rl or {})},
        "train": {"lr": 3e-3, "max_steps": 3, "progress": False, "tensorboard": False, **train_opts},
    }


def sample_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_samples_are_truncated_to_the_checkpoint_on_resume(task, tmp_path):
    out = tmp_path / "run"
    train(config(task, out, save_every=2))  # checkpoint at step 2; step 3 ran after it
    assert sample_steps(out) == [1] * 4 + [2] * 4 + [3] * 4
    train(config(task, out, save_every=2), resume=True)  # runs step 3 again
    assert sample_steps(out) == [1] * 4 + [2] * 4 + [3] * 4  # once each, not step 3 twice


def test_a_reward_fn_returning_nan_names_itself_and_the_step(task, tmp_path):
    import recovery_rewards

    recovery_rewards.calls[0] = 0
    cfg = config(task, tmp_path / "nan", rl={"rewards": ["recovery_rewards:nan_from_the_second_call"]})
    with pytest.raises(RewardError, match=r"^step 2: reward component 'recovery_rewards:nan_from_the_second_call' "
                       r"returned nan at index 1 \(scores must be finite\)"):  # fmt: skip
        train(cfg)


def test_a_reward_fn_error_under_async_generation_names_the_step(task, tmp_path):
    import recovery_rewards

    recovery_rewards.calls[0] = 0
    cfg = config(task, tmp_path / "nan", rollout={"max_policy_lag": 1},
                 rl={"rewards": ["recovery_rewards:nan_from_the_second_call"]})  # fmt: skip
    with pytest.raises(TrainingError, match=r"rollout generation failed: step 2: reward component"):
        train(cfg)


def test_cli_wrong_number_of_scores_message(task, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(config(task, tmp_path / "r", rl={"rewards": ["recovery_rewards:one_short"]}))
    )
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "step 1: reward component 'recovery_rewards:one_short' returned 3 scores for 4 completions" in err
    assert "Traceback" not in err


def test_a_model_directory_without_a_tokenizer_is_a_clear_error(task, tmp_path, capsys):
    model = tmp_path / "no_tokenizer"
    shutil.copytree(task[0] / "tiny", model)
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    cfg = config(task, tmp_path / "r")
    cfg["model"]["path"] = str(model)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"model.path: {model} holds no tokenizer" in err and "model.tokenizer" in err


def test_a_full_disk_is_a_clear_error_naming_the_file_and_step(task, tmp_path, monkeypatch):
    from posttrain.rollout.buffer import RolloutBuffer

    real = RolloutBuffer.write_samples
    monkeypatch.setattr(
        RolloutBuffer, "write_samples", lambda self, path, **kw: real(self, "/dev/full", **kw)
    )
    out = tmp_path / "full"
    with pytest.raises(
        TrainingError, match=rf"disk full: step 1: writing {out / 'samples.jsonl'}; free space"
    ):
        train(config(task, out))

    run = Run(tmp_path / "r")
    (run.path / "config.yaml").symlink_to("/dev/full")  # the kernel's own ENOSPC
    with pytest.raises(TrainingError, match=rf"disk full: writing {run.path / 'config.yaml'}"):
        run.write_text("config.yaml", "x" * 100_000)


TIMING = ("time", "step_s")


def untimed(run_dir):
    """metrics.jsonl without what depends on the clock."""
    from posttrain.engine.run import read_metrics

    return [
        {k: v for k, v in m.items() if k not in TIMING and "seconds" not in k and "per_s" not in k}
        for m in read_metrics(run_dir)
    ]


def same_weights(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("lag", [1, 2])
def test_a_lagged_run_resumes_bit_identically(task, tmp_path, lag):
    # two optimiser steps per rollout: the checkpoint at step 3 falls inside a rollout, with rollouts
    # generated ahead (or being generated) by the thread
    opts = dict(rollout={"max_policy_lag": lag}, rl={"minibatches": 2})
    full = train(config(task, tmp_path / "full", max_steps=8, **opts))
    cut = config(task, tmp_path / "cut", max_steps=3, save_every=3, **opts)
    train(cut)
    cut["train"]["max_steps"] = 8
    resumed = train(cut, resume=True, allow_changed=["train.max_steps"])
    assert resumed.step == 8 and max(m["policy_lag"] for m in untimed(full.run_dir)) == lag
    assert untimed(full.run_dir) == untimed(resumed.run_dir)
    assert (full.run_dir / "samples.jsonl").read_text() == (resumed.run_dir / "samples.jsonl").read_text()
    assert same_weights(full.run_dir, resumed.run_dir)


def _cli(*args):
    import sys

    return [sys.executable, "-m", "posttrain", *args]


def _env(task):
    import os

    path = os.pathsep.join([str(task[0]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def lagged(task, out, **train_opts):
    # long enough generations that the thread is still generating ahead when the run ends
    return config(task, out, rollout={"max_policy_lag": 2, "max_new_tokens": 24, "prompts_per_step": 8},
                  rl={"minibatches": 2}, **train_opts)  # fmt: skip


def test_a_lagged_run_exits_0(task, tmp_path):
    # today: "terminate called without an active exception", exit 134: the generation thread, still
    # running torch, was never joined
    import subprocess

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(lagged(task, tmp_path / "run", max_steps=4)))
    done = subprocess.run(_cli("train", str(path)), env=_env(task), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr


@pytest.mark.slow
def test_a_sigterm_stopped_lagged_run_resumes_to_the_uninterrupted_run(task, tmp_path):
    import signal
    import subprocess
    import time

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(lagged(task, tmp_path / "whole", max_steps=12)))
    whole = subprocess.run(_cli("train", str(path)), env=_env(task), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli("train", str(path), "--out", str(cut)), env=_env(task),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (cut / "metrics.jsonl").exists() or len((cut / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # checkpoint after the current step, whichever it is, and stop
    assert proc.wait(timeout=120) == 130, proc.stderr.read()[-2000:]
    assert 3 <= len((cut / "metrics.jsonl").read_text().splitlines()) < 12
    done = subprocess.run(_cli("train", str(path), "--out", str(cut), "--resume"), env=_env(task),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert untimed(tmp_path / "whole") == untimed(cut)
    assert (tmp_path / "whole" / "samples.jsonl").read_text() == (cut / "samples.jsonl").read_text()
    assert same_weights(tmp_path / "whole", cut)
