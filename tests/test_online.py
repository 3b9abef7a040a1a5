"""Online RL end to end on the random tiny model: GRPO family and PPO learn a dense reward, KL starts at
0, resume is exact, dynamic sampling refills, asynchronous generation keeps its lag bound."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain import algorithms
from posttrain.config import load_config
from posttrain.engine.run import read_metrics
from posttrain.errors import DataError
from posttrain.rewards import combine
from posttrain.rollout.engine import Completion
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

REWARD_MODULE = '''
def digit_share(prompts, completions, **_):
    """Share of digits among the completion's characters: dense, and learnable from scratch."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if c else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    build_tiny(root / "tiny", size="tiny")
    files = arithmetic.write_task_files(
        root / "data", n_sft=10, n_prompts=2000, n_pretrain_docs=10, levels=("add1", "add2")
    )
    (root / "rewards_for_test.py").write_text(REWARD_MODULE)
    return root, files


@pytest.fixture(autouse=True)
def _reward_module_importable(task, monkeypatch):
    monkeypatch.syspath_prepend(str(task[0]))


def config(task, out, algorithm="grpo", *, rollout=None, rl=None, **train_opts):
    root, files = task
    return {
        "algorithm": algorithm,
        "out": str(out),
        "model": {"path": str(root / "tiny")},
        "data": {"train": str(files["prompts_train"]), "max_length": 64},
        "rollout": {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 4, **(rollout or {})},
        "rl": {"rewards": ["rewards_for_test:digit_share"], **(rl or {})},
        "train": {"lr": 3e-3, "max_steps": 12, "progress": False, "tensorboard": False, **train_opts},
    }


def rewards(run_dir):
    return [m["reward/mean"] for m in read_metrics(run_dir) if "reward/mean" in m]


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "cispo", "gspo", "rloo", "reinforce_pp"])
def test_grpo_family_learns_a_dense_reward(task, tmp_path, algorithm):
    res = train(config(task, tmp_path / algorithm, algorithm))
    r = rewards(res.run_dir)
    assert len(r) == 12
    assert sum(r[-3:]) / 3 > r[0] + 0.15, r  # the share of digits rose clearly
    m = read_metrics(res.run_dir)[-1]
    for key in ("entropy", "clip_fraction", "completion_length/mean", "generation/tokens_per_s", "pass_rate",
                "reward/rewards_for_test:digit_share/mean", "policy_lag", "grad_norm"):  # fmt: skip
        assert key in m, key
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * 8 * 4 and {"prompt", "completion", "reward", "advantage"} <= set(samples[0])
    AutoModelForCausalLM.from_pretrained(res.final)  # final/ is a plain causal LM


def test_grpo_with_lora_and_a_kl_anchor_trains_the_adapter_only(task, tmp_path):
    # The shared-prompt forward through a PEFT model; the adapter-free base is the KL reference.
    cfg = config(task, tmp_path / "lora", rl={"kl_coef": 0.01}, lr=2e-2, max_steps=4)
    cfg["model"]["lora"] = {"r": 8, "alpha": 16}
    res = train(cfg)
    m = read_metrics(res.run_dir)
    assert m[0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-6) and m[-1]["kl_to_ref"] > 1e-6
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in m)


def test_dapo_options_work_together(task, tmp_path):
    res = train(config(task, tmp_path / "dapo", "dapo", max_steps=4))
    m = read_metrics(res.run_dir)[-1]
    assert "dynamic_sampling/rounds" in m and "reward/overlong_penalty/mean" in m
    assert m["reward/overlong_penalty/mean"] <= 0


def test_kl_to_the_reference_starts_at_zero(task, tmp_path):
    res = train(config(task, tmp_path / "kl", rl={"kl_coef": 0.1}, max_steps=3))
    first = read_metrics(res.run_dir)[0]
    assert first["kl"] == pytest.approx(0, abs=1e-5) and first["kl_to_ref"] == pytest.approx(0, abs=1e-5)
    assert read_metrics(res.run_dir)[-1]["kl_to_ref"] > 1e-6  # the policy moved away


def test_ppo_value_head_learns_and_is_saved(task, tmp_path):
    res = train(config(task, tmp_path / "ppo", "ppo", max_steps=16, rl={"kl_coef": 0.01}))
    m, r = read_metrics(res.run_dir), rewards(res.run_dir)
    assert sum(r[-3:]) / 3 > r[0] + 0.1
    # the zero-initialised value head learnt the scale of the return (the reward; gamma 1, small KL)
    assert m[0]["value_mean"] == 0 and abs(m[-1]["value_mean"] - r[-1]) < 0.5 * r[-1]
    head = load_file(res.final / "value_head.safetensors")
    assert head["weight"].abs().sum() > 0  # trained away from its zero init
    AutoModelForCausalLM.from_pretrained(res.final)


