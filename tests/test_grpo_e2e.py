"""End to end on CPU: GRPO at the reference script's settings (shared/reference/grpo_min.py: 16 prompts x
8 samples, exact-match reward, lr 5e-4, Adam betas 0.9/0.99, no KL) raises held-out 2-digit pass@1 by a
wide margin within a training-time budget, from an SFT model trained at constant lr (the benchmark's
START; an annealed start is far more fragile, see the quickstart's GRPO stage)."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.io import write_jsonl
from posttrain.engine.run import read_metrics
from posttrain.eval.generation import accuracy
from posttrain.tasks import arithmetic
from posttrain.train import train

LEVELS = ("add2",)


@pytest.mark.slow
def test_grpo_raises_held_out_pass_at_1_within_a_time_budget(tmp_path):
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
            "train": {"lr": 5e-4, "max_steps": 100_000, "max_seconds": 120, "eval_every": 300, **common},
        }
    )
    evals = [m["eval/pass@1"] for m in read_metrics(grpo.run_dir) if "eval/pass@1" in m]
    # measured: 0.42 -> 0.88 after 120 s (benchmarks/grpo.py, 2 seeds); here, evaluations every 300 steps
    # of two runs: 0.73 0.57 0.79 0.70 0.65 and (90 s) 0.72 0.70 0.70. The curve swings by ~0.1 from one
    # evaluation to the next, so the test looks at its level (the mean) and its best, not one point.
    assert before < 0.6, before
    assert sum(evals) / len(evals) >= before + 0.2, (before, evals)
    assert max(evals) >= 0.7, (before, evals)
