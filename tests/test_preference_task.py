"""Tests for the bundled preference task: the gold reward, pairs, feedback rows, audit probes, files."""

from __future__ import annotations

import json
import re
import string
from collections import Counter

import pytest

from posttrain.data.io import write_jsonl
from posttrain.data.schemas import load_rows
from posttrain.tasks import arithmetic as A
from posttrain.tasks import preference as P

LEVELS = P.DEFAULT_LEVELS
PRINTABLE = set(string.printable[:95])  # printable ASCII, no newline or tabs


def text(messages: list[dict]) -> str:
    (message,) = messages
    return message["content"]


def gold(row: dict, side: str) -> float:
    return P.gold_score(text(row[side]), row["answer"])


def longer_share(rows: list[dict]) -> tuple[float, int]:
    """Share of pairs with unequal lengths where the chosen is the longer, and their count."""
    differ = [r for r in rows if len(text(r["chosen"])) != len(text(r["rejected"]))]
    longer = sum(len(text(r["chosen"])) > len(text(r["rejected"])) for r in differ)
    return longer / len(differ), len(differ)


@pytest.fixture(scope="module")
def unbiased():
    return P.preference_rows(4000, seed=0)


@pytest.fixture(scope="module")
def biased():
    return P.preference_rows(4000, seed=0, length_bias=0.7)


# --- gold reward -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("47", "47", 1.0),
        ("  47  ", "47", 1.0),  # surrounding whitespace is not padding
        ("\n47\n", "47", 1.0),
        ("47<|end|>", "47", 1.0),  # cut at the end token
        ("47<|end|>garbage", "47", 1.0),
        ("The answer is 47.", "47", 1.0 - 0.01 * 15),
        ("  The answer is 47.", "47", 1.0 - 0.01 * 15),
        ("Sure! 47. Hope this helps!", "47", 1.0 - 0.01 * 24),
        ("47 " + "blah " * 30, "47", 0.5),  # floored: padded-but-correct never falls to wrong
        ("047", "47", 0.99),  # same value, one extra character
        ("47.0", "47", 0.98),
        ("46", "47", 0.0),
        ("The answer is 74.", "47", 0.0),
        ("46, no wait, 47", "47", 0.0),  # the first number counts
        ("47.5", "47", 0.0),  # a decimal is read whole
        ("-47", "47", 0.0),
        ("-5", "-5", 1.0),  # negative answers
        ("It is -5.", "-5", 1.0 - 0.01 * 7),
        ("5", "-5", 0.0),
        ("I can't help with that.", "47", 0.0),
        ("Let me think about this carefully.", "47", 0.0),
        ("", "47", 0.0),
        ("   ", "47", 0.0),
    ],
)
def test_gold_score_hand_cases(completion, answer, expected):
    assert P.gold_score(completion, answer) == pytest.approx(expected)


def test_gold_score_orders_concise_padded_wrong_and_rejects_non_numeric_answers():
    concise, padded, very_padded = "35", "It is 35.", "Great question! The answer is 35. Hope this helps!"
    scores = [P.gold_score(c, "35") for c in (concise, padded, very_padded, "36")]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert P.gold_reward(["52-17"] * 2, [padded, "36"], answer=["35", "35"]) == scores[1:4:2]
    with pytest.raises(ValueError, match="must be a number"):
        P.gold_score("47", "forty-seven")


# --- preference pairs ----------------------------------------------------------------------


def check_pairs(rows: list[dict]) -> None:
    for row in rows:
        assert gold(row, "chosen") > gold(row, "rejected"), row
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        for side in ("chosen", "rejected"):
            content = text(row[side])
            assert set(content) <= PRINTABLE and 0 < len(content) < P.MAX_COMPLETION_CHARS, content


def test_every_pair_is_gold_ordered_printable_and_short(unbiased, biased):
    check_pairs(unbiased)
    check_pairs(biased)
    for bias in (0.0, 1.0):
        check_pairs(P.preference_rows(500, seed=1, length_bias=bias, levels=A.LEVELS))
    # Held-out pairs too, on every level (long word problems, 4-digit answers).
    check_pairs(P.preference_eval_rows(A.LEVELS, n_per_level=50))


def test_unbiased_pairs_carry_no_length_signal(unbiased):
    share, n_differ = longer_share(unbiased)
    assert abs(share - 0.5) <= 0.07
    assert n_differ >= 0.7 * len(unbiased)  # ties are a minority (TIE_SHARE = 0.2)


@pytest.mark.parametrize("bias", [0.7, 0.0, 1.0])
def test_length_bias_plants_the_asked_correlation(biased, bias):
    rows = biased if bias == 0.7 else P.preference_rows(1000, seed=3, length_bias=bias)
    share, _ = longer_share(rows)
    assert abs(share - bias) <= 0.05