def full_and_resumed(task, tmp_path, cut_at: int, **opts):
    """One uninterrupted run, and one stopped after `cut_at` steps (a checkpoint there) and resumed."""
    full = train(config(task, tmp_path / "full", **opts))
    cut = config(task, tmp_path / "cut", **opts)
    cut["train"]["max_steps"] = cut_at
    train(cut)
    cut["train"]["max_steps"] = opts["max_steps"]
    resumed = train(cut, resume=True, allow_changed=["train.max_steps"])
    assert [round(x, 6) for x in rewards(full.run_dir)] == [round(x, 6) for x in rewards(resumed.run_dir)]
    return full, resumed


def test_resume_mid_rollout_is_exact(task, tmp_path):
    # two optimiser steps per rollout: the checkpoint at step 3 falls inside a rollout, so its
    # pending step, the prompt cursor and the RNG states must all come back.
    full, resumed = full_and_resumed(task, tmp_path, 3, rl={"minibatches": 2}, save_every=3, max_steps=6)
    a = AutoModelForCausalLM.from_pretrained(full.final).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.final).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_an_engine_with_its_own_weights_the_loaded_ones(task, tmp_path, monkeypatch):
    # An engine that holds its own copy of the weights (as vLLM does) starts a resumed run with the
    # weights it was built from; the rollout source must push the checkpoint's weights before sampling.
    import posttrain.train as pt
    from posttrain.rollout.engine import HFEngine

    monkeypatch.setattr(pt, "make_engine", lambda cfg, model, tok, acc: HFEngine.copy_of(model, tok))
    full_and_resumed(task, tmp_path, 2, save_every=2, max_steps=4)  # same rewards after the resume


def test_async_generation_keeps_the_lag_bound(task, tmp_path):
    res = train(config(task, tmp_path / "async", rollout={"max_policy_lag": 1}, max_steps=6))
    lags = [m["policy_lag"] for m in read_metrics(res.run_dir)]
    assert len(lags) == 6 and max(lags) <= 1
    versions = [
        json.loads(line)["policy_version"]
        for line in (res.run_dir / "samples.jsonl").read_text().splitlines()
    ]
    assert versions == sorted(versions)


def test_a_prompt_longer_than_the_context_is_a_clear_error(task, tmp_path):
    cfg = config(task, tmp_path / "long")
    cfg["data"]["max_length"] = 8  # 4 tokens of room: "12+34" does not fit
    with pytest.raises(DataError, match=r"prompts_train\.jsonl:\d+: field 'prompt'"):
        train(cfg)


class _Engine:
    """Groups alternate: even prompt indices all-equal rewards (no signal), odd ones mixed."""

    eos = [0]
    policy_version = 0
    exact_logprobs = True

    def generate(self, prompt_ids, n, sampling):
        return [
            [Completion([1], [-0.1], f"{p[0] % 2}{j}" if p[0] % 2 else "0", "stop") for j in range(n)]
            for p in prompt_ids
        ]


def test_dynamic_sampling_keeps_informative_groups_and_refills(task, tmp_path):
    from posttrain.rollout.source import RolloutSource

    cfg = load_config(config(task, tmp_path / "ds", "dapo"))

    class Tok:
        pad_token_id = 0
        bos_token_id = None  # plain strings, no chat template: the prompt's ids are the string's

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[int(t)] for t in texts]}

    def reward(prompts, completions, **_):
        return [float(c[-1]) for c in completions]  # "0" everywhere for even prompts

    rows = [{"prompt": str(i)} for i in range(100)]
    src = RolloutSource(
        cfg,
        rows=rows,
        tokenizer=Tok(),
        engine=_Engine(),
        reward=combine({"r": reward}),
        algo=algorithms.get(cfg.algorithm),
        accelerator=type("A", (), {"num_processes": 1, "process_index": 0})(),
    )
    src.prompt_texts = [str(i) for i in range(100)]
    src.prompt_ids = [[i] for i in range(100)]
    got = src.generate_scored(_Engine())
    groups = got.buffer.rewards.view(-1, 4)
    assert groups.shape[0] == 8 and bool((groups.max(1).values > groups.min(1).values).all())
    assert (
        got.metrics["dynamic_sampling/rounds"] >= 2
        and got.metrics["dynamic_sampling/informative_share"] == 1.0
    )
    assert not math.isnan(got.buffer.rewards.sum().item())


def test_grpo_under_accelerate_two_processes(task, tmp_path):
    # Each process samples its own half of the prompts; rewards and lengths are reduced over both, and
    # DDP keeps the replicas identical (final/ is written once).
    import os
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(task, tmp_path / "two", max_steps=3)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(task[0])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "posttrain", "train", str(cfg)]  # fmt: skip
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = read_metrics(tmp_path / "two")
    assert len(m) == 3 and all(r["buffer/samples"] == 8 * 4 for r in m)  # 2 processes x 4 prompts x 4
    samples = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 4 * 4  # the main process's own samples
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
