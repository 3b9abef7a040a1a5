"""End to end on CPU: GRPO at the reference script's settings (shared/reference/grpo_min.py: 16 prompts x
8 samples, exact-match reward, lr 5e-4, Adam betas 0.9/0.99, no KL) raises held-out 2-digit pass@1 within a
fixed number of steps, from an SFT model trained at constant lr (the benchmark's START; an annealed start is
far more fragile, see the quickstart's GRPO stage).

One thread, on purpose: the SFT start sits on the steep part of its curve, where the order of float sums
decides the trajectory. Held-out pass@1 after 250 / 300 / 350 / 400 SFT steps measured 0.075 / 0.215 /
0.285 / 0.41 with one thread and 0.27 / 0.40 / 0.54 / 0.935 with two; and GRPO at lr 5e-4 from the
two-thread 300-step start (0.40) collapsed (0.13 at step 300, 0.0 at 600). The test pins the trajectory it
was measured on instead of claiming more than one trajectory shows."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.io import write_jsonl
from posttrain.engine.run import read_metrics
from posttrain.eval.generation import accuracy
from posttrain.tasks import arithmetic
from posttrain.train import train

LEVELS = ("add2",)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_grpo_raises_held_out_pass_at_1_within_a_step_budget(tmp_path, one_thread):
    from posttrain.tasks.tiny import build_tiny

    init = build_tiny(tmp_path / "tiny", size="tiny", seed=0)
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", arithmetic.sft_rows(400 * 64, levels=LEVELS))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic.prompt_rows(20_000, levels=LEVELS))
    held_out = arithmetic.eval_rows(LEVELS, n_per_level=200)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", held_out)
    common = {"progress": False, "tensorboard": False, "log_every": 50}
    sft = train(
        {
            "algorithm": "sft",
            "out": str(tmp_path / "sft"),
            "model": {"path": str(init)},
            "data": {"train": str(sft_rows), "max_length": 64},
            "train": {"lr": 2e-3, "betas": [0.9, 0.98], "batch_size": 64, "max_steps": 400,
                      "schedule": "constant", "warmup_steps": 20, **common},
        }
    )  # fmt: skip
    start = AutoModelForCausalLM.from_pretrained(sft.final)
    before = accuracy(start, AutoTokenizer.from_pretrained(sft.final), held_out, max_new_tokens=8)

    grpo = train(
        {
            "algorithm": "grpo",  # the preset as it is: group-std advantages, clip 0.2, no KL
            "out": str(tmp_path / "grpo"),
            "model": {"path": str(sft.final)},
            "data": {"train": str(prompts), "eval": str(eval_file), "max_length": 64},
            "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 8},
            "rl": {"rewards": ["exact_match"]},
            "train": {"lr": 5e-4, "max_steps": 900, "eval_every": 150, **common},
        }
    )
    evals = [m["eval/pass@1"] for m in read_metrics(grpo.run_dir) if "eval/pass@1" in m]
    # measured (one thread): start 0.41; every 150 steps 0.45 0.61 0.485 0.635 0.455 0.565 (mean 0.533).
    # The curve swings by ~0.15 from one evaluation to the next (the health monitor flags the drops), so
    # the test looks at its level (the mean) and its best, not one point. (Two sessions ago, with a tiny
    # model whose vocabulary had no tool token, the same settings gave 0.42 -> 0.73 0.57 0.79 0.70 0.65.)
    assert before < 0.6, before
    assert sum(evals) / len(evals) >= before + 0.08, (before, evals)
    assert max(evals) >= before + 0.15, (before, evals)
