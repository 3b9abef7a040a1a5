"""``posttrain replay``: --execute reproduces a deterministic run and names a nondeterministic tool by turn,
--regrade shows a grader regression as episode / old / new, --to-sft / --to-dpo rows keep the policy mask
and pass ``posttrain data validate``."""

from __future__ import annotations

import itertools
import json

import pytest
from replay_toys import Dice

from posttrain.agents import replay
from posttrain.agents.audit import env_audit
from posttrain.agents.config import env_factory
from posttrain.agents.policies import Call, ScriptedPolicy
from posttrain.agents.runner import EpisodeRunner
from posttrain.agents.trajectory import write_jsonl
from posttrain.cli import main
from posttrain.config import dump_config, load_config
from posttrain.tasks.tiny import build_tokenizer

TOK = build_tokenizer()


def count_then_answer(task):
    return [[Call("count", {})], [Call("count", {})], [Call("answer", {"value": task["answer"]})]]


def roll_then_answer(task):
    return [[Call("count", {})], [Call("roll", {})], [Call("answer", {"value": task["answer"]})]]


def wrong(task):
    return [[Call("count", {})], [Call("answer", {"value": "0"})]]


def make_run(tmp_path, *plans, G=2, n=2):
    """A run directory as an agent run leaves it: config.yaml and trajectories.jsonl (step 1)."""
    cfg = load_config(
        {
            "algorithm": "grpo",
            "out": str(tmp_path / "run"),
            "model": {"path": "unused"},
            "env": {"name": "replay_toys:Dice", "tasks": n, "eval_tasks": 0},
            "rollout": {"prompts_per_step": 1, "group_size": G},
        }
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    count = itertools.count()

    def scripts(task):
        plan = plans[next(count) % len(plans)]

        def play(task):
            for turn in plan(task):  # noqa: UP028 — the runner send()s observations
                yield turn

        return play(task)

    eps = EpisodeRunner(TOK).run(
        ScriptedPolicy(TOK, "tiny", scripts), env_factory(cfg.env), Dice.tasks(n), group_size=G
    )
    write_jsonl(run / "trajectories.jsonl", eps, step=1, run_id="run")
    manifest = {"env": env_audit(cfg.env, Dice.tasks(n), [])}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run, eps


def test_execute_reproduces_a_deterministic_run(tmp_path, capsys):
    run, eps = make_run(tmp_path, count_then_answer, wrong)
    results = replay.replay_run(run, progress=False)
    assert len(results) == 4 and not any(r.skipped for r in results)
    assert [r.diffs for r in results] == [[]] * 4
    assert [replay.grade_text(r.grade) for r in results] == ["1 passed", "0 answer.wrong"] * 2
    assert main(["replay", str(run), "--execute"]) == 0
    assert "4 of 4 episodes reproduced every observation and grade" in capsys.readouterr().out


def test_execute_names_the_nondeterministic_tool_and_its_turn(tmp_path, capsys):
    run, eps = make_run(tmp_path, count_then_answer, roll_then_answer)
    results = replay.replay_run(run, progress=False)
    diffs = [d for r in results for d in r.diffs]
    # episodes 1 and 3 rolled at their second assistant turn: turns 0 opening, 1 count, 2 its result,
    # 3 roll, 4 its result
    assert [(d.episode, d.turn, d.what, d.tool) for d in diffs] == [
        ("1/1", 4, "result", "roll"),
        ("1/3", 4, "result", "roll"),
    ]
    assert diffs[0].recorded == eps[1].turns[4].results[0].content != diffs[0].replayed
    assert main(["replay", str(run), "--execute"]) == 1
    out = capsys.readouterr().out
    assert "nondeterministic (or changed) tools: roll" in out and "2 of 4 episodes reproduced" in out


def test_regrade_shows_a_grader_regression_as_episode_old_new(tmp_path, capsys, monkeypatch):
    run, _ = make_run(tmp_path, count_then_answer, wrong)
    assert main(["replay", str(run), "--regrade"]) == 0
    assert "0 of 4 episodes changed grade" in capsys.readouterr().out
    from posttrain.agents.env import Grade

    # a "refactor" of the grader that compares the answer as a number and breaks on the wrong type
    monkeypatch.setattr(Dice, "grade", lambda self: Grade(0.0, False, {}, "answer.wrong"))
    assert main(["replay", str(run), "--regrade"]) == 1
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()]
    assert lines[0] == ["episode", "task", "old", "new", "note"]
    assert lines[1] == ["1/0", "dice/train/0", "1", "passed", "0", "answer.wrong"]
    assert lines[2] == ["1/2", "dice/train/1", "1", "passed", "0", "answer.wrong"]
    assert "2 of 4 episodes changed grade" in out