def test_pair_type_shares_follow_the_documented_mix(unbiased, biased):
    for rows, expected in [
        (unbiased, {"correct_vs_wrong": 0.5, "concise_vs_padded": 0.2, "correct_vs_refusal": 0.3}),
        (biased, {"correct_vs_wrong": 0.54, "concise_vs_padded": 0.12, "correct_vs_refusal": 0.34}),
    ]:
        counts = Counter(r["pair_type"] for r in rows)
        assert set(counts) == set(P.PAIR_TYPES)
        for pair_type, share in expected.items():
            assert abs(counts[pair_type] / len(rows) - share) <= 0.03, (pair_type, counts)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("47+38", {"58", "75", "84", "86", "95"}),  # 75: the carry dropped
        ("53-17", {"26", "35", "37", "44", "46", "63"}),  # 44: the borrow dropped (|3-7| = 4)
        ("7+8", {"5", "14", "16", "25", "51"}),  # 5: the carry dropped
        ("12+3", {"5", "14", "16", "25", "51"}),  # operands of different widths
        ("9-9", {"1", "10"}),  # never negative, never the answer
    ],
)
def test_near_misses_by_hand(question, expected):
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", question).groups()
    answer = int(a) + int(b) if op == "+" else int(a) - int(b)
    key = A.fact_key("add" if op == "+" else "sub", int(a), int(b))
    assert set(P._near_misses(A.Problem("x", question, str(answer), key))) == expected


def test_wrong_answers_in_pairs_are_near_misses(unbiased):
    for row in unbiased:
        if row["pair_type"] == "correct_vs_wrong":
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", row["prompt"][0]["content"]).groups()
            key = A.fact_key("add" if op == "+" else "sub", int(a), int(b))
            problem = A.Problem(row["level"], row["prompt"][0]["content"], row["answer"], key)
            wrong = P._NUMBER.search(text(row["rejected"])).group()
            assert wrong in P._near_misses(problem), row


def test_no_held_out_problem_in_training_rows(unbiased, biased):
    held = set()
    for level in A.LEVELS:
        for problem in A.held_out(level):
            held.add(problem.question)
            op, a, b = problem.key
            if op == "add":  # the same fact in the other order
                held.update({f"{a}+{b}", f"{b}+{a}"})
    feedback = P.feedback_rows(2000, seed=0, levels=A.LEVELS)
    for rows in (unbiased, biased, P.preference_rows(2000, seed=5, levels=A.LEVELS), feedback):
        assert not {r["prompt"][0]["content"] for r in rows} & held
    # ...while the eval rows are exactly held-out problems.
    eval_rows = P.preference_eval_rows(LEVELS, n_per_level=30)
    assert {r["prompt"][0]["content"] for r in eval_rows} <= held
    assert Counter(r["level"] for r in eval_rows) == dict.fromkeys(LEVELS, 30)


def test_rows_are_deterministic_by_seed():
    assert P.preference_rows(200, seed=7) == P.preference_rows(200, seed=7)
    assert P.preference_rows(200, seed=7) != P.preference_rows(200, seed=8)
    assert P.feedback_rows(200, seed=7) == P.feedback_rows(200, seed=7)
    assert P.feedback_rows(200, seed=7) != P.feedback_rows(200, seed=8)
    assert P.preference_eval_rows(n_per_level=20) == P.preference_eval_rows(n_per_level=20)
    assert P.audit_rows(n_per_level=10) == P.audit_rows(n_per_level=10)


def test_length_bias_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="length_bias"):
        P.preference_rows(10, length_bias=1.5)


# --- answer pairs (DPO from a model that answers with the bare number) -----------------------


def test_answer_pairs_are_concise_correct_vs_concise_near_miss(tmp_path):
    rows = P.answer_pairs(2000, seed=0, levels=A.LEVELS)
    check_pairs(rows)
    assert Counter(r["pair_type"] for r in rows) == {"correct_vs_wrong": 2000}
    assert set(Counter(r["level"] for r in rows)) == set(A.LEVELS)
    held = {p.question for level in A.LEVELS for p in A.held_out(level)}
    assert not {r["prompt"][0]["content"] for r in rows} & held
    for row in P.answer_pairs(2000, seed=1):  # expressions only: the near misses can be checked by hand
        assert text(row["chosen"]) == row["answer"] and gold(row, "chosen") == 1.0
        wrong = text(row["rejected"])
        assert re.fullmatch(r"\d+", wrong) and gold(row, "rejected") == 0.0
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", row["prompt"][0]["content"]).groups()
        key = A.fact_key("add" if op == "+" else "sub", int(a), int(b))
        assert wrong in P._near_misses(
            A.Problem(row["level"], row["prompt"][0]["content"], row["answer"], key)
        )
    assert P.answer_pairs(200, seed=7) == P.answer_pairs(200, seed=7) != P.answer_pairs(200, seed=8)
    path = P.write_answer_pairs(tmp_path, n_train=300, seed=2)
    assert path == tmp_path / "answer_pairs.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == P.answer_pairs(300, seed=2)
    assert len(load_rows(path, "preference")) == 300


