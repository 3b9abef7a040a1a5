"""A misspelt gate metric is a config error (exit 2) with the name meant, found before anything is
generated or trained, not a failed gate (exit 1) after the work."""

import json

import pytest

import posttrain.eval.evaluate
import posttrain.train
from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.eval.gates import suite_metric_names
from posttrain.eval.suite import load_suite
from posttrain.pipeline import run_pipeline


def test_eval_gates_with_a_typo_exits_2_with_a_suggestion(tmp_path, capsys):
    current = tmp_path / "eval.json"
    current.write_text(json.dumps({"metrics": {"pass@1": 0.5, "accuracy": 0.4}}))
    gates = tmp_path / "gates.yaml"
    gates.write_text("- {metric: accuracy, min: 0.1}\n- {metric: pass@l, min: 0.1}\n")
    assert main(["eval", "gates", "--current", str(current), "--gates", str(gates)]) == 2
    err = capsys.readouterr().err
    assert f"{gates}: gate 2: unknown gate metric: 'pass@l'. Did you mean pass@1?" in err


def test_eval_run_checks_gate_names_against_the_suite_before_generating(tmp_path, capsys, monkeypatch):
    def generate(*a, **k):
        raise AssertionError("generated before the gates were checked")

    monkeypatch.setattr(posttrain.eval.evaluate, "run_suite", generate)
    gates = tmp_path / "gates.yaml"
    gates.write_text("- {metric: acuracy, min: 0.1}\n")
    assert main(["eval", "run", "arithmetic", "--model", str(tmp_path / "m"), "--gates", str(gates)]) == 2
    assert "unknown gate metric: 'acuracy'. Did you mean accuracy?" in capsys.readouterr().err
    gates.write_text("- {metric: win_rate, min: 0.5}\n")  # only with --against
    assert main(["eval", "run", "arithmetic", "--model", str(tmp_path / "m"), "--gates", str(gates)]) == 2
    with pytest.raises(AssertionError, match="generated before"):  # a right name gets to generation
        main(["eval", "run", "arithmetic", "--model", "m", "--against", "b", "--gates", str(gates)])


def test_suite_metric_names_are_what_the_suite_writes():
    names = suite_metric_names(load_suite("arithmetic"))
    assert {"accuracy", "pass@1", "reward/mean", "completion_length/mean"} <= names
    assert "completion_length/truncated_share" in names and "win_rate" not in names
    assert "refusal_rate" in suite_metric_names(load_suite("harmful"))


def test_a_pipeline_with_a_misspelt_gate_fails_before_any_stage_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(posttrain.train, "train", lambda cfg, **kw: calls.append(cfg))
    gates = tmp_path / "gates.yaml"
    gates.write_text("- {metric: pass@1, min: 0.1}\n- {metric: over_refusal, max: 0.1}\n")
    spec = {
        "out": str(tmp_path / "pipe"),
        "stages": {
            "sft": {"algorithm": "sft", "model": {"path": "m"}, "data": {"train": "d.jsonl"}},
            "ev": {"kind": "eval", "suite": "arithmetic", "model": "${sft.final}"},
            "g": {"kind": "gates", "gates": str(gates), "current": "${ev.eval}"},
        },
    }
    with pytest.raises(ConfigError, match="stage 'g'.*gate 2: unknown gate metric: 'over_refusal'"):
        run_pipeline(spec, cards=False)
    assert calls == []
