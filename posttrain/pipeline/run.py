"""Running a pipeline's plan: per-stage markers and state, which stages run, reuse or resume, the runners of
each stage kind, the cards at the end."""

from __future__ import annotations

import difflib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from posttrain.errors import ConfigError
from posttrain.pipeline.plan import (
    EVAL_ATTRS,
    MARKER,
    STARTED,
    STATE,
    DataStage,
    EvalStage,
    GatesFailed,
    GatesStage,
    Pipeline,
    PipelineInterrupted,
    Stage,
    data_files,
    load_pipeline,
)

# ------------------------------------------------------------------------------------ state


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class State:
    """<out>/pipeline.json: what ran, when, under which hash, and how it ended."""

    def __init__(self, pipe: Pipeline):
        self.path = pipe.out / STATE
        old = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text()).get("stages", {})
            except json.JSONDecodeError:
                old = {}
        self.data = {
            "pipeline": str(pipe.path) if pipe.path else None,
            "out": str(pipe.out),
            "description": pipe.description,
            "intended_use": pipe.intended_use,
            "limitations": pipe.limitations,
            "updated": _now(),
            "stages": {},
        }
        for s in pipe.stages:
            entry = {
                "kind": s.kind,
                "status": "pending",
                "run_dir": str(s.run_dir),
                "hash": s.hash,
                "needs": s.needs,
            }
            prev = old.get(s.name, {})
            if prev.get("hash") == s.hash:  # keep what is known of this very stage
                entry.update({k: prev[k] for k in ("status", "started", "finished", "error") if k in prev})
            if s.kind == "train":
                entry["algorithm"] = s.config.algorithm
            if s.kind == "eval":
                entry.update(model=s.config.model, against=s.config.against)
            if s.round is not None:
                entry.update(group=s.group, round=s.round)
            self.data["stages"][s.name] = entry

    def __getitem__(self, name: str) -> dict:
        return self.data["stages"][name]

    def update(self, name: str, **fields) -> None:
        self.data["stages"][name].update(fields)
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def _marker_hash(stage: Stage, name: str) -> str | None:
    path = stage.run_dir / name
    try:
        return json.loads(path.read_text()).get("hash") if path.is_file() else None
    except json.JSONDecodeError:
        return None


def is_complete(stage: Stage) -> bool:
    """Finished under the same hash, and its outputs still there."""
    return _marker_hash(stage, MARKER) == stage.hash and all(p.exists() for p in stage.outputs())


def plan_status(stage: Stage, fresh: bool = False) -> str:
    """What running would do: reuse, resume (a partial run of this very config is there), run (nothing
    there), rerun (the directory holds a run of another config: deleted first) or foreign (the directory
    was not written by a pipeline: left alone, an error)."""
    if not fresh and is_complete(stage):
        return "reuse"
    if not stage.run_dir.exists() or not any(stage.run_dir.iterdir()):
        return "run"
    started = _marker_hash(stage, STARTED)
    if started is None:
        return "foreign"
    if fresh or started != stage.hash:
        return "rerun"
    return "resume"


def select(pipe: Pipeline, *, until: str | None = None, only: str | None = None) -> list[Stage]:
    """The stages to run: all, up to and including `until`, or `only` (a stage, a base name for every
    round of it, or a group for all of it)."""
    if until and only:
        raise ConfigError("give --until or --only, not both")
    name = until or only
    if name is None:
        return list(pipe.stages)
    hits = [i for i, s in enumerate(pipe.stages) if name in (s.name, s.base, s.group)]
    if not hits:
        choices = sorted(
            {s.name for s in pipe.stages}
            | {s.base for s in pipe.stages}
            | {s.group for s in pipe.stages if s.group}
        )
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"no stage '{name}'; {hint}stages: {', '.join(s.name for s in pipe.stages)}")
    if until:
        return pipe.stages[: hits[-1] + 1]
    return [pipe.stages[i] for i in hits]


# ------------------------------------------------------------------------------------ running


