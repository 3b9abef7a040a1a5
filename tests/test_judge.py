"""LLM-as-judge: the output parser on a table of well-formed and malformed outputs, position-swap
consistency with stub judges whose bias is known, agreement (kappa) with labelled files, the
reward fn, and a real (random, so garbage-speaking) tiny model as the judge.
"""

import json
import re

import pytest

from posttrain.data.templates import encode_prompts
from posttrain.errors import ConfigError, DataError
from posttrain.eval.evaluate import evaluate
from posttrain.eval.judge import (
    Judge,
    JudgeRewardFn,
    agreement,
    judge,
    load_rubric,
    pairwise_win_rate,
    parse_scores,
    parse_verdict,
)
from posttrain.eval.metrics import cohen_kappa
from posttrain.eval.suite import load_suite
from posttrain.rollout.engine import Completion
from posttrain.tasks.tiny import build_tiny, build_tokenizer

RUBRIC = load_rubric("default")
ONE = load_rubric({"name": "one", "dimensions": [{"name": "overall", "description": "Good."}]})
ALL4 = {"factuality": 4, "instruction_following": 5, "completeness": 3, "safety": 5}


# --------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"factuality": 4, "instruction_following": 5, "completeness": 3, "safety": 5}', ALL4),
        (
            'Here: {"scores": {"Factuality": "4", "instruction following": 5, "completeness": 3, "safety": 5}}.',
            ALL4,
        ),
        ("**Factuality**: 4\n- Instruction following: 5/5\nCompleteness (1-5): 3\nsafety = 5", ALL4),
        (
            "factuality: 2\ninstruction_following: 5\ncompleteness: 3\nsafety: 5\nOn reflection:\nfactuality: 4",
            ALL4,
        ),
        ("Factuality score: 4\nInstruction-following: 5\nCompleteness: 3\nSafety: 5 (no issues)", ALL4),
        (
            "factuality: 7\ninstruction_following: 5\ncompleteness: 3\nsafety: 5",
            "factuality: out of range [1, 5] (7)",
        ),
        ("factuality: 0\ninstruction_following: 5\ncompleteness: 3\nsafety: 5", "out of range"),
        ("factuality: 4\ninstruction_following: 5\nsafety: 5", "completeness: missing"),
        ("factuality: 3.5\ninstruction_following: 5\ncompleteness: 3\nsafety: 5", "not a whole number"),
        (
            '{"factuality": "four", "instruction_following": 5, "completeness": 3, "safety": 5}',
            "not a number",
        ),
        ('{"factuality": true, "instruction_following": 5, "completeness": 3, "safety": 5}', "not a number"),
        ("{factuality: 4", "instruction_following: missing"),  # broken JSON: read as lines
        ("factuality: <score 1-5>\ninstruction_following: <score 1-5>", "no scores found"),  # echoed format
        ("The answer is good. 10/10 would read again.", "no scores found"),
        ("\x00\x01 }{ [[ ]] ::: 5", "no scores found"),
        ("", "empty output"),
        ("   \n", "empty output"),
        (None, "empty output"),
    ],
)
def test_parse_scores(text, expected):
    scores, error = parse_scores(text, RUBRIC)
    if isinstance(expected, dict):
        assert (scores, error) == (expected, None)
    else:
        assert scores is None and expected in error


@pytest.mark.parametrize(
    "text, expected",
    [("Rating: [[4]]", {"overall": 4}), ("overall: 2", {"overall": 2}), ("[[9]]", None), ("[[x]]", None)],
)
def test_parse_scores_single_dimension(text, expected):
    assert parse_scores(text, ONE)[0] == expected


@pytest.mark.parametrize(
    "text, verdict, error",
    [
        ("B is wrong. [[A]]", "A", None),
        ("verdict: [[ b ]]", "B", None),
        ("[[tie]]", "tie", None),
        ("[[C]]", "tie", None),  # MT-Bench's tie
        ("[[A]] ... so, again, [[A]]", "A", None),
        ('{"verdict": "B", "reason": "shorter"}', "B", None),
        ('{"winner": "tie"}', "tie", None),
        ('[[A]] if A is better, [[B]] if B is better, "[[tie]]"', None, "conflicting verdicts"),
        ("Answer A is better.", None, "no verdict"),
        ("[[D]]", None, "no verdict"),
        ('{"verdict": "neither"}', None, "no verdict"),
        ("", None, "empty output"),
        (None, None, "empty output"),
    ],
)
def test_parse_verdict(text, verdict, error):
    got, why = parse_verdict(text)
    assert got == verdict
    assert (why is None) if error is None else (error in why)


# --------------------------------------------------------------------------------------- rubrics


