"""Audit trail: lineage of a pipeline's final model reaches every data file of every stage with its
sha256; the model card carries the eval numbers, held-out metrics and alerts of the run it describes;
data cards; the card and lineage commands."""

import argparse
import json

import pytest
import yaml

from posttrain.audit import data_card, eval_metrics, key_hyperparameters, lineage, model_card
from posttrain.audit.hashes import sha256_file
from posttrain.audit.model_card import _num
from posttrain.cli import audit as audit_cli
from posttrain.errors import ConfigError
from posttrain.pipeline import run_pipeline
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """data -> first (sft) -> second (sft) -> eval, on the tiny model; every stage 2 steps. Returns the
    root and the data files {name: path} the training stages read."""
    root = tmp_path_factory.mktemp("audit")
    build_tiny(root / "tiny", size="tiny")
    files = {  # files of our own; the data stage also writes the bundled task (sft_train, ...)
        "sft_b": write_jsonl(root / "sft_b.jsonl", arithmetic.sft_rows(30, seed=1, levels=("add1",))),
        "held_out": write_jsonl(root / "held_out.jsonl", arithmetic.sft_rows(12, seed=2, levels=("add1",))),
        "prompts": write_jsonl(root / "prompts.jsonl", arithmetic.eval_rows(("add1",), n_per_level=4)),
    }
    suite = root / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "tiny_suite",
                "dataset": {"path": str(files["prompts"])},
                "generation": {"n": 2, "temperature": 1.0, "max_new_tokens": 4},
                "scorers": ["exact_match"],
                "pass_k": [1, 2],
            }
        )
    )
    loud = {"rules": [{"rule": "threshold", "name": "loss_is_high", "metric": "loss", "above": 0.0}]}
    spec = {
        "out": str(root / "runs"),
        "intended_use": "Testing the audit trail only.",
        "limitations": ["Knows one-digit sums at best."],
        "defaults": {
            "train": {"batch_size": 4, "max_steps": 2, "progress": False, "tensorboard": False},
            "monitor": loud,
        },
        "stages": {
            "data": {
                "kind": "data",
                "bundled": ["arithmetic"],
                "rows": 40,
                "levels": ["add1"],
                "files": {k: str(v) for k, v in files.items()},
            },
            "first": {
                "algorithm": "sft",
                "model": {"path": str(root / "tiny")},
                "data": {"train": "${data.sft_train}", "max_length": 48},
            },
            "second": {
                "algorithm": "sft",
                "model": {"path": "${first.final}"},
                "data": {"train": "${data.sft_b}", "eval": "${data.held_out}", "max_length": 48},
                "train": {"eval_every": 2, "lr": 3e-4},
            },
            "eval": {"kind": "eval", "suite": str(suite), "model": "${second.final}"},
        },
    }
    run_pipeline(spec)
    files["sft_a"] = root / "runs" / "data" / "sft_train.jsonl"  # written by the data stage
    return root, files


def test_lineage_reaches_every_data_file_of_every_stage(pipe):
    root, files = pipe
    tree = lineage(root / "runs" / "second" / "final")  # a model directory: its run is found
    # first read a file written inside the data stage's run: data is its parent. second read files
    # from outside any run: their hashes are in its own manifest.
    assert [n.name for n in tree.walk()] == ["data", "first", "second"]
    everything = tree.all_inputs()
    for path in files.values():
        assert everything[str(path)] == sha256_file(path)
    assert {"sft_train.jsonl", "pretrain.jsonl", "eval.jsonl"} <= {p.split("/")[-1] for p in everything}
    by_name = {n.name: n for n in tree.walk()}
    assert set(by_name["first"].data_inputs()) == {str(files["sft_a"])}
    assert set(by_name["second"].data_inputs()) == {str(files["sft_b"]), str(files["held_out"])}
    assert all("/first/final/" in p for p in by_name["second"].model_inputs())  # the model it started from
    assert by_name["first"].config["train"]["max_steps"] == 2 and by_name["data"].algorithm == "data"
    assert [p.name for p in tree.parents] == ["first"] and not tree.missing
    assert [p.name for p in by_name["first"].parents] == ["data"]
    tree_dict = tree.to_dict()
    assert tree_dict["parents"][0]["inputs"] and json.dumps(tree_dict)


