"""Regression gates: each kind of bound passing and failing, unreadable metrics failing, the
tolerance at the exact threshold, file errors, and the CLI's exit codes (0 pass, 1 fail, 2 misuse)."""

import json

import pytest

from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.eval.gates import Gate, check_gate, check_gates, format_gates, load_gates, run_gates

BASE = {"pass@1": 0.50, "accuracy": 0.30, "over_refusal_rate": 0.10, "refusal_rate": 0.95, "win_rate": 0.5}


def eval_json(tmp_path, name, metrics):
    path = tmp_path / name
    path.write_text(json.dumps({"suite": "s", "metrics": metrics}))
    return path


@pytest.mark.parametrize(
    "gate, current, passed, reason",
    [
        ({"metric": "pass@1", "max_drop": 0.01}, {"pass@1": 0.495}, True, ""),
        ({"metric": "pass@1", "max_drop": 0.01}, {"pass@1": 0.70}, True, ""),  # a rise never fails max_drop
        ({"metric": "pass@1", "max_drop": 0.01}, {"pass@1": 0.48}, False, "dropped 0.02 > 0.01"),
        (
            {"metric": "accuracy", "max_drop": 0.01},
            {"accuracy": 0.29},
            True,
            "",
        ),  # 0.30 - 0.29 = 0.01000...02
        ({"metric": "over_refusal_rate", "max_rise": 0.0}, {"over_refusal_rate": 0.10}, True, ""),
        (
            {"metric": "over_refusal_rate", "max_rise": 0.0},
            {"over_refusal_rate": 0.12},
            False,
            "rose 0.02 > 0",
        ),
        ({"metric": "over_refusal_rate", "max_rise": 0.0}, {"over_refusal_rate": 0.0}, True, ""),
        ({"metric": "refusal_rate", "min": 0.9}, {"refusal_rate": 0.85}, False, "0.85 < min 0.9"),
        ({"metric": "refusal_rate", "min": 0.9}, {"refusal_rate": 0.9}, True, ""),
        ({"metric": "win_rate", "max": 0.6}, {"win_rate": 0.61}, False, "0.61 > max 0.6"),
        (
            {"metric": "pass@1", "max_drop": 0.05, "min": 0.6},
            {"pass@1": 0.40},
            False,
            "dropped 0.1 > 0.05; 0.4 < min 0.6",
        ),
        ({"metric": "pass@4", "min": 0.1}, {"pass@1": 0.5}, False, "missing in current"),
        ({"metric": "pass@1", "min": 0.1}, {"pass@1": None}, False, "not a number (None)"),
        ({"metric": "pass@1", "min": 0.1}, {"pass@1": float("nan")}, False, "not a number (nan)"),
        ({"metric": "reward/mean", "max_drop": 0.1}, {"reward/mean": 1.0}, False, "missing in baseline"),
    ],
)
def test_gate_cases(gate, current, passed, reason):
    result = check_gate(Gate(**gate), current, BASE)
    assert result.passed is passed
    assert result.reason == reason


def test_relative_gates_need_a_baseline_absolute_ones_do_not():
    gates = [Gate(metric="pass@1", max_drop=0.0), Gate(metric="refusal_rate", min=0.5)]
    with pytest.raises(ConfigError, match=r"\['pass@1'\] use max_drop / max_rise, which need a baseline"):
        check_gates(gates, BASE)
    assert check_gates(gates[1:], BASE)[0].passed


def test_gates_file_forms_and_errors(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- {metric: pass@1, max_drop: 0.01}\n- {metric: over_refusal_rate, max_rise: 0.0}\n")
    mapped = tmp_path / "map.yaml"
    mapped.write_text(
        "gates:\n  - metric: pass@1\n    max_drop: 0.01\n  - {metric: over_refusal_rate, max_rise: 0}\n"
    )
    assert load_gates(listed) == load_gates(mapped)
    cases = {
        "- {metric: pass@1, max_dorp: 0.01}\n": "unknown key 'gates[0].max_dorp'; did you mean 'gates[0].max_drop'?",
        "- {metric: pass@1}\n": "gate on 'pass@1' has no bound",
        "- {metric: pass@1, max_drop: -0.01}\n": "gates[0].max_drop",
        "- {max_drop: 0.01}\n": "missing required key 'gates[0].metric'",
        "[]\n": "gates",
        "gates: {metric: pass@1}\n": "gates",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"g{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_gates(path)
        assert str(path) in str(error.value) and expected in str(error.value), str(error.value)


def test_table_lists_every_gate(tmp_path):
    gates = tmp_path / "g.yaml"
    gates.write_text("- {metric: pass@1, max_drop: 0.01}\n- {metric: refusal_rate, min: 0.99}\n")
    results, ok = run_gates(gates, {"pass@1": 0.52, "refusal_rate": 0.95}, BASE)
    table = format_gates(results)
    assert not ok
    assert "pass@1" in table and "+0.0200" in table and "pass" in table
    assert "FAIL (0.95 < min 0.99)" in table and "1 passed, 1 failed" in table


def test_cli_exit_codes(tmp_path, capsys):
    base = eval_json(tmp_path, "base.json", BASE)
    good = eval_json(tmp_path, "good.json", {**BASE, "pass@1": 0.50, "over_refusal_rate": 0.05})
    worse = eval_json(tmp_path, "worse.json", {**BASE, "pass@1": 0.45, "over_refusal_rate": 0.05})
    gates = tmp_path / "gates.yaml"
    gates.write_text("- {metric: pass@1, max_drop: 0.01}\n- {metric: over_refusal_rate, max_rise: 0.0}\n")

    def run(*args):
        code = main(["eval", "gates", *args])
        return code, capsys.readouterr()

    code, out = run("--current", str(good), "--baseline", str(base), "--gates", str(gates))
    assert code == 0 and "2 passed, 0 failed" in out.out
    code, out = run("--current", str(worse), "--baseline", str(base), "--gates", str(gates))
    assert code == 1 and "FAIL (dropped 0.05 > 0.01)" in out.out and "1 passed, 1 failed" in out.out
    code, out = run("--current", str(worse), "--gates", str(gates))  # relative gates, no baseline
    assert code == 2 and "need a baseline" in out.err
    code, out = run("--current", str(tmp_path / "none.json"), "--baseline", str(base), "--gates", str(gates))
    assert code == 2 and "eval results not found" in out.err
    (tmp_path / "bad.json").write_text('{"suite": "s"}')
    code, out = run("--current", str(tmp_path / "bad.json"), "--baseline", str(base), "--gates", str(gates))
    assert code == 2 and "no 'metrics' mapping" in out.err
    with pytest.raises(SystemExit):  # --gates is required
        main(["eval", "gates", "--current", str(good)])