# --- chatty SFT rows (the start of RLHF against the reward model) -------------------------------


def test_chatty_sft_rows_are_correct_padded_or_refusals_in_the_asked_shares(tmp_path):
    rows = P.chatty_sft_rows(4000, seed=0, levels=A.LEVELS, padded=0.5, refusal=0.1)
    shares = Counter(r["completion_type"] for r in rows)
    assert abs(shares["padded"] / 4000 - 0.5) < 0.03 and abs(shares["refusal"] / 4000 - 0.1) < 0.02
    held = {p.question for level in A.LEVELS for p in A.held_out(level)}
    assert not {r["messages"][0]["content"] for r in rows} & held
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        content, score = assistant["content"], P.gold_score(assistant["content"], row["answer"])
        assert set(content) <= PRINTABLE and len(content) < P.MAX_COMPLETION_CHARS
        if row["completion_type"] == "concise":
            assert content == row["answer"] and score == 1.0
        elif row["completion_type"] == "padded":  # right, but costs gold per extra character
            assert row["answer"] in content and 0.5 <= score < 1.0
        else:
            assert not re.search(r"\d", content) and score == 0.0
    assert Counter(r["completion_type"] for r in P.chatty_sft_rows(300, padded=0, refusal=0)) == {
        "concise": 300
    }
    assert P.chatty_sft_rows(200, seed=3) == P.chatty_sft_rows(200, seed=3) != P.chatty_sft_rows(200, seed=4)
    assert len(load_rows(write_jsonl(tmp_path / "c.jsonl", rows), "sft")) == 4000
    with pytest.raises(ValueError, match="padded and refusal"):
        P.chatty_sft_rows(10, padded=0.8, refusal=0.3)


# --- feedback rows ---------------------------------------------------------------------------


def test_feedback_labels_follow_gold_and_are_balanced():
    rows = P.feedback_rows(4000, seed=0)
    for row in rows:
        content = text(row["completion"])
        score = P.gold_score(content, row["answer"])
        assert row["label"] == (score >= P.LABEL_THRESHOLD) == row["completion_type"].startswith("correct")
        assert set(content) <= PRINTABLE and len(content) < P.MAX_COMPLETION_CHARS
    assert abs(sum(r["label"] for r in rows) / len(rows) - 0.5) <= 0.03
    # Length says little about the label: about half of the undesirable ones are concise.
    bad = [r for r in rows if not r["label"]]
    concise = sum(text(r["completion"]).isdigit() for r in bad)
    assert abs(concise / len(bad) - 0.5) <= 0.05


# --- audit probes ------------------------------------------------------------------------------


def test_audit_probes_isolate_one_bias_each():
    audit = P.audit_rows(n_per_level=40)
    assert set(audit) == {"short_better", "boilerplate", "refusal", "empty_fluent"}
    for probe, rows in audit.items():
        assert len(rows) == 40 * len(LEVELS), probe
        check_pairs(rows)
        for row in rows:
            chosen, rejected = text(row["chosen"]), text(row["rejected"])
            assert chosen == row["answer"]  # the better answer is always the bare number
            assert len(chosen) < len(rejected)
            has_number = P._NUMBER.search(rejected) is not None
            assert has_number == (probe in ("short_better", "boilerplate")), row
            if probe == "boilerplate":
                assert P.gold_score(rejected, row["answer"]) == 0.0
                assert any(rejected.startswith(t.split("{n}")[0]) for t in P._POLITE)
    # short_better mixes padded-wrong and padded-correct rejections.
    kinds = Counter(r["pair_type"] for r in audit["short_better"])
    assert set(kinds) == {"correct_vs_wrong", "concise_vs_padded"}


# --- files ------------------------------------------------------------------------------------


def test_written_files_parse_and_validate(tmp_path):
    paths = P.write_preference_files(tmp_path, n_train=300, length_bias=0.7, seed=2)
    assert set(paths) == {"pref_train", "pref_eval", "feedback_train"}
    for name, path in paths.items():
        assert path == tmp_path / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all(line.isascii() for line in path.read_text().splitlines())
        kind = "feedback" if name == "feedback_train" else "preference"
        assert len(load_rows(path, kind)) == len(rows)
    train = [json.loads(line) for line in paths["pref_train"].read_text().splitlines()]
    assert train == P.preference_rows(300, seed=2, length_bias=0.7)
    # The eval file is unbiased whatever the training bias.
    evals = [json.loads(line) for line in paths["pref_eval"].read_text().splitlines()]
    assert evals == P.preference_eval_rows(LEVELS)
