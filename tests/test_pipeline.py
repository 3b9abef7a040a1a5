"""Pipelines: a real three-stage run that fails in its third stage resumes there without re-running the
first two; references that point nowhere fail before anything runs; --until, --only, --fresh, rounds,
resume from checkpoints; the bundled example loads."""

import json
from pathlib import Path

import pytest

import posttrain.train
from posttrain.cli import pipeline as pipeline_cli
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline import (
    MARKER,
    GatesFailed,
    PipelineInterrupted,
    load_pipeline,
    run_pipeline,
)
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import StageResult

EXAMPLE = Path(__file__).parent.parent / "examples" / "pipeline.yaml"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe_task")
    build_tiny(root / "tiny", size="tiny")
    rows = arithmetic.sft_rows(64, seed=0, levels=("add1",))
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def sft(model: str, data: str, **train) -> dict:
    return {
        "algorithm": "sft",
        "model": {"path": model},
        "data": {"train": data, "max_length": 48},
        "train": {"max_steps": 2, **train},
    }


def three_stages(task, out, third_data) -> dict:
    return {
        "out": str(out),
        "defaults": {"train": {"batch_size": 4, "lr": 1e-3, "progress": False, "tensorboard": False}},
        "stages": {
            "first": sft(str(task / "tiny"), str(task / "sft.jsonl")),
            "second": sft("${first.final}", str(task / "sft.jsonl")),
            "third": sft("${second.final}", str(third_data)),
        },
    }


def counting_train(monkeypatch) -> list:
    """Wrap the real train(): record (stage, resume) per call."""
    calls, real = [], posttrain.train.train

    def train(cfg, *, resume=False, **kw):
        calls.append((Path(cfg.out).name, resume))
        return real(cfg, resume=resume, **kw)

    monkeypatch.setattr(posttrain.train, "train", train)
    return calls


def test_failed_pipeline_resumes_at_the_failed_stage(task, tmp_path, monkeypatch):
    calls = counting_train(monkeypatch)
    out, later = tmp_path / "pipe", tmp_path / "later.jsonl"  # the third stage's data: not there yet
    spec = three_stages(task, out, later)
    with pytest.raises(DataError, match="later.jsonl"):
        run_pipeline(spec)
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [state[s]["status"] for s in ("first", "second", "third")] == ["complete", "complete", "failed"]
    assert "DataError" in state["third"]["error"] and state["first"]["finished"]
    weights = {s: out / s / "final" / "model.safetensors" for s in ("first", "second")}
    mtimes = {s: p.stat().st_mtime_ns for s, p in weights.items()}
    assert calls == [("first", False), ("second", False), ("third", False)]

    later.write_text((task / "sft.jsonl").read_text())
    assert run_pipeline(spec) == {"first": "reused", "second": "reused", "third": "ran"}
    assert calls[3:] == [("third", False)]  # the first two did not run again
    assert {s: p.stat().st_mtime_ns for s, p in weights.items()} == mtimes
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert all(state[s]["status"] == "complete" for s in state)
    assert (out / "third" / "final" / "config.json").exists()
    marker = json.loads((out / "third" / MARKER).read_text())
    assert marker["hash"] == state["third"]["hash"]
    manifest = json.loads((out / "third" / "manifest.json").read_text())
    assert str((out / "second").resolve()) in manifest["parents"]  # lineage through the reference
    assert (out / "third" / "MODEL_CARD.md").is_file()


# ------------------------------------------------------------------ orchestration, with a stand-in for train()


@pytest.fixture
def fake_train(monkeypatch):
    """train() that writes final/ instantly; set `fail` / `interrupt` to a stage name to break it."""

    class Fake:
        calls: list = []
        fail = interrupt = None

        def __call__(self, cfg, *, resume=False, **kw):
            name = Path(cfg.out).name
            self.calls.append((name, resume))
            if name == self.fail:
                raise RuntimeError(f"{name} broke")
            run = Path(cfg.out)
            if name == self.interrupt:
                ckpt = run / "checkpoints" / "step-1"
                ckpt.mkdir(parents=True)
                (ckpt / "COMPLETE").write_text("")
                return StageResult(run_dir=run, final=None, step=1, interrupted="SIGTERM")
            (run / "final").mkdir(parents=True, exist_ok=True)
            return StageResult(run_dir=run, final=run / "final", step=cfg.train.max_steps)

    fake = Fake()
    fake.calls = []
    monkeypatch.setattr(posttrain.train, "train", fake)
    return fake