def run_pipeline(
    source: str | Path | dict | Pipeline,
    *,
    until: str | None = None,
    only: str | None = None,
    fresh: bool = False,
    out: str | Path | None = None,
    overrides: list[str] | tuple = (),
    cards: bool = True,
) -> dict[str, str]:
    """Run a pipeline (see the module docstring); returns {stage: what happened} for the selected ones
    ("reused", "ran", "resumed").

    Raises:
        ConfigError: anything wrong in the file, before any stage runs.
        PipelineInterrupted: a stage was stopped; run again to resume it.
        GatesFailed: a gates stage failed.
        Whatever a stage raised, after recording it as failed in pipeline.json.
    """
    pipe = source if isinstance(source, Pipeline) else load_pipeline(source, out=out, overrides=overrides)
    chosen = select(pipe, until=until, only=only)
    state = State(pipe)
    chosen_names = {s.name for s in chosen}
    for s in chosen:  # --only: what a chosen stage uses must already be there
        for need in s.needs:
            if need not in chosen_names and not is_complete(pipe.stage(need)):
                raise ConfigError(
                    f"stage '{s.name}' uses '{need}', which has not completed with its current config; "
                    f"run the pipeline up to it first (--until {need})"
                )
    foreign = [str(s.run_dir) for s in chosen if plan_status(s, fresh) == "foreign"]
    if foreign:
        raise ConfigError(
            f"{', '.join(foreign)}: not empty and not written by a pipeline; move it away or choose another out"
        )
    _check_gate_metrics(chosen, pipe)
    for s in pipe.stages:  # stages not selected keep their recorded state
        if s.name not in chosen_names and is_complete(s):
            state[s.name]["status"] = "complete"
    state.save()
    outcome = {}
    for stage in chosen:
        outcome[stage.name] = _run_stage(pipe, stage, state, fresh)
    if cards:
        _write_cards(pipe, state)
    return outcome


def _check_gate_metrics(chosen: list[Stage], pipe: Pipeline) -> None:
    """A gates stage naming a metric its eval stage's suite cannot produce (a typo) is a config error now,
    not a failed gate after every stage before it ran."""
    from posttrain.eval.gates import check_metric_names, load_gates, suite_metric_names
    from posttrain.eval.suite import load_suite

    evals = {s.run_dir / EVAL_ATTRS["eval"]: s for s in pipe.stages if s.kind == "eval"}
    for stage in (s for s in chosen if s.kind == "gates"):
        source = evals.get(Path(stage.config.current))
        if source is not None:
            known = suite_metric_names(
                load_suite(source.config.suite), against=source.config.against is not None
            )
            check_metric_names(
                load_gates(stage.config.gates), known, f"stage '{stage.name}': {stage.config.gates}"
            )


