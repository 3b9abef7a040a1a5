"""Agentic RL end to end on CPU (slow): an env run resumes exactly mid-rollout; every online preset trains
on episodes; the example config runs unchanged on a chat model given by path (byte-level BPE, ChatML
template); on `calculator`, SFT on golden demos then GRPO beats the SFT start and the no-tool baseline
(3 seeds); on `sql`, held-out success rises and hack labels stay 0 (3 seeds)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from chatml import chatml_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.agents.demos import copy_rows, demo_rows
from posttrain.agents.envs import get_env
from posttrain.agents.policies import Call
from posttrain.agents.runner import Budgets, EpisodeRunner
from posttrain.config import load_config
from posttrain.engine.run import read_metrics
from posttrain.rollout.engine import HFEngine, Sampling
from posttrain.tasks.tiny import build_model, build_tiny, build_tokenizer
from posttrain.train import train

pytestmark = pytest.mark.slow
QUIET = {"progress": False, "tensorboard": False}
DIGITS = '''
def digit_share(prompts, completions, **_):
    """Share of digits in the assistant's text: dense, so a random model's groups differ."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def held_out_success(model_dir, env: str, budgets: dict, n: int = 64) -> tuple[float, list]:
    """Greedy episodes on n held-out tasks: the share done (graded passed, no failure label)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    runner = EpisodeRunner(tok, "tiny", budgets=Budgets(**budgets), sampling=Sampling(temperature=0))
    cls = get_env(env)
    episodes = runner.run(HFEngine(model, tok), cls, cls.tasks(n, split="held_out", seed=0))
    return sum(e.failure is None and e.reward > 0 for e in episodes) / n, episodes


def sft(root, base, rows, name, *, steps, seed, lr=2e-3, schedule="constant", betas=(0.9, 0.98)):
    """SFT at a constant lr by default: GRPO from an annealed (cosine-to-low-lr) start falls off its sharp
    minimum at the first Adam steps (posttrain/quickstart.py's grpo_config says the same)."""
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "algorithm": "sft",
        "out": str(root / name),
        "model": {"path": str(base)},
        "data": {"train": str(path), "max_length": 512},
        "train": {
            "max_steps": steps,
            "batch_size": 32,
            "lr": lr,
            "warmup_steps": 20,
            "schedule": schedule,
            "betas": list(betas),
            "seed": seed,
            **QUIET,
        },
    }
    return train(cfg).final


def copy_base(root, seed: int):
    """A fresh random tiny model warmed up on echo rows (demos.copy_rows): the stand-in for a pretrained
    base. From random init, golden demos alone leave it on the plateau before copying (see below)."""
    base = build_tiny(root / "base", seed=seed)
    rows = copy_rows(8192, seed=seed)
    return sft(
        root, base, rows, "copy", steps=COPY_STEPS, seed=seed, lr=3e-3, schedule="cosine", betas=(0.9, 0.999)
    )


def grpo(root, start, env, budgets, *, steps, seed, lr, name="grpo", tasks=1024, **extra):
    cfg = {
        "algorithm": "grpo",
        "out": str(root / name),
        "model": {"path": str(start)},
        "env": {"name": env, "budgets": budgets, "tasks": tasks, "eval_tasks": 0, "task_seed": 100 + seed},
        "rollout": {"prompts_per_step": 8, "group_size": 8},
        "train": {"max_steps": steps, "lr": lr, "seed": seed, **QUIET, **extra.pop("train", {})},
        **extra,
    }
    return train(cfg)


# --------------------------------------------------------------------------- resume, chat model by path