def stages(out, **bodies) -> dict:
    return {"out": str(out), "stages": bodies}


def toy(model="m", **train) -> dict:
    return {"algorithm": "sft", "model": {"path": model}, "data": {"train": "d.jsonl"}, "train": train}


def test_until_only_fresh_and_interrupt(tmp_path, fake_train):
    spec = stages(tmp_path, a=toy(), b=toy("${a.final}"), c=toy("${b.final}"))
    assert run_pipeline(spec, until="b", cards=False) == {"a": "ran", "b": "ran"}
    assert not (tmp_path / "c").exists()
    assert run_pipeline(spec, only="c", cards=False) == {"c": "ran"}
    assert run_pipeline(spec, only="b", fresh=True, cards=False) == {"b": "ran"}
    # b ran again from scratch, so c's final/ predates it but its hash (config + upstream hashes) is
    # unchanged: still reused. Upstream *config* changes are what invalidate downstream stages.
    assert run_pipeline(spec, cards=False) == {"a": "reused", "b": "reused", "c": "reused"}
    assert [c for c, _ in fake_train.calls] == ["a", "b", "c", "b"]

    # a changed config re-runs that stage and everything downstream of it, nothing upstream
    spec["stages"]["b"]["train"] = {"lr": 1e-3}
    assert run_pipeline(spec, cards=False) == {"a": "reused", "b": "ran", "c": "ran"}

    fake_train.interrupt = "c"
    spec["stages"]["c"]["train"] = {"max_steps": 3}
    with pytest.raises(PipelineInterrupted, match="stage 'c' stopped at step 1"):
        run_pipeline(spec, cards=False)
    state = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert state["c"]["status"] == "interrupted"
    fake_train.interrupt = None
    assert run_pipeline(spec, cards=False) == {"a": "reused", "b": "reused", "c": "resumed"}
    assert fake_train.calls[-1] == ("c", True)  # the checkpoint in c/ was continued, not discarded


def test_only_needs_completed_inputs_and_failure_is_recorded(tmp_path, fake_train):
    spec = stages(tmp_path, a=toy(), b=toy("${a.final}"))
    with pytest.raises(ConfigError, match="stage 'b' uses 'a', which has not completed.*--until a"):
        run_pipeline(spec, only="b", cards=False)
    fake_train.fail = "a"
    with pytest.raises(RuntimeError, match="a broke"):
        run_pipeline(spec, cards=False)
    state = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert state["a"]["status"] == "failed" and "a broke" in state["a"]["error"]
    assert state["b"]["status"] == "pending"
    with pytest.raises(ConfigError, match="no stage 'z'"):
        run_pipeline(spec, until="z", cards=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("not the pipeline's")
    with pytest.raises(ConfigError, match="c: not empty and not written by a pipeline"):
        run_pipeline(stages(tmp_path, c=toy()), fresh=True, cards=False)
    assert (tmp_path / "c" / "mine.txt").exists()


def test_rounds_prev_and_round(tmp_path, fake_train):
    spec = stages(
        tmp_path,
        sft=toy(),
        improve={
            "repeat": 3,
            "stages": {
                "gen": toy("${prev.dpo.final|sft.final}", seed="${round}"),
                "dpo": toy("${gen.final}"),
            },
        },
        last=toy("${dpo.final}"),
    )
    pipe = load_pipeline(spec)
    names = [s.name for s in pipe.stages]
    assert names == ["sft", "gen-1", "dpo-1", "gen-2", "dpo-2", "gen-3", "dpo-3", "last"]
    model = {s.name: s.config.model.path for s in pipe.stages}
    assert model["gen-1"] == str(tmp_path / "sft" / "final")
    assert model["gen-2"] == str(tmp_path / "dpo-1" / "final")
    assert model["dpo-3"] == str(tmp_path / "gen-3" / "final")
    assert model["last"] == str(tmp_path / "dpo-3" / "final")
    assert [pipe.stage(f"gen-{r}").config.train.seed for r in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(ConfigError, match="stage 'dpo-1' uses 'gen-1'"):
        run_pipeline(pipe, only="dpo", cards=False)  # every round of dpo; their inputs are not there
    assert list(run_pipeline(pipe, until="improve", cards=False)) == names[:-1]
    assert list(run_pipeline(pipe, only="dpo", cards=False).values()) == ["reused"] * 3


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"b": toy("${nope.final}")},
            "stage 'b', key 'model.path': \\$\\{nope.final\\}: unknown stage 'nope'",
        ),
        ({"b": toy("${c.final}"), "c": toy()}, "stage 'b'.*stage 'c' does not run before this one"),
        ({"b": toy("${a.finale}")}, "stage 'a' \\(train\\) has no 'finale'; did you mean 'final'"),
        ({"b": toy("${a}")}, "write \\$\\{STAGE.ATTR\\}"),
        ({"b": toy("${prev.a.final}")}, "only defined inside a group"),
        ({"b": toy(seed="${round}")}, "\\$\\{round\\} is only defined inside a group"),
        ({"g": {"repeat": 2, "stages": {"x": toy("${prev.x.final}")}}}, "round 1 has no previous 'x'"),
        ({"b": toy("${a.final}", lr=-1)}, "stage 'b': invalid config\n  train.lr"),
        ({"b": {**toy(), "out": "x"}}, "remove 'out'"),
        ({"b": {"kind": "evaluate"}}, "unknown kind 'evaluate'"),
        ({"b": {"kind": "eval", "model": "${a.final}"}}, "invalid eval stage\n  suite: Field required"),
        ({"prev": toy()}, "stage name 'prev'"),
        ({"b-1": toy()}, "stage name 'b-1'"),
    ],
)
def test_bad_references_and_configs_fail_before_anything_runs(tmp_path, fake_train, bad, message):
    spec = stages(tmp_path, a=toy(), **bad)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(spec, cards=False)
    assert fake_train.calls == [] and not (tmp_path / "a").exists()