def _run_stage(pipe: Pipeline, stage: Stage, state: State, fresh: bool) -> str:
    tag = f"[{stage.name}]"
    status = plan_status(stage, fresh)
    if status == "reuse":
        print(f"{tag} complete; reusing {stage.run_dir}")
        state.update(stage.name, status="complete")
        return "reused"
    if status == "rerun":
        why = "--fresh" if fresh else "its config or an upstream stage changed"
        print(f"{tag} {why}: deleting {stage.run_dir} and running it again")
        shutil.rmtree(stage.run_dir)
    resume = status == "resume" and _has_checkpoint(stage)
    print(f"{tag} {'resuming' if resume else 'running'} ({stage.kind}) -> {stage.run_dir}")
    started = _now()
    stage.run_dir.mkdir(parents=True, exist_ok=True)
    (stage.run_dir / MARKER).unlink(missing_ok=True)
    (stage.run_dir / STARTED).write_text(json.dumps({"hash": stage.hash, "started": started}) + "\n")
    state.update(stage.name, status="running", started=started, finished=None, error=None)
    t0 = time.time()
    try:
        RUNNERS[stage.kind](pipe, stage, resume)
    except PipelineInterrupted as e:
        state.update(stage.name, status="interrupted", error=str(e))
        raise
    except KeyboardInterrupt:
        state.update(stage.name, status="interrupted", error="KeyboardInterrupt")
        raise
    except BaseException as e:
        state.update(stage.name, status="failed", error=f"{type(e).__name__}: {e}")
        raise
    stage.run_dir.mkdir(parents=True, exist_ok=True)
    marker = {
        "stage": stage.name,
        "hash": stage.hash,
        "finished": _now(),
        "seconds": round(time.time() - t0, 1),
    }
    (stage.run_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    state.update(stage.name, status="complete", finished=marker["finished"])
    print(f"{tag} done in {marker['seconds']:.0f}s")
    return "resumed" if resume else "ran"


def _has_checkpoint(stage: Stage) -> bool:
    from posttrain.engine.checkpoint import latest

    return stage.kind == "train" and latest(stage.run_dir / "checkpoints") is not None


def _run_train(pipe: Pipeline, stage: Stage, resume: bool) -> None:
    import posttrain.train  # looked up at call time, so that tests can stand in for train()

    # Without a checkpoint to continue, whatever a same-config attempt left in the stage's directory goes.
    result = posttrain.train.train(stage.config, resume=resume, overwrite=not resume)
    if result.interrupted:
        raise PipelineInterrupted(
            f"stage '{stage.name}' stopped at step {result.step} ({result.interrupted}); run the pipeline "
            "again to resume it"
        )


def _run_data(pipe: Pipeline, stage: Stage, resume: bool) -> None:
    from posttrain.audit.model_card import count_rows
    from posttrain.engine.run import Run

    cfg: DataStage = stage.config
    d = stage.run_dir
    levels = tuple(cfg.levels)
    if "arithmetic" in cfg.bundled:
        from posttrain.tasks import arithmetic

        n = cfg.rows
        arithmetic.write_task_files(
            d, n_sft=n, n_prompts=n, n_pretrain_docs=n, seed=cfg.seed, levels=levels,
            prompt_levels=cfg.prompt_levels,
        )  # fmt: skip
    if "preference" in cfg.bundled:
        from posttrain.tasks import preference

        preference.write_preference_files(d, n_train=cfg.rows, seed=cfg.seed, levels=levels)
    if "tiny" in cfg.bundled:
        from posttrain.tasks.tiny import build_tiny

        build_tiny(d / "tiny", size=cfg.size, seed=cfg.seed)
    files = data_files(cfg, d)
    missing = [f"{k}: {p}" for k, p in files.items() if not p.exists()]
    if missing:
        raise ConfigError(f"stage '{stage.name}': file(s) not found: {', '.join(missing)}")
    run = Run(d)
    spec = cfg.model_dump(mode="json")
    run.write_text("config.yaml", yaml.safe_dump(spec, sort_keys=False))
    counts = {k: {"path": str(p), "rows": count_rows(p)} for k, p in files.items() if p.is_file()}
    run.write_manifest(
        config={"algorithm": "data", **spec},
        seed=cfg.seed,
        inputs=[p for p in files.values()],
        models=[],
        data={"files": counts},
    )


def _run_eval(pipe: Pipeline, stage: Stage, resume: bool) -> None:
    from posttrain.engine.run import Run
    from posttrain.eval.evaluate import format_table, run_suite

    cfg: EvalStage = stage.config
    run = Run(stage.run_dir)
    spec = cfg.model_dump(mode="json")
    run.write_text("config.yaml", yaml.safe_dump(spec, sort_keys=False))
    suite_file = [cfg.suite] if Path(cfg.suite).is_file() else []
    models = [cfg.model] + ([cfg.against] if cfg.against else [])
    run.write_manifest(config={"algorithm": "eval", **spec}, seed=0, inputs=suite_file, models=models)
    result, path = run_suite(cfg.suite, cfg.model, against=cfg.against, out=stage.run_dir)
    print(format_table(result.report))


def _run_gates(pipe: Pipeline, stage: Stage, resume: bool) -> None:
    from posttrain.eval.gates import format_gates, run_gates

    cfg: GatesStage = stage.config
    results, passed = run_gates(cfg.gates, cfg.current, cfg.baseline)
    table = format_gates(results)
    print(table)
    stage.run_dir.mkdir(parents=True, exist_ok=True)
    (stage.run_dir / "gates.txt").write_text(table + "\n")
    if not passed:
        failed = [r.gate.metric for r in results if not r.passed]
        raise GatesFailed(f"stage '{stage.name}': gate(s) failed on {', '.join(failed)}")


RUNNERS = {"train": _run_train, "data": _run_data, "eval": _run_eval, "gates": _run_gates}


def _write_cards(pipe: Pipeline, state: State) -> None:
    """MODEL_CARD.md in every finished training stage (they read eval stages run after them)."""
    from posttrain.audit import model_card

    for s in pipe.stages:
        if s.kind == "train" and state[s.name]["status"] == "complete" and (s.run_dir / "final").is_dir():
            model_card(s.run_dir)
