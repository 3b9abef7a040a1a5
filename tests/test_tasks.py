"""Tests for the bundled task: tiny tokenizer/model, arithmetic levels, greedy evaluation."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.eval.generation import accuracy, accuracy_by_level, generate_greedy
from posttrain.tasks import arithmetic as A
from posttrain.tasks.tiny import (
    SPECIAL_TOKENS,
    build_config,
    build_model,
    build_tiny,
    build_tokenizer,
    num_parameters,
)

torch.set_num_threads(2)

CHAT = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "Ana has 12 pens, buys 35 more.\nHow many? (exactly)"},
    {"role": "assistant", "content": "47"},
    {"role": "user", "content": "x+17=52, x=?"},
    {"role": "assistant", "content": "35"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


# --- tokenizer and chat template ---------------------------------------------------------


def test_tokenizer_round_trips_chat_text_and_reloads(tokenizer, saved_tiny):
    reloaded = AutoTokenizer.from_pretrained(saved_tiny)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    for tok in (tokenizer, reloaded):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert ids == tokenizer(text)["input_ids"]
        assert tok.apply_chat_template(CHAT, tokenize=False) == text
    # Special tokens are single ids, also when they appear in raw text (pretraining corpus).
    for special in SPECIAL_TOKENS:
        assert len(reloaded(special)["input_ids"]) == 1
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<s>", "<|end|>", "<pad>")
    assert reloaded.padding_side == "left"
    assert len(reloaded("12+35")["input_ids"]) == 5  # char-level, nothing added


def test_chat_template_renders_expected_string(tokenizer):
    assert tokenizer.apply_chat_template(CHAT[:3], tokenize=False) == (
        "<|system|>Answer with a number.<|end|>"
        "<|user|>Ana has 12 pens, buys 35 more.\nHow many? (exactly)<|end|>"
        "<|assistant|>47<|end|>"
    )
    prompt = [{"role": "user", "content": "12+35"}]
    assert (
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        == "<|user|>12+35<|end|><|assistant|>"
    )
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "1"}], tokenize=False)


def test_chat_template_tool_role_and_tools_line(tokenizer):
    tools = [
        {"type": "function", "function": {"name": "calc", "parameters": {"properties": {"expr": {}}}}},
        {"type": "function", "function": {"name": "submit", "parameters": {"properties": {}}}},
    ]
    chat = [
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "<call>calc(1+2)</call>"},
        {"role": "tool", "content": "3"},
    ]
    text = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>tools: calc(expr) submit()<|end|><|user|>1+2<|end|>"
        "<|assistant|><call>calc(1+2)</call><|end|><|tool|>3<|end|><|assistant|>"
    )
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|tool|>")) == 1  # one special token
    # The tool turn is context: only the assistant's content and its <|end|> are in the mask.
    out = tokenizer.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = "".join(tokenizer.decode([t]) for t, m in zip(out["input_ids"], out["assistant_masks"]) if m)
    assert masked == "<call>calc(1+2)</call><|end|>"
    # Without tools the rendering is what it always was.
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False) == "<|user|>1+2<|end|>"


def test_assistant_mask_is_exactly_answers_and_end(saved_tiny):
    tok = AutoTokenizer.from_pretrained(saved_tiny)  # the template must survive save/reload
    out = tok.apply_chat_template(CHAT, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert masked == ["4", "7", "<|end|>", "3", "5", "<|end|>"]
    # The role token that opens each assistant turn is prompt, not target.
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    assert all(not m for i, m in zip(ids, mask) if i == assistant_id)


# --- models --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_model_reloads_with_identical_logits(tmp_path, tokenizer, arch):
    path = build_tiny(tmp_path, arch=arch, seed=3)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    original = build_model(tokenizer, arch=arch, seed=3).eval()
    ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(ids).logits, reloaded(ids).logits)
    config = reloaded.config
    assert config.vocab_size == 128 and config.vocab_size % 64 == 0 and config.vocab_size >= len(tokenizer)
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_build_model_is_seeded_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(tokenizer, seed=1, num_hidden_layers=1)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model(tokenizer, seed=1, num_hidden_layers=1)
    c = build_model(tokenizer, seed=2, num_hidden_layers=1)
    assert a.config.num_hidden_layers == 1  # overrides reach the config
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_parameter_counts(tokenizer):
    tiny = num_parameters(build_config(tokenizer, "tiny"))
    assert 1.0e6 <= tiny <= 1.2e6
    assert build_model(tokenizer, "tiny").num_parameters() == tiny
    for arch in ("llama", "qwen2"):
        assert 20e6 <= num_parameters(build_config(tokenizer, "small", arch=arch)) <= 30e6
    with pytest.raises(ValueError, match="unknown model size"):
        build_config(tokenizer, "huge")


# --- arithmetic levels ---------------------------------------------------------------------


def canonical_key(question: str, answer: str) -> tuple:
    """The key of a problem, worked out from its text alone (independent of the package)."""
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    value = int(answer)
    if ", x=?" in question:  # equation: the key is the computation that solves it
        b, c = numbers
        if question.startswith("x-"):
            assert value == b + c
            return ("add", min(b, c), max(b, c))
        assert value == c - b
        return ("sub", c, b)
    a, b = numbers
    if value == a + b and "-" not in question:
        return ("add", min(a, b), max(a, b))
    assert value == a - b, question
    return ("sub", a, b)


def corpus_problems(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs parsed from a pretraining document."""
    if "<|user|>" in text:
        return re.findall(r"<\|user\|>(.*?)<\|end\|><\|assistant\|>(.*?)<\|end\|>", text)
    pairs = []
    for line in text.split("\n"):
        if ", x=" in line:
            question, answer = line.rsplit("=", 1)
            pairs.append((question + "=?", answer))
        elif line.endswith(tuple("0123456789")) and "?" in line:
            question, answer = line.rsplit(" ", 1)
            pairs.append((question, answer))
        else:
            question, answer = line.split("=")
            pairs.append((question, answer))
    return pairs