def test_an_env_run_resumes_exactly_mid_rollout(tmp_path, monkeypatch):
    (tmp_path / "agent_rewards.py").write_text(DIGITS)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = build_tiny(tmp_path / "tiny", seed=0)

    def cfg(out, steps):
        return {
            "algorithm": "grpo",
            "out": str(tmp_path / out),
            "model": {"path": str(base)},
            "env": {
                "name": "calculator",
                "budgets": {"max_turns": 2, "max_new_tokens": 8},
                "tasks": 32,
                "eval_tasks": 0,
            },
            "rollout": {"prompts_per_step": 2, "group_size": 4},
            "rl": {"minibatches": 2, "rewards": ["agent_rewards:digit_share"]},
            "train": {"max_steps": steps, "save_every": 3, "lr": 1e-3, **QUIET},
        }

    full = train(cfg("full", 6))
    train(cfg("cut", 3))  # the checkpoint at step 3 falls inside the second rollout (2 steps each)
    resumed = train(cfg("cut", 6), resume=True, allow_changed=("train.max_steps",))
    reward = lambda run: [m.get("reward/mean") for m in read_metrics(run.run_dir)]  # noqa: E731
    assert reward(full) == reward(resumed) and len(set(reward(full))) > 1
    a = (full.run_dir / "trajectories.jsonl").read_text().splitlines()
    b = (resumed.run_dir / "trajectories.jsonl").read_text().splitlines()
    ids = lambda lines: [(json.loads(x)["step"], json.loads(x)["ids"]) for x in lines]  # noqa: E731
    assert ids(a) == ids(b) and len(a) == 3 * 8
    wa = AutoModelForCausalLM.from_pretrained(full.final).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed.final).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("algorithm", ["rloo", "dapo", "dr_grpo", "reinforce_pp", "ppo", "cispo", "gspo"])
def test_every_online_preset_trains_on_episodes(tmp_path, algorithm):
    base = build_tiny(tmp_path / "tiny", seed=0)
    res = train(
        {
            "algorithm": algorithm,
            "out": str(tmp_path / "run"),
            "model": {"path": str(base)},
            "env": {
                "name": "calculator",
                "budgets": {"max_turns": 2, "max_new_tokens": 8},
                "tasks": 8,
                "eval_tasks": 0,
            },
            "rollout": {"prompts_per_step": 2, "group_size": 2},
            "train": {"max_steps": 2, **QUIET},
        }
    )
    assert res.final is not None and len((res.run_dir / "trajectories.jsonl").read_text().splitlines()) >= 4


