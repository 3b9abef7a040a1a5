"""The collect commands end to end on CPU: two tiny checkpoints answer the prompts, votes go in, and
every export format is a row shape posttrain's trainers read; DPO trains a few steps on the export, and
its lineage reaches the export and, through it, the checkpoints that wrote the answers."""

import json
import random

import pytest
import yaml

from posttrain.cli import main
from posttrain.collect import queue
from posttrain.collect.ingest import generate_pairs
from posttrain.collect.store import Store
from posttrain.data.io import Location
from posttrain.data.schemas import validate_rows
from posttrain.tasks.tiny import build_tiny


def _run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _vote_all(store, rng):
    names = [r["name"] for r in store.read().execute("SELECT name FROM annotator")]
    uid = {r["name"]: r["id"] for r in store.read().execute("SELECT id, name FROM annotator")}
    for _ in range(40):
        for name in names:
            aid = queue.lease(store, uid[name], rng=rng)
            if aid is None:
                continue
            a = store.read().execute("SELECT swapped FROM assignment WHERE id = ?", (aid,)).fetchone()
            # everyone prefers model a's answers (shown left unless swapped), with some noise
            a_side = "right" if a["swapped"] else "left"
            b_side = "left" if a["swapped"] else "right"
            choice = a_side if rng.random() < 0.8 else rng.choice([b_side, "tie"])
            form = {"choice": choice, "strength": rng.choice(["1", "2"]), "rubric_left_factuality": "4"}
            if rng.random() < 0.15:
                form["edit_left"] = "Edited: 2"
            if rng.random() < 0.1:
                form["flags"] = ["unsafe"]
            queue.submit(store, uid[name], aid, form)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect-models")
    return str(build_tiny(root / "tiny_a", seed=0)), str(build_tiny(root / "tiny_b", seed=1))