def test_held_out_sets_are_fixed_and_distinct():
    for level in A.LEVELS:
        first = A.held_out(level)
        A._held_out_full.cache_clear()  # recompute from scratch: no hidden state
        assert A.held_out(level) == first
        assert len(first) == (16 if level == "add1" else 400)
        assert len({p.key for p in first}) == len(first)
        assert len({p.question for p in first}) == len(first)
        assert A.held_out(level, 50) == first[:50]
        assert all(p.level == level and canonical_key(p.question, p.answer) == p.key for p in first)
    with pytest.warns(UserWarning, match="not the fixed held-out set"):
        A.held_out("add2", seed=7)


def test_training_samples_avoid_held_out_in_every_wording():
    held = A.held_out_keys()
    held_questions = {row["prompt"][0]["content"] for row in A.eval_rows()}
    assert len(held) > 2000
    rng = random.Random(0)
    samples = [A.sample_train(rng) for _ in range(20_000)]
    assert {p.level for p in samples} == set(A.LEVELS)
    for p in samples:
        # The key is recomputed from the text, so a wrongly built key cannot hide a leak.
        assert p.key == canonical_key(p.question, p.answer)
        assert p.key not in held and p.question not in held_questions
    assert all(A.sample_train(rng, "add1").level == "add1" for _ in range(100))
    with pytest.raises(ValueError):
        A.sample_train(rng, ["mul9"])


def test_word_and_equation_keys_are_canonical():
    rng = random.Random(1)
    words = [A._word(rng) for _ in range(300)]
    equations = [A._equation(rng) for _ in range(300)]
    assert {p.key[0] for p in words} == {p.key[0] for p in equations} == {"add", "sub"}
    for p in words + equations:
        assert p.key == canonical_key(p.question, p.answer)
    # The same fact in three wordings shares one key.
    assert A.fact_key("add", 35, 12) == A.fact_key("add", 12, 35) == ("add", 12, 35)