def test_model_card_has_eval_numbers_held_out_metrics_and_alerts(pipe):
    root, files = pipe
    run = root / "runs" / "second"
    card = (run / "MODEL_CARD.md").read_text()  # written by the pipeline at its end
    report = json.loads((root / "runs" / "eval" / "eval.json").read_text())
    assert "### tiny_suite" in card
    for name in ("pass@2", "completion_length/mean"):
        assert f"| {name} | {_num(report['metrics'][name])} |" in card
    low, high = report["intervals"]["pass@1"]
    assert f"| pass@1 | {_num(report['metrics']['pass@1'])} | {_num(low)} | {_num(high)} |" in card
    last_eval = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r
    ]
    assert f"| eval/loss | {_num(last_eval[-1]['eval/loss'])} |" in card
    assert "loss_is_high" in card and "| first | 1 | loss_is_high | warn |" in card
    for path in (files["sft_a"], files["sft_b"]):
        assert f"| {path} | {sha256_file(path)} | " in card
    assert "Testing the audit trail only." in card and "Knows one-digit sums at best." in card
    assert "| train.lr | 0.0003 |" in card and "### 3. second (sft)" in card
    # the card of a run with no eval, on request, elsewhere
    other = model_card(root / "runs" / "first", out=root / "first.md", intended_use="X.", hash_weights=False)
    text = other.read_text()
    assert "## Intended use\n\nX." in text and "No eval.json found" in text and "Files of final/" not in text


def test_eval_json_shapes(tmp_path):
    suite = {"metrics": {"pass@1": 0.5, "len": 3}, "intervals": {"pass@1": [0.25, 0.75]}}
    assert eval_metrics(suite) == [("pass@1", 0.5, 0.25, 0.75), ("len", 3, None, None)]
    generic = {"accuracy": 0.8125, "win_rate": {"value": 0.6, "low": 0.55, "high": 0.65}, "note": "x"}
    assert eval_metrics(generic) == [("accuracy", 0.8125, None, None), ("win_rate", 0.6, 0.55, 0.65)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"algorithm": "dpo", "inputs": {}, "parents": []}))
    (run / "eval.json").write_text(json.dumps(generic))
    (run / "alerts.jsonl").write_text(
        json.dumps({"step": 7, "rule": "kl_spike", "action": "stop", "message": "m|n"}) + "\n"
    )
    card = model_card(run).read_text()
    assert "| accuracy | 0.8125 | - | - |" in card and "| win_rate | 0.6 | 0.55 | 0.65 |" in card
    assert "| run | 7 | kl_spike | stop | m\\|n |" in card and "kl_spike (1)" in card
    with pytest.raises(ConfigError, match="no manifest.json"):
        model_card(tmp_path)


def test_key_hyperparameters_by_family():
    dpo = {
        "algorithm": "dpo",
        "train": {"lr": 1e-6, "max_steps": 3, "epochs": 1.0},
        "dpo": {"beta": 0.1, "sft_weight": 0},
    }
    assert key_hyperparameters(dpo) == {"train.lr": 1e-6, "train.max_steps": 3, "dpo.beta": 0.1}
    grpo = {"algorithm": "grpo", "rl": {"kl_coef": 0.0, "advantage": "group"}, "rollout": {"group_size": 8}}
    assert key_hyperparameters(grpo) == {"rl.kl_coef": 0.0, "rl.advantage": "group", "rollout.group_size": 8}


def test_data_card(tmp_path):
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}] * 5)
    path = data_card(
        data,
        sources=[str(source), {"name": "hub/set", "url": "https://example.org/set", "rows": 100}],
        filters=[("dedup", 1), {"name": "length", "removed": 1, "description": "over 512 tokens"}],
        protocol="judge",
        generator="runs/sft/final",
        judge={"model": "runs/judge/final", "rubric": "default"},
        extra={"temperature": 1.0},
    )
    card = path.read_text()
    assert path == tmp_path / "DATA_CARD.md"
    assert f"| {data} | {sha256_file(data)} |" in card and "- **rows**: 3" in card
    assert "preference (3)" in card and "chosen (3)" in card
    assert (
        f"| {source} | {sha256_file(source)} | 5 |" in card
        and "| hub/set | - | 100 | https://example.org/set |" in card
    )
    assert (
        "| dedup | 5 | 1 | 20.0% | 4 |" in card and "| length | 4 | 1 | 25.0% | 3 | over 512 tokens |" in card
    )
    assert "**judge**" in card and "runs/judge/final" in card and "| temperature | 1.0 |" in card
    with pytest.raises(ConfigError, match="protocol must be one of"):
        data_card(data, sources=[], protocol="crowd")
    with pytest.raises(ConfigError, match="rows removed"):
        data_card(data, sources=[], filters=[("dedup", -1)], protocol="human")


def test_card_and_lineage_commands(pipe, capsys):
    root, files = pipe
    parser = argparse.ArgumentParser()
    audit_cli.add_parsers(parser.add_subparsers())
    out = root / "card.md"
    args = parser.parse_args(
        ["card", str(root / "runs" / "second"), "--out", str(out), "--limitation", "L1", "--no-hash"]
    )
    assert args.func(args) == 0 and "- L1" in out.read_text()
    args = parser.parse_args(["lineage", str(root / "runs" / "second")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert sha256_file(files["sft_a"])[:12] in text and "first (sft)" in text