def test_rubric_errors_name_file_and_key(tmp_path):
    assert [d.name for d in RUBRIC.dimensions] == [
        "factuality",
        "instruction_following",
        "completeness",
        "safety",
    ]
    cases = {
        "name: r\ndimensions: [{name: a, description: x, wieght: 2}]\n": "did you mean 'dimensions[0].weight'?",
        "name: r\nscale: [5, 1]\ndimensions: [{name: a, description: x}]\n": "lowest < highest",
        "name: r\ndimensions: [{name: a, description: x}, {name: A, description: y}]\n": "must be unique",
        "name: r\ndimensions: []\n": "dimensions",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_rubric(path)
        assert str(path) in str(error.value) and expected in str(error.value)
    with pytest.raises(ConfigError, match="rubric not found"):
        load_rubric("nonexistent")


def test_prompt_templates_keep_foreign_braces():
    rubric = load_rubric(
        {
            "dimensions": [{"name": "ok", "description": "fine"}],
            "pointwise_prompt": 'Q={question} A={answer} {"ok": N} scale {min}-{max}',
        }
    )
    assert rubric.pointwise_text("2+2", "4") == 'Q=2+2 A=4 {"ok": N} scale 1-5'
    text = RUBRIC.pairwise_text("q?", "first", "second")
    assert text.index("first") < text.index("second") and "[[tie]]" in text


# --------------------------------------------------------------------------------------- pairwise


def answers_in(prompt: str) -> tuple[str, str]:
    return re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\n", prompt, re.DOTALL).groups()


def prefers_good(prompts):
    """Consistent: picks the answer that says "good", whichever position it is in."""
    out = []
    for p in prompts:
        a, b = answers_in(p)
        out.append("[[A]]" if "good" in a and "good" not in b else "[[B]]" if "good" in b else "[[tie]]")
    return out


PROMPTS = [f"question {i}" for i in range(6)]
GOOD = [f"good answer {i}" for i in range(6)]
BAD = [f"bad answer {i}" for i in range(6)]


def test_a_judge_that_always_picks_position_a_is_all_inconsistent():
    first_position = Judge(lambda prompts: ["The first one. [[A]]"] * len(prompts), RUBRIC)
    report = first_position.pairwise(PROMPTS, GOOD, BAD, inconsistent="tie")
    assert (report.consistent, report.inconsistent, report.failures, report.dropped) == (0, 6, 0, 0)
    assert report.verdicts == ["tie"] * 6
    assert [(r.first, r.swapped) for r in report.results] == [("A", "B")] * 6
    assert pairwise_win_rate(report).rate == 0.5
    dropped = first_position.pairwise(PROMPTS, GOOD, BAD, inconsistent="drop")
    assert (dropped.inconsistent, dropped.dropped, pairwise_win_rate(dropped)) == (6, 6, None)
    assert dropped.verdicts == [None] * 6
    # without swapping the bias is invisible: A "wins" everything
    blind = first_position.pairwise(PROMPTS, BAD, GOOD, swap=False)
    assert pairwise_win_rate(blind).rate == 1.0 and blind.consistent == blind.inconsistent == 0


def test_a_consistent_judge_and_counted_failures():
    report = Judge(prefers_good, RUBRIC).pairwise(PROMPTS, BAD[:3] + GOOD[3:], GOOD[:3] + BAD[3:])
    assert (report.consistent, report.inconsistent, report.failures) == (6, 0, 0)
    assert report.verdicts == ["B"] * 3 + ["A"] * 3
    assert (wr := pairwise_win_rate(report)).rate == 0.5 and (wr.wins, wr.losses) == (3, 3)

    def garbage_when_swapped(prompts):  # A first for the first half of the calls, garbage after
        return ["[[A]]"] * (len(prompts) // 2) + ["\x00 no idea"] * (len(prompts) // 2)

    broken = Judge(garbage_when_swapped, RUBRIC).pairwise(PROMPTS, GOOD, BAD)
    assert (broken.failures, broken.consistent, broken.inconsistent) == (6, 0, 0)
    assert broken.verdicts == [None] * 6 and pairwise_win_rate(broken) is None
    assert "B first: no verdict" in broken.results[0].error
    with pytest.raises(RuntimeError, match="returned 1 outputs for 12"):
        Judge(lambda prompts: ["[[A]]"], RUBRIC).pairwise(PROMPTS, GOOD, BAD)


# --------------------------------------------------------------------------------------- agreement


def test_kappa_against_a_pairwise_labelled_file(tmp_path):
    rows, human = [], []
    for i in range(10):
        good_first = i % 2 == 0
        a, b = (GOOD[i % 6], BAD[i % 6]) if good_first else (BAD[i % 6], GOOD[i % 6])
        label = "A" if good_first else "B"
        if i in (3, 8):  # the humans disagree with the judge on two rows
            label = "tie" if i == 3 else "B"
        rows.append({"prompt": f"q{i}", "completion_a": a, "completion_b": b, "label": label})
        human.append(label)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = agreement(Judge(prefers_good, RUBRIC), path)
    judged = ["A" if i % 2 == 0 else "B" for i in range(10)]
    assert result["mode"] == "pairwise" and result["compared"] == 10 and result["consistent"] == 10
    assert result["agreement"] == pytest.approx(0.8)
    assert result["kappa"] == pytest.approx(cohen_kappa(judged, human, categories=["A", "B", "tie"]))
    assert 0 < result["kappa"] < 1
    # a judge biased to position A agrees with nobody: every pair becomes a tie
    biased = agreement(Judge(lambda ps: ["[[A]]"] * len(ps), RUBRIC), path)
    assert biased["inconsistent"] == 10 and biased["kappa"] <= 0.0


def test_kappa_against_a_pointwise_labelled_file(tmp_path):
    labels = [5, 4, 1, 2, 5, 3]
    rows = [{"prompt": f"q{i}", "completion": f"score {s}", "label": s} for i, s in enumerate(labels)]
    path = tmp_path / "points.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def reads_score(prompts):  # gives every dimension the score the answer names, off by one for 1s
        out = []
        for p in prompts:
            s = int(re.search(r"score (\d)", p).group(1))
            s = 2 if s == 1 else s
            out.append("\n".join(f"{d.name}: {s}" for d in RUBRIC.dimensions))
        return out

    result = agreement(Judge(reads_score, RUBRIC), path)
    judged = [5, 4, 2, 2, 5, 3]
    assert result["mode"] == "pointwise" and result["failures"] == 0
    assert result["kappa"] == pytest.approx(cohen_kappa(judged, labels, categories=[1, 2, 3, 4, 5]))
    assert result["kappa_quadratic"] == pytest.approx(
        cohen_kappa(judged, labels, weights="quadratic", categories=[1, 2, 3, 4, 5])
    )
    assert result["kappa_quadratic"] > result["kappa"]  # the one miss is by a single point

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "q", "completion": "x", "label": 9}\n{"prompt": "q", "label": 3}\n'
        '{"prompt": "q", "completion": "x", "label": 3}\n'
    )
    with pytest.raises(DataError) as error:
        agreement(Judge(reads_score, RUBRIC), bad)
    assert "bad.jsonl:1: field 'label'" in str(error.value) and "bad.jsonl:2: missing field" in str(
        error.value
    )