@pytest.mark.parametrize("tool_format", ["tiny", "hermes"])
def test_the_example_config_runs_unchanged_on_a_chat_model_by_path(tmp_path, tool_format):
    # A "real" chat model: a byte-level BPE tokenizer and a ChatML template (Qwen's layout), saved to a
    # directory with a model, loaded by path like any Hugging Face model.
    tok = chatml_tokenizer()
    path = tmp_path / "chat"
    build_model(tok, num_hidden_layers=2, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    overrides = [
        f"model.path={path}", f"out={tmp_path / 'run'}", f"env.format={tool_format}", "env.tasks=8",
        "env.eval_tasks=2", "rollout.prompts_per_step=2", "rollout.group_size=2", "train.max_steps=2",
        "train.eval_every=2", "train.progress=false", "train.tensorboard=false",
    ]  # fmt: skip
    res = train(load_config("examples/agent_calculator.yaml", overrides))
    metrics = read_metrics(res.run_dir)
    assert res.final is not None and [m["agent/drift_frac"] for m in metrics if "agent/drift_frac" in m] == [
        0,
        0,
    ]
    episodes = [json.loads(x) for x in (res.run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert len(episodes) == 8 and all(e["verification"]["text_equal"] for e in episodes if e["verification"])
    # the bridge tokens are ChatML's: the tool turn header follows every sampled turn that got a result
    assert all(
        "<|im_start|>tool" in t["text"] for e in episodes for t in e["turns"][2::2] if t["end"] > t["start"]
    )


# --------------------------------------------------------------------------- learning
#
# What was wrong: from random init the tiny model trained on golden demos alone sits on the plateau before
# copying (200-600 steps, 1,024-8,192 demos: held-out 0-1/64, every digit at ln 10 nats, even the
# answer digits the tool result holds 13 tokens back; it learns the format, the operator and the number's
# length, never a digit's identity). A 400-step warm-up on echo rows (copy_rows) breaks it. Then GRPO
# from an SFT start annealed by a cosine schedule, or at lr 2e-4 / 5e-4 without warmup, loses accuracy
# at the first Adam steps (0.28 -> 0.17, 0.31 -> 0.22 held out); a constant-lr start and lr 1e-4 with 10
# warmup steps rise. The protocol per seed: copy warm-up (400 steps), SFT on 1,024 golden demos (150
# steps, constant lr), the same SFT on no-tool demos (the baseline), GRPO from the first (30 steps).

CALC = {"max_turns": 3, "max_new_tokens": 32, "max_tool_tokens": 16}
SQL = {"max_turns": 3, "max_new_tokens": 96, "max_tool_tokens": 48}
COPY_STEPS, DEMOS, SFT_STEPS = 400, 1024, 150
RL = {"steps": 30, "lr": 1e-4, "train": {"warmup_steps": 10}}
UNMEASURED = "sql's thresholds not yet measured: its first protocol asked for 1,024 distinct tasks of 258 and never started"


def direct(task):
    """The no-tool baseline's demos: answer at once, the sum done in the head."""
    yield [Call("answer", {"value": task["answer"]})]


def calculator_seed(root, seed: int) -> dict:
    """Held-out success of SFT on golden demos (calc, then answer), of SFT on no-tool demos, and of GRPO
    from the first; each from a copy-warmed tiny model of its seed, on demos of its own seed."""
    base, tok = copy_base(root, seed), build_tokenizer()
    golden = demo_rows("calculator", tok, n=DEMOS, seed=100 + seed)
    start = sft(root, base, golden, "sft", steps=SFT_STEPS, seed=seed)
    no_tool = demo_rows("calculator", tok, n=DEMOS, seed=100 + seed, script=direct)
    baseline = sft(root, base, no_tool, "sft_no_tool", steps=SFT_STEPS, seed=seed)
    rl = grpo(root, start, "calculator", CALC, seed=seed, **RL)
    out = {name: held_out_success(path, "calculator", CALC)[0] for name, path in
           [("sft", start), ("no_tool", baseline), ("grpo", rl.final)]}  # fmt: skip
    out["hack_frac"] = max(m.get("agent/hack_frac", 0.0) for m in read_metrics(rl.run_dir))
    return out


def sql_seed(root, seed: int) -> dict:
    """Held-out success of SFT on sql's golden demos and of GRPO from it; the largest hack share of any
    GRPO step, and the held-out episodes with a hack attempt."""
    # sql has 258 distinct train tasks and 30 held-out ones (SqlEnv.tasks refuses more)
    rows = demo_rows("sql", build_tokenizer(), n=256, seed=100 + seed)
    start = sft(root, copy_base(root, seed), rows, "sft", steps=SFT_STEPS, seed=seed)
    rl = grpo(root, start, "sql", SQL, seed=seed, tasks=256, **RL)
    before, _ = held_out_success(start, "sql", SQL, n=30)
    after, episodes = held_out_success(rl.final, "sql", SQL, n=30)
    hacks = [m.get("agent/hack_frac", 0.0) for m in read_metrics(rl.run_dir)]
    return {
        "sft": before,
        "grpo": after,
        "hack_frac": max(hacks),
        "held_out_hacks": sum("hack.attempt" in e.events for e in episodes),
    }


# Measured (this protocol, 2 shared cores at a load of 4-9: 465 s for seed 0 at 4, 735-756 s for seeds 1-2
# at 8-9): held-out success of 64 greedy episodes
#     seed   SFT start   no-tool baseline   after GRPO   gain   hack share (any GRPO step)
#     0      0.312       0.000              0.484        0.172  0
#     1      0.562       0.000              0.688        0.125  0
#     2      0.609       0.000              0.719        0.109  0
# Thresholds from that spread: every gain at least 3/64 (the smallest measured is 7/64) and a mean of
# 0.08 (measured 0.135); GRPO at least 0.4 above the no-tool baseline (measured 0.48 or more).


def test_calculator_grpo_beats_the_sft_start_and_the_no_tool_baseline(tmp_path):
    runs = [calculator_seed(tmp_path / f"seed{s}", s) for s in (0, 1, 2)]
    gains = [r["grpo"] - r["sft"] for r in runs]
    assert min(gains) >= 3 / 64 and statistics.mean(gains) >= 0.08, runs
    assert all(r["grpo"] >= r["no_tool"] + 0.4 for r in runs), runs
    assert max(r["hack_frac"] for r in runs) == 0, runs


@pytest.mark.skip(reason=UNMEASURED)
def test_sql_held_out_success_rises_and_hack_labels_stay_zero(tmp_path):
    runs = [sql_seed(tmp_path / f"seed{s}", s) for s in (0, 1, 2)]
    assert statistics.mean(r["grpo"] for r in runs) > statistics.mean(r["sft"] for r in runs), runs
    assert all(r["hack_frac"] == 0 and r["held_out_hacks"] == 0 for r in runs), runs