def test_replay_errors_name_the_file(tmp_path):
    from posttrain.errors import DataError

    with pytest.raises(DataError, match="no trajectories.jsonl"):
        replay.load_records(tmp_path)
    (tmp_path / "trajectories.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(DataError, match=r"trajectories.jsonl:1: not an episode record"):
        replay.load_records(tmp_path)


def test_to_sft_rows_keep_the_policy_mask_validate_and_carry_provenance(tmp_path, capsys):
    from posttrain.data.templates import IGNORE_INDEX, encode_sft_row

    run, eps = make_run(tmp_path, count_then_answer, wrong)
    out = tmp_path / "sft.jsonl"
    assert main(["replay", str(run), "--to-sft", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["provenance"]["episode"] for r in rows] == [0, 2]  # the passed ones
    p = rows[0]["provenance"]
    assert (p["run"], p["step"], p["task_id"], p["grade"]) == (
        "run",
        1,
        "dice/train/0",
        {"reward": 1.0, "passed": True},
    )
    for row, ep in zip(rows, [eps[0], eps[2]]):
        ex = encode_sft_row(row, TOK, max_length=1024)
        ids = ep.prompt_ids + ep.ids
        mask = [False] * len(ep.prompt_ids) + ep.mask
        assert ex.input_ids == ids
        assert ex.targets == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX]
    card = (tmp_path / "sft.DATA_CARD.md").read_text()
    assert "| not passed (or masked) | 4 | 2 |" in card and "| non-canonical sampled tokens | 2 | 0 |" in card
    capsys.readouterr()
    assert main(["data", "validate", str(out), "--kind", "sft"]) == 0


def test_to_dpo_pairs_success_with_failure_on_the_same_task(tmp_path):
    run, eps = make_run(tmp_path, count_then_answer, wrong)
    out = tmp_path / "pairs.jsonl"
    assert main(["replay", str(run), "--to-dpo", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["provenance"]["chosen"]["episode"], r["provenance"]["rejected"]["episode"]) for r in rows] == [
        (0, 1),
        (2, 3),
    ]
    assert all(
        r["provenance"]["chosen"]["task_hash"] == r["provenance"]["rejected"]["task_hash"] for r in rows
    )
    assert rows[0]["prompt"] == eps[0].turns[0].text and '"0"' not in rows[0]["chosen"]
    assert main(["data", "validate", str(out), "--kind", "preference"]) == 0
    assert "environment's tokens" in (tmp_path / "pairs.DATA_CARD.md").read_text()


def test_the_manifest_records_environment_hashes_and_replay_reports_a_changed_source(tmp_path, capsys):
    run, _ = make_run(tmp_path, count_then_answer)
    manifest = json.loads((run / "manifest.json").read_text())
    block = manifest["env"]
    assert set(block["sources"]) == {"tests/replay_toys.py", "posttrain/agents/env.py"}
    assert (
        block["tasks"] == 2
        and len(block["tasks_sha256"]) == 64
        and block["trajectories"] == "trajectories.jsonl"
    )
    assert replay.environment_changes(run) == []
    block["sources"]["tests/replay_toys.py"] = "0" * 64  # as if the grader was edited after the run
    block["all_tasks_sha256"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["replay", str(run), "--execute"]) == 0
    out = capsys.readouterr().out
    assert "environment changed since the run: source changed: tests/replay_toys.py" in out
    assert "the task rows differ" in out


def test_to_sft_output_trains_with_the_sft_algorithm_as_it_is(tmp_path):
    from posttrain.engine.run import read_metrics
    from posttrain.tasks.tiny import build_tiny
    from posttrain.train import train

    run, _ = make_run(tmp_path, count_then_answer, wrong, n=4)
    out = tmp_path / "sft.jsonl"
    assert main(["replay", str(run), "--to-sft", str(out)]) == 0
    model = build_tiny(tmp_path / "tiny", seed=0)
    cfg = {
        "algorithm": "sft",
        "out": str(tmp_path / "sft"),
        "model": {"path": str(model)},
        "data": {"train": str(out), "max_length": 512},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "tensorboard": False},
    }
    res = train(cfg)
    losses = [m["loss"] for m in read_metrics(res.run_dir) if "loss" in m]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    assert losses[-1] < losses[0]  # the same 4 rows thrice: the loss falls


def test_the_trajectories_hash_lands_in_the_manifest_and_the_model_card_line(tmp_path):
    from posttrain.agents.audit import record_trajectories
    from posttrain.audit.hashes import sha256_file
    from posttrain.audit.model_card import env_card_line as card_line

    run, _ = make_run(tmp_path, count_then_answer, wrong)

    class Stub:  # what record_trajectories needs of engine.run.Run
        path, write = run, True

        def update_manifest(self, **fields):
            m = json.loads((run / "manifest.json").read_text())
            (run / "manifest.json").write_text(json.dumps({**m, **fields}))

    record_trajectories(Stub())
    env = json.loads((run / "manifest.json").read_text())["env"]
    assert env["episodes"] == 4 and env["trajectories_sha256"] == sha256_file(run / "trajectories.jsonl")
    line = card_line({"env": env})
    assert (
        line.startswith("replay_toys:Dice v1; 2 tasks (sha256 ")
        and "4 episodes in trajectories.jsonl" in line
    )
    assert "tests/replay_toys.py " in line and card_line({}) is None