# --------------------------------------------------------------------------------------- reward fn


def test_judge_reward_fn_maps_scores_to_unit_interval():
    outputs = {
        "perfect": "factuality: 5\ninstruction_following: 5\ncompleteness: 5\nsafety: 5",
        "worst": '{"factuality": 1, "instruction_following": 1, "completeness": 1, "safety": 1}',
        "mixed": "factuality: 5\ninstruction_following: 3\ncompleteness: 3\nsafety: 1",
        "garbage": "lorem ipsum",
    }

    def stub(prompts):
        return [outputs[re.search(r"\[Answer\]\n(\w+)", p).group(1)] for p in prompts]

    fn = JudgeRewardFn(Judge(stub, RUBRIC), on_failure=-1.0)
    scores = fn(["q"] * 4, ["perfect", "worst", "mixed", "garbage"], answer=["ignored"] * 4)
    assert scores == [1.0, 0.0, pytest.approx((3 - 1) / 4), -1.0]
    assert (fn.calls, fn.failures, fn.last_failures) == (4, 1, 1)
    with pytest.raises(ValueError, match="judge model path not found"):
        judge("./no/such/model")


# --------------------------------------------------------------------------------------- tiny model


def test_tiny_model_as_judge_never_crashes(tmp_path):
    model = build_tiny(tmp_path / "judge")
    rubric = tmp_path / "short.yaml"  # the tiny model's context is 256 characters: a short template
    rubric.write_text(
        "name: short\ndimensions: [{name: ok, description: correct}]\n"
        "pointwise_prompt: '{question} {answer} ok:'\npairwise_prompt: '{question} A {answer_a} B {answer_b}'\n"
    )
    suite = load_suite(
        {
            "dataset": {"name": "arithmetic", "levels": ["add1"], "n_per_level": 3},
            "scorers": [
                "exact_match",
                {"name": "judge", "model_path": str(model), "rubric": str(rubric), "max_new_tokens": 6},
            ],
        }
    )
    rows = [row for _, row in suite.rows()]
    tok = build_tokenizer()
    _, ids = encode_prompts(tok, [r["prompt"] for r in rows])
    answers = {tuple(x): row["answer"] for x, row in zip(ids, rows)}

    class Oracle:  # the policy: answers every prompt correctly
        def generate(self, prompt_ids, n, sampling):
            return [[Completion([5], [0.0], answers[tuple(p)], "stop")] * n for p in prompt_ids]

    report = evaluate(suite, Oracle(), tok).report
    metrics = report["metrics"]
    assert metrics["reward/exact_match/mean"] == 1.0
    # a random model's 6 characters are never "ok: N": every judgment fails, scores on_failure = 0
    assert metrics["reward/judge/failure_rate"] == 1.0 and metrics["reward/judge/mean"] == 0.0
    assert any("failure_rate" in w for w in report["warnings"])

    tiny = Judge.from_pretrained(str(model), rubric, max_new_tokens=6)
    report = tiny.pairwise(["1+1"] * 3, ["2", "3", "2"], ["3", "2", "2"])
    assert report.failures + report.consistent + report.inconsistent == 3
    assert all(r.raw and len(r.raw) == 2 for r in report.results)
