"""One prompt rule for every stage: the same row gives the same prompt token ids in SFT, DPO, reward-model
scoring, GRPO rollouts and evaluation, with a ChatML chat template and with a plain tokenizer (BPE, trained
here). Before, a string prompt was wrapped in a user turn for SFT/DPO/RM but passed raw to GRPO and eval, so
a policy SFT'd on {"prompt", "completion"} rows sampled from a prompt format it never saw."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from chatml import chatml_tokenizer, plain_tokenizer

from posttrain.algorithms import preference
from posttrain.config import load_config
from posttrain.data.templates import encode_prompts, encode_sft_row, render_prompt
from posttrain.eval.evaluate import evaluate
from posttrain.eval.suite import load_suite
from posttrain.rewards.model import RewardModel
from posttrain.rollout.engine import Completion
from posttrain.train import prompt_rows

QUESTION = "What is 12 + 35?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]


class RecordingEngine:
    """Answers "47" to everything and keeps the prompt ids it was asked to continue."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def generate(self, prompt_ids, n, sampling):
        self.seen += [list(p) for p in prompt_ids]
        ids = self.tok("47", add_special_tokens=False)["input_ids"]
        return [[Completion(ids, [0.0] * len(ids), "47", "stop")] * n for _ in prompt_ids]


def stage_prompt_ids(tok, prompt, tmp_path) -> dict[str, list[int]]:
    row = {"prompt": prompt, "completion": "47"}
    sft = encode_sft_row(row, tok, max_length=512)
    first_loss = next(t for t, target in enumerate(sft.targets) if target != -100)
    cfg = SimpleNamespace(data=SimpleNamespace(max_length=512, truncation="error"))
    pair = preference.encode({"prompt": prompt, "chosen": "47", "rejected": "46"}, tok, cfg, "x:1")
    rm_ids = RewardModel.encode(tok, prompt, "47")

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "answer": "47"}) + "\n")
    grpo_cfg = load_config(
        {"algorithm": "grpo", "out": "x", "model": {"path": "m"}, "data": {"train": str(path)},
         "rollout": {"max_new_tokens": 8}}
    )  # fmt: skip
    _, (_, grpo_ids) = prompt_rows([str(path)], tok, grpo_cfg)

    (tmp_path / "suite.yaml").write_text("dataset: prompts.jsonl\nscorers: [exact_match]\n")
    engine = RecordingEngine(tok)
    result = evaluate(load_suite(tmp_path / "suite.yaml"), engine, tok)
    assert result.report["metrics"]["pass@1"] == 1.0
    return {
        "sft": sft.input_ids[: first_loss + 1],  # up to the position that predicts the first completion token
        "dpo chosen": pair.chosen.input_ids[: first_loss + 1],
        "dpo rejected": pair.rejected.input_ids[: first_loss + 1],
        "reward model": rm_ids[: first_loss + 1],
        "grpo": grpo_ids[0],
        "eval": engine.seen[0],
    }


@pytest.mark.parametrize(
    "tokenizer, prompt",
    [(chatml_tokenizer, QUESTION), (chatml_tokenizer, MESSAGES), (plain_tokenizer, QUESTION)],
    ids=["chatml-string", "chatml-messages", "plain-string"],
)
def test_the_same_row_gives_the_same_prompt_ids_in_every_stage(tokenizer, prompt, tmp_path):
    tok = tokenizer()
    _, (rule,) = encode_prompts(tok, [prompt])
    got = stage_prompt_ids(tok, prompt, tmp_path)
    assert {stage: ids for stage, ids in got.items() if ids != rule} == {}
    # and the rule is what its docstring says
    text = render_prompt(tok, prompt)
    if tok.chat_template:
        assert text.endswith("<|im_start|>assistant\n") and f"<|im_start|>user\n{QUESTION}<|im_end|>" in text
        assert rule == tok(text, add_special_tokens=False)["input_ids"]
    else:
        assert text == QUESTION and rule[0] == tok.bos_token_id


def test_a_raw_string_is_not_what_a_chat_model_is_trained_on():
    """The mismatch this rule removes: the raw string's ids (what GRPO and eval used to sample from) are not
    a prefix of the SFT row's ids under a chat template."""
    tok = chatml_tokenizer()
    raw = tok(QUESTION, add_special_tokens=False)["input_ids"]
    sft = encode_sft_row({"prompt": QUESTION, "completion": "47"}, tok, max_length=512)
    assert sft.input_ids[: len(raw)] != raw