def test_generate_vote_export_every_format_and_train_dpo(tmp_path, capsys, models):
    from posttrain.audit.lineage import lineage
    from posttrain.train import train

    cfg = tmp_path / "collect.yaml"
    cfg.write_text(yaml.safe_dump({"required_votes": 2, "gold_rate": 0.0, "guidelines_version": "2026-12"}))
    project = str(tmp_path / "arena")
    assert "rubric default" in _run(capsys, "collect", "init", project, "--config", str(cfg))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(12))
        + '{"prompt": "What is 0 + 0?"}\n'
    )
    assert "12 prompts added, 1 duplicates" in _run(
        capsys, "collect", "prompts", "add", project, str(prompts)
    )
    store = Store(tmp_path / "arena.sqlite")
    assert generate_pairs(store, models[0], models[1], max_new_tokens=6, seed=3) == {"items": 12}
    assert generate_pairs(store, models[0], models[1], max_new_tokens=6) == {"items": 0}  # nothing left to do
    gen = (
        store.read()
        .execute(
            "SELECT m.name, m.path, g.gen_config_json, g.seed FROM generation g JOIN model m ON m.id = g.model_id"
        )
        .fetchall()
    )
    assert {r["name"] for r in gen} == {"tiny_a", "tiny_b"} and all(r["seed"] == 3 for r in gen)
    assert json.loads(gen[0]["gen_config_json"])["max_new_tokens"] == 6
    files = json.loads(
        store.read().execute("SELECT meta_json FROM model WHERE name = 'tiny_a'").fetchone()[0]
    )["files"]
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)
    for name in ("ann", "bob", "cy"):
        link = _run(
            capsys, "collect", "annotator", "add", project, name, "--base-url", "http://127.0.0.1:9000/"
        )
        assert link.startswith(f"{name} (annotator): http://127.0.0.1:9000/login?token=")
    _vote_all(store, random.Random(0))
    status = json.loads(_run(capsys, "collect", "status", project, "--json"))
    assert status["votes"] == 24 and status["complete"] == 12
    report = json.loads(_run(capsys, "collect", "agreement", project, "--json"))
    assert report["questions"]["choice"]["items"] == 12
    board = json.loads(_run(capsys, "collect", "leaderboard", project, "--json", "--rounds", "30"))
    assert board["rows"][0]["model"] == "tiny_a" and board["n_battles"] == 24
    assert "tiny_a" in _run(capsys, "collect", "leaderboard", project, "--rounds", "20", "--length-control")

    kinds = {"dpo": "preference", "rm": "preference", "kto": "feedback", "sft": "sft", "eval": "prompt"}
    for fmt in ("dpo", "rm", "kto", "sft", "eval", "redteam"):
        out = tmp_path / fmt / "data.jsonl"
        printed = _run(capsys, "collect", "export", project, "--format", fmt, "--out", str(out))
        assert "rows ->" in printed, printed
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        if fmt in kinds:
            validate_rows([(Location(str(out), i, i + 1), r) for i, r in enumerate(rows)], kinds[fmt])
        assert all(r["meta"]["db_sha256"] and r["meta"].get("project") == "arena" for r in rows)
        assert (tmp_path / fmt / "DATA_CARD.md").is_file() and (tmp_path / fmt / "manifest.json").is_file()
    dpo = [json.loads(line) for line in (tmp_path / "dpo" / "data.jsonl").read_text().splitlines()]
    votes = [r for r in dpo if r["meta"]["source"] == "vote"]
    assert votes and all(
        r["meta"]["n_votes"] == 2 and r["meta"]["models"]["a"]["name"] == "tiny_a" for r in votes
    )
    assert all(
        len(v["annotator"]) == 16 and v["annotator"] not in ("ann", "bob", "cy")
        for r in votes
        for v in r["meta"]["votes"]
    )
    assert sum(r["meta"]["decision"] == "a" for r in votes) > len(votes) / 2
    card = (tmp_path / "dpo" / "DATA_CARD.md").read_text()
    assert "**human**" in card and "no_preference" in card or "tie" in card
    # filters remove what they must, and say how many
    from posttrain.collect.agreement import responses
    from posttrain.collect.export import build_rows

    choices = {}
    for v in responses(store):
        choices.setdefault(v["item_id"], set()).add(v["choice"])
    split = sum(len(c) > 1 for c in choices.values())
    rows, removed = build_rows(store, "dpo", min_votes=2, min_agreement=1.0)
    assert dict(removed)["min_agreement"] == split and all(r["meta"]["agreement"] == 1.0 for r in rows)
    cy = store.annotator_hash(
        store.read().execute("SELECT id FROM annotator WHERE name = 'cy'").fetchone()[0]
    )
    rows, removed = build_rows(store, "dpo", exclude_annotators=("cy",))
    assert dict(removed)["exclude_annotators (votes)"] == 8
    assert all(v["annotator"] != cy for r in rows for v in r["meta"]["votes"])
    weighted, _ = build_rows(store, "dpo", weighting="gold")  # no gold answered: every weight is 1/2
    assert {v["weight"] for r in weighted for v in r["meta"]["votes"]} == {0.5}

    run = train({
        "algorithm": "dpo", "out": str(tmp_path / "dpo_run"), "model": {"path": models[0]},
        "data": {"train": str(tmp_path / "dpo" / "data.jsonl"), "max_length": 64},
        "train": {"lr": 1e-4, "batch_size": 4, "max_steps": 3, "progress": False, "tensorboard": False},
    })  # fmt: skip
    assert run.final is not None and run.step == 3
    names = {node.run_dir.name for node in lineage(tmp_path / "dpo_run").walk()}
    assert "dpo" in names  # the export directory is a parent of the training run
    events = [r["action"] for r in store.read().execute("SELECT action FROM event")]
    assert events.count("export") == 6 and "generate" in events and events.count("grant") == 3


def test_the_example_config_and_bad_configs(tmp_path, capsys):
    assert "rubric default" in _run(
        capsys, "collect", "init", str(tmp_path / "ex"), "--config", "examples/collect.yaml"
    )
    assert Store(tmp_path / "ex.sqlite").config["required_votes"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("required_vote: 2\n")
    assert main(["collect", "init", str(tmp_path / "bad"), "--config", str(bad)]) == 2
    assert "required_vote: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["collect", "status", str(tmp_path / "missing")]) == 2
    assert "no project database" in capsys.readouterr().err