def test_data_stage_files_and_gates(tmp_path, fake_train, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n')
    current = tmp_path / "eval.json"
    current.write_text(json.dumps({"metrics": {"pass@1": 0.2}}))
    gates = tmp_path / "gates.yaml"
    gates.write_text("- {metric: pass@1, min: 0.5}\n")
    spec = stages(
        tmp_path / "out",
        data={"kind": "data", "files": {"rows": str(rows)}},
        sft={"algorithm": "sft", "model": {"path": "m"}, "data": {"train": "${data.rows}"}},
        gates={"kind": "gates", "gates": str(gates), "current": str(current)},
    )
    with pytest.raises(GatesFailed, match="pass@1"):
        run_pipeline(spec, cards=False)
    manifest = json.loads((tmp_path / "out" / "data" / "manifest.json").read_text())
    assert manifest["data"]["files"]["rows"]["rows"] == 2 and str(rows) in manifest["inputs"]
    assert fake_train.calls == [("sft", False)]
    with pytest.raises(ConfigError, match="'bundled'.*and/or 'files'"):
        load_pipeline(stages(tmp_path, data={"kind": "data"}))


def test_example_pipeline_loads_and_the_cli_parses(tmp_path):
    pipe = load_pipeline(EXAMPLE, out=tmp_path)
    assert [s.name for s in pipe.stages] == ["data", "base", "sft", "reward", "dpo", "grpo", "eval"]
    algorithms = [s.config.algorithm for s in pipe.stages if s.kind == "train"]
    assert algorithms == ["sft", "sft", "reward", "dpo", "grpo"]
    assert pipe.stage("grpo").config.model.path == str(tmp_path / "dpo" / "final")
    assert pipe.stage("base").config.data.train == str(tmp_path / "data" / "pretrain.jsonl")
    assert pipe.stage("eval").config.model == str(tmp_path / "grpo" / "final") and pipe.intended_use
    pipe = load_pipeline(EXAMPLE, out=tmp_path, overrides=["sft.train.lr=1e-4", "data.rows=10"])
    assert pipe.stage("sft").config.train.lr == 1e-4 and pipe.stage("data").config.rows == 10
    with pytest.raises(ConfigError, match="--set sfft.train.lr=1: no stage or group 'sfft'"):
        load_pipeline(EXAMPLE, overrides=["sfft.train.lr=1"])

    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    p = pipeline_cli.add_parsers(sub)
    args = p.parse_args([str(EXAMPLE), "--until", "sft", "--fresh", "--set", "sft.train.lr=1e-4"])
    assert (args.until, args.fresh, args.set) == ("sft", True, ["sft.train.lr=1e-4"])
    with pytest.raises(SystemExit):
        p.parse_args([str(EXAMPLE), "--until", "a", "--only", "b"])
    assert args.func(p.parse_args([str(EXAMPLE), "--out", str(tmp_path), "--dry-run"])) == 0
