"""End to end on CPU (slow): RLHF with PPO against a reward model (RM) trained on preference pairs raises
the gold score of the policy's answers.

The start is an SFT model taught by verbose, over-cautious demonstrators (half its answers padded with
filler, one in ten a refusal: `preference.chatty_sft_rows`). The RM is a Bradley-Terry model trained from
it on the bundled gold-ordered pairs; it learns concise-over-padded and answer-over-refusal, not which
number is right (a 1M-parameter scorer does not learn to verify arithmetic; see the issue notes). So the
gold PPO can win is what the RM knows, and the KL anchor must keep the RM's arbitrary preferences among
numbers from eroding correctness. Gold is measured on the policy's samples (temperature 1) on held-out
problems: the quantity RLHF optimises. The greedy answer of such a model is mostly the bare number
already, so its gold barely moves."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.io import write_jsonl
from posttrain.data.templates import encode_prompts
from posttrain.rollout.engine import HFEngine, Sampling
from posttrain.tasks import arithmetic, preference
from posttrain.train import train

LEVELS = ("add1", "add2", "sub2")
COMMON = {"progress": False, "tensorboard": False, "log_every": 50}


def sampled_gold(model_dir, rows, n=4, seed=0) -> dict[str, float]:
    """Mean gold of n samples (temperature 1) per held-out prompt, and the share of samples that are correct,
    padded (a correct or wrong number with text around it) and refusals (no number)."""
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )
    _, ids = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    torch.manual_seed(seed)
    groups = HFEngine(model, tokenizer).generate(ids, n, Sampling(max_new_tokens=48, temperature=1.0))
    gold, kinds = [], []
    for group, row in zip(groups, rows, strict=True):
        for c in group:
            text = c.text.split(arithmetic.END, 1)[0].strip()
            gold.append(preference.gold_score(text, row["answer"]))
            kinds.append(
                "refusal" if not re.search(r"\d", text) else "concise" if text.isdigit() else "padded"
            )
    share = lambda x: sum(x) / len(x)  # noqa: E731
    return {
        "gold": share(gold),
        "correct": share([g > 0 for g in gold]),
        "padded": share([k == "padded" for k in kinds]),
        "refusal": share([k == "refusal" for k in kinds]),
    }


@pytest.mark.slow
def test_ppo_against_a_trained_reward_model_raises_gold(tmp_path):
    from posttrain.tasks.tiny import build_tiny

    init = build_tiny(tmp_path / "tiny", size="tiny", seed=0)
    chatty = write_jsonl(tmp_path / "chatty.jsonl", preference.chatty_sft_rows(20_000, levels=LEVELS))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference.preference_rows(10_000, levels=LEVELS))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic.prompt_rows(20_000, levels=LEVELS))
    held_out = arithmetic.eval_rows(LEVELS, n_per_level=200)
    sft = train(
        {
            "algorithm": "sft",
            "out": str(tmp_path / "sft"),
            "model": {"path": str(init)},
            "data": {"train": str(chatty), "max_length": 128},
            "train": {"lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 0.01, "batch_size": 128, "max_steps": 1200,
                      "warmup_steps": 20, "schedule": "constant", **COMMON},
        }
    )  # fmt: skip
    rm = train(
        {
            "algorithm": "reward",
            "out": str(tmp_path / "rm"),
            "model": {"path": str(sft.final)},
            "data": {"train": str(pairs), "max_length": 128},
            "train": {"lr": 2e-3, "batch_size": 32, "max_steps": 150, "warmup_steps": 10, **COMMON},
        }
    )
    ppo = train(
        {
            "algorithm": "ppo",
            "out": str(tmp_path / "ppo"),
            "model": {"path": str(sft.final)},
            "data": {"train": str(prompts), "max_length": 96},
            "rollout": {"prompts_per_step": 16, "group_size": 4, "max_new_tokens": 48},
            "rl": {"rewards": [{"name": "reward_model", "path": str(rm.final)}], "kl_coef": 1.0, "epochs": 2,
                   "minibatches": 2},
            "train": {"lr": 3e-5, "max_steps": 150, **COMMON},
        }
    )  # fmt: skip
    before, after = sampled_gold(sft.final, held_out), sampled_gold(ppo.final, held_out)
    print("before", before, "after", after)
    assert before["refusal"] + before["padded"] > 0.4, before  # the demonstrators' habits were learnt
    assert after["refusal"] + after["padded"] < 0.5 * (before["refusal"] + before["padded"]), (before, after)
    assert after["correct"] >= before["correct"] - 0.02, (before, after)  # the KL anchor held correctness
    assert after["gold"] >= 1.15 * before["gold"], (before, after)