def test_pretraining_corpus_never_contains_held_out():
    held = A.held_out_keys()
    docs = A.pretrain_corpus(3000, seed=5)
    chat_docs = [d["text"] for d in docs if d["text"].startswith("<|user|>")]
    assert 0.25 < len(chat_docs) / len(docs) < 0.35  # chat_fraction defaults to 0.3
    assert all(len(d["text"]) <= 240 or d["text"] in chat_docs for d in docs)
    n_problems = 0
    for doc in docs:
        for question, answer in corpus_problems(doc["text"]):
            assert canonical_key(question, answer) not in held
            n_problems += 1
    assert n_problems > 5 * len(docs) * 0.8
    assert A.pretrain_corpus(10, seed=5) == docs[:10]


def test_rows_have_the_documented_shapes():
    (sft,) = A.sft_rows(1, levels=["eq2"])
    assert sft["level"] == "eq2" and [m["role"] for m in sft["messages"]] == ["user", "assistant"]
    (prompt,) = A.prompt_rows(1, levels=["add2"])
    assert set(prompt) == {"prompt", "answer", "level"} and prompt["prompt"][0]["role"] == "user"
    assert A.sft_rows(5, seed=1) == A.sft_rows(5, seed=1) != A.sft_rows(5, seed=2)
    rows = A.eval_rows(["add1", "sub3"], n_per_level=10)
    assert [r["level"] for r in rows] == ["add1"] * 10 + ["sub3"] * 10


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("47", 1.0),
        ("47<|end|>", 1.0),
        (" 47 <|end|>12+3", 1.0),
        ("47\n12+35=47", 1.0),
        ("46", 0.0),
        ("4", 0.0),
        ("470", 0.0),
        ("47abc", 0.0),
        ("47 is the answer", 0.0),
        ("", 0.0),
        ("<|end|>47", 0.0),
    ],
)
def test_exact_match(completion, expected):
    assert A.exact_match(completion, "47") == expected


def test_write_task_files(tmp_path):
    paths = A.write_task_files(tmp_path, n_sft=50, n_prompts=40, n_pretrain_docs=30)
    assert set(paths) == {"sft_train", "prompts_train", "eval", "pretrain"}
    counts = {}
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(isinstance(row, dict) for row in rows)
        counts[name] = len(rows)
    assert counts == {"sft_train": 50, "prompts_train": 40, "eval": 16 + 6 * 400, "pretrain": 30}


# --- greedy evaluation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return build_model(tokenizer, seed=0)


def test_generate_greedy_bounded_ordered_and_restores_mode(tokenizer, tiny_model):
    prompts = [row["prompt"] for row in A.eval_rows(n_per_level=2)] + ["12+35=", "x"]
    tiny_model.train()
    batched = generate_greedy(tiny_model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    assert tiny_model.training
    assert len(batched) == len(prompts)
    for completion in batched:
        assert len(tokenizer(completion)["input_ids"]) <= 5
        assert "<|end|>" not in completion
    # Sorting by length, batching and left padding do not change what each prompt gets.
    tiny_model.eval()
    one_by_one = [generate_greedy(tiny_model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts[:4]]
    assert not tiny_model.training
    assert one_by_one == batched[:4]


def test_accuracy_is_a_mean_of_scores(tokenizer, tiny_model):
    rows = A.eval_rows(["add1", "add2"], n_per_level=4)
    value = accuracy(tiny_model, tokenizer, rows)
    assert 0.0 <= value <= 1.0
    # Scoring against the model's own completions gives exactly 1; against anything else 0.
    completions = generate_greedy(tiny_model, tokenizer, [r["prompt"] for r in rows])
    own = [dict(r, answer=c) for r, c in zip(rows, completions)]

    def same(c, a):
        return float(c == a)

    assert accuracy(tiny_model, tokenizer, own, score=same) == 1.0
    assert accuracy(tiny_model, tokenizer, own, score=lambda c, a: 0.0) == 0.0
    assert accuracy_by_level(tiny_model, tokenizer, own, score=same) == {"add1": 1.0, "add2": 1.0}
    with pytest.raises(ValueError):
        accuracy(tiny_model, tokenizer, [])
