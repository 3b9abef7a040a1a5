"""Recovery of online runs: samples.jsonl truncated to the checkpoint on resume, asynchronous (lagged) runs
that end cleanly and resume bit-identically, reward fns that misbehave named with their step."""

import json

import pytest

from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

REWARD_MODULE = """
def digit_share(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if c else 0.0 for c in completions]
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
