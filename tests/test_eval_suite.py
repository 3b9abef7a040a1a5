"""Eval suites: schema errors, metrics from stub engines whose answers are known, eval.json, and a
real tiny-model run through the CLI.

The stub engines answer from a table keyed by the prompt's token ids, so every metric has an
exact expected value (pass@k from the known number of correct samples per prompt, refusal rates
of an engine that refuses everything).
"""

import json
import random

import numpy as np
import pytest

from posttrain.cli import main
from posttrain.data.templates import encode_prompts
from posttrain.errors import ConfigError, DataError
from posttrain.eval.evaluate import evaluate, format_table, write_results
from posttrain.eval.metrics import pass_at_k, refusal_rates
from posttrain.eval.suite import bundled_suites, load_suite
from posttrain.rollout.engine import Completion
from posttrain.tasks.tiny import build_tiny, build_tokenizer

TOK = build_tokenizer()


def completion(text: str, finish_reason: str = "stop") -> Completion:
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    return Completion(token_ids=ids, logprobs=[0.0] * len(ids), text=text, finish_reason=finish_reason)


class TableEngine:
    """Sample s of prompt p is ``answer(p, s)``; prompts are found by their token ids."""

    def __init__(self, rows, answer):
        _, ids = encode_prompts(TOK, [r["prompt"] for r in rows])
        self.index = {tuple(x): i for i, x in enumerate(ids)}
        self.answer = answer
        self.calls = []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((len(prompt_ids), n, sampling))
        return [[completion(self.answer(self.index[tuple(p)], s)) for s in range(n)] for p in prompt_ids]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dataset: harmful\ngeneraton: {n: 1}\n", "unknown key 'generaton'; did you mean 'generation'?"),
        (
            "dataset: harmful\ngeneration: {max_new_token: 8}\n",
            "did you mean 'generation.max_new_tokens'?",
        ),
        ("dataset: harmful\ngeneration: {n: 4}\n", "greedy samples would all be the same"),
        (
            "dataset: harmful\ngeneration: {n: 2, temperature: 1.0}\npass_k: [1, 4]\n",
            "pass_k [4] needs k in [1, generation.n = 2]",
        ),
        ("dataset: harmful\ngeneration: {temperature: -1}\n", "generation.temperature:"),
        ("dataset: {name: gsm8k}\n", "unknown bundled dataset 'gsm8k'"),
        ("dataset: {name: harmful, levels: [add1]}\n", "apply to the arithmetic dataset only"),
        ("dataset: {name: harmful, path: x.jsonl}\n", "exactly one of 'name'"),
        ("generation: {n: 1}\n", "missing required key 'dataset'"),
        ("dataset: harmful\nscorers: [exact_macth]\n", "scorers[0]: reward 'exact_macth': unknown reward"),
        (
            "dataset: harmful\nscorers: [{name: judge, model_path: ./no/such/judge}]\n",
            "scorers[0]: judge model",
        ),
        ("dataset: harmful\nscorers: [{weight: 2}]\n", "scorers: entry 0 must be a reward name"),
        ("- dataset: harmful\n", "the top level must be a mapping"),
        ("dataset: [unclosed\n", "not valid YAML"),
    ],
)
def test_suite_errors_name_the_file_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, "suite.yaml", text)
    with pytest.raises(ConfigError) as error:
        load_suite(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_data_errors_name_the_row(tmp_path):
    write(tmp_path, "rows.jsonl", '{"prompt": "2+2", "answer": "4"}\n{"prompt": "3+3"}\n')
    suite = load_suite(write(tmp_path, "a.yaml", "dataset: rows.jsonl\nscorers: [exact_match]\n"))
    with pytest.raises(DataError, match=r"scorer 'exact_match' needs the row field 'answer'.*rows.jsonl:2"):
        suite.rows()  # before any generation
    suite = load_suite(write(tmp_path, "b.yaml", "dataset: rows.jsonl\nrefusal: true\n"))
    with pytest.raises(DataError, match=r"field 'harmful'.*2 of 2 rows.*rows.jsonl:1"):
        suite.rows()
    suite = load_suite(write(tmp_path, "c.yaml", "dataset: missing.jsonl\n"))
    with pytest.raises(ConfigError, match="dataset.path: file not found: missing.jsonl"):
        suite.rows()
    with pytest.raises(ConfigError, match="suite not found: .*nope.yaml"):
        load_suite(tmp_path / "nope.yaml")


def test_bundled_suites_ship_and_load():
    assert {"arithmetic", "harmful", "over_refusal"} <= set(bundled_suites())
    harmful = [row for _, row in load_suite("harmful").rows()]
    benign = [row for _, row in load_suite("over_refusal").rows()]
    assert len(harmful) >= 5 and all(row["harmful"] for row in harmful)
    assert len(benign) >= 5 and not any(row["harmful"] for row in benign)
    assert any("kill a Python process" in row["prompt"][0]["content"] for row in benign)


# --------------------------------------------------------------------------------------- metrics


def test_pass_at_k_from_known_correct_counts():
    suite = load_suite(
        {
            "dataset": {"name": "arithmetic", "levels": ["add2"], "n_per_level": 8},
            "generation": {"n": 5, "temperature": 1.0, "max_new_tokens": 4},
            "scorers": ["exact_match"],
            "pass_k": [1, 2, 5],
        }
    )
    rows = [row for _, row in suite.rows()]
    correct = [0, 1, 2, 3, 4, 5, 5, 2]
    engine = TableEngine(rows, lambda p, s: rows[p]["answer"] if s < correct[p] else "wrong")
    metrics = evaluate(suite, engine, TOK).report["metrics"]
    for k in (1, 2, 5):
        assert metrics[f"pass@{k}"] == pytest.approx(np.mean([pass_at_k(5, c, k) for c in correct]))
    assert metrics["accuracy"] == pytest.approx(sum(correct) / 40)
    assert metrics["reward/mean"] == pytest.approx(sum(correct) / 40)
    assert metrics["pass@5"] == pytest.approx(7 / 8)  # every prompt but the one with c = 0
    (n_prompts, n, sampling) = engine.calls[0]
    assert (n_prompts, n, sampling.temperature, sampling.max_new_tokens, sampling.seed) == (8, 5, 1.0, 4, 0)


def test_win_rate_of_identical_models_is_a_half():
    suite = load_suite(
        {
            "dataset": {"name": "arithmetic", "levels": ["add2"], "n_per_level": 200},
            "generation": {"n": 1, "temperature": 1.0},
            "scorers": ["exact_match"],
        }
    )
    rows = [row for _, row in suite.rows()]

    def coin(seed):  # the same model: correct half the time, drawing its own luck
        rng = random.Random(seed)
        return TableEngine(rows, lambda p, s: rows[p]["answer"] if rng.random() < 0.5 else "no")

    report = evaluate(suite, coin(1), TOK, against=(coin(2), TOK), model="a", against_model="b").report
    low, high = report["intervals"]["win_rate"]
    assert abs(report["metrics"]["win_rate"] - 0.5) < 0.08
    assert low < 0.5 < high
    counts = report["counts"]
    assert counts["wins"] + counts["losses"] + counts["ties"] == 200
    assert report["against"]["model"] == "b" and "accuracy" in report["against"]["metrics"]
    assert "win_rate = A (a) over B (b)" in format_table(report)

    always = TableEngine(rows, lambda p, s: rows[p]["answer"])
    never = TableEngine(rows, lambda p, s: "no")
    report = evaluate(suite, always, TOK, against=(never, TOK)).report
    assert report["metrics"]["win_rate"] == 1.0
    with pytest.raises(ConfigError, match="needs scorers"):
        evaluate(load_suite("harmful"), always, TOK, against=(never, TOK))


@pytest.mark.parametrize(
    "text, refusal, over_refusal", [("I can't help with that.", 1.0, 1.0), ("Sure!", 0.0, 0.0)]
)
def test_refusal_suites(text, refusal, over_refusal):
    reports = {}
    for name in ("harmful", "over_refusal"):
        suite = load_suite(name)
        engine = TableEngine([row for _, row in suite.rows()], lambda p, s: text)
        reports[name] = evaluate(suite, engine, TOK).report
    harmful, benign = reports["harmful"], reports["over_refusal"]
    assert harmful["metrics"]["refusal_rate"] == refusal
    assert benign["metrics"]["over_refusal_rate"] == over_refusal
    assert "over_refusal_rate" not in harmful["metrics"] and "refusal_rate" not in benign["metrics"]
    assert harmful["counts"]["benign_prompts"] == 0 and benign["counts"]["harmful_prompts"] == 0


def test_mixed_rows_give_both_rates(tmp_path):
    lines = [{"prompt": f"q{i}", "harmful": i < 3} for i in range(5)]
    write(tmp_path, "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    suite = load_suite(write(tmp_path, "mixed.yaml", "dataset: mixed.jsonl\nrefusal: true\n"))
    rows = [row for _, row in suite.rows()]
    # refuses q0 (harmful) and q4 (benign): refusal 1/3, over-refusal 1/2
    engine = TableEngine(rows, lambda p, s: "I cannot do that." if p in (0, 4) else "Here you go.")
    report = evaluate(suite, engine, TOK).report
    assert report["metrics"]["refusal_rate"] == pytest.approx(1 / 3)
    assert report["metrics"]["over_refusal_rate"] == pytest.approx(1 / 2)
    # with one sample per prompt the intervals are exactly metrics.refusal_rates'
    rates = refusal_rates([i in (0, 4) for i in range(5)], [i < 3 for i in range(5)])
    assert report["intervals"]["refusal_rate"] == [rates.harmful.low, rates.harmful.high]
    assert report["intervals"]["over_refusal_rate"] == [rates.benign.low, rates.benign.high]


def test_eval_json_content(tmp_path):
    suite = load_suite(
        {
            "name": "add1",
            "dataset": {"name": "arithmetic", "levels": ["add1"], "n_per_level": 6},
            "generation": {"n": 2, "temperature": 0.7, "max_new_tokens": 3},
            "scorers": ["exact_match", {"name": "format_regex", "pattern": r"\d+", "weight": 0.0}],
            "pass_k": [1, 2],
        }
    )
    rows = [row for _, row in suite.rows()]
    engine = TableEngine(rows, lambda p, s: rows[p]["answer"] if (p + s) % 3 == 0 else "x")
    path = write_results(evaluate(suite, engine, TOK, model="m"), tmp_path)
    report = json.loads(path.read_text())  # strict JSON: json.loads would accept NaN, the check below not
    assert "NaN" not in path.read_text()
    assert report["suite"] == "add1" and report["model"] == "m" and report["against"] is None
    assert report["scorers"] == ["exact_match", "format_regex"]
    assert report["counts"] == {"prompts": 6, "samples": 12}
    assert report["generation"]["n"] == 2 and report["generation"]["temperature"] == 0.7
    metrics = report["metrics"]
    assert set(metrics) >= {
        "accuracy",
        "pass@1",
        "pass@2",
        "reward/mean",
        "reward/exact_match/mean",
        "reward/format_regex/mean",
        "completion_length/mean",
        "completion_length/truncated_share",
    }
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    assert metrics["accuracy"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    assert metrics["reward/format_regex/mean"] == pytest.approx(
        np.mean([s["completion"] != "x" for s in samples])
    )
    assert metrics["reward/mean"] == metrics["reward/exact_match/mean"]  # weight 0: logged, not scored
    assert metrics["completion_length/mean"] == pytest.approx(np.mean([s["length"] for s in samples]))
    for name, (low, high) in report["intervals"].items():
        assert low <= metrics[name] <= high, name


# --------------------------------------------------------------------------------------- tiny model


def test_tiny_model_end_to_end_through_the_cli(tmp_path, capsys):
    model = build_tiny(tmp_path / "run" / "final")
    suite = write(
        tmp_path,
        "arith.yaml",
        "name: arith\n"
        "dataset: {name: arithmetic, levels: [add1], n_per_level: 4}\n"
        "generation: {n: 2, temperature: 1.0, max_new_tokens: 4}\n"
        "scorers: [exact_match]\n"
        "pass_k: [1, 2]\n",
    )
    gates = write(tmp_path, "gates.yaml", "- {metric: pass@2, min: 0.99}\n")  # a random model fails it
    # the shorthand `eval SUITE.yaml`; no --out: eval.json goes next to the model (the run directory)
    code = main(["eval", str(suite), "--model", str(model), "--against", str(model), "--gates", str(gates)])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "pass@2" in out
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["counts"] == {"prompts": 4, "samples": 8, "wins": 0, "losses": 0, "ties": 8}
    # the same weights with the same sampling seed answer identically: every comparison a tie
    assert report["metrics"]["win_rate"] == 0.5 and report["intervals"]["win_rate"] == [0.5, 0.5]
    assert report["metrics"]["completion_length/max"] <= 4
    assert 0 <= report["metrics"]["pass@2"] < 0.99
    samples = (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 16  # 4 prompts x 2 samples x 2 models
    # the canonical form, with --out, and an input error: exit code 2
    assert main(["eval", "run", str(suite), "--model", str(model), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "eval.json").exists()
    assert main(["eval", "run", str(suite), "--model", str(tmp_path / "nope")]) == 2
