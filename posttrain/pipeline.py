"""Multi-stage pipelines: named stages in order, artifacts passed by name, finished stages reused.

    posttrain pipeline examples/pipeline.yaml [--until STAGE | --only STAGE] [--fresh] [--dry-run]

A pipeline file names its stages in the order they run; each writes its own run directory,
``<out>/<stage name>``::

    out: runs/pipeline
    intended_use: ...                  # optional, for the model cards (posttrain card)
    limitations: [...]                 # optional, added to the model cards' default list
    defaults:                          # merged under every training stage (the stage's keys win)
      train: {progress: false}
    stages:
      data: {kind: data, bundled: [arithmetic, tiny], rows: 2000}
      sft:                             # a training stage: a `posttrain train` config without `out`
        algorithm: sft
        model: {path: "${data.tiny}"}
        data: {train: "${data.sft_train}", max_length: 64}
        train: {max_steps: 100}
      improve:                         # a group: its stages run `repeat` times, as dpo-1, dpo-2
        repeat: 2
        stages:
          dpo:
            algorithm: dpo
            model: {path: "${prev.dpo.final|sft.final}"}   # last round's model; sft's in round 1
            data: {train: "${data.pref_train}"}
            train: {max_steps: 50, seed: "${round}"}
      eval: {kind: eval, suite: arithmetic, model: "${dpo.final}"}   # after the group: the last round
      gates: {kind: gates, gates: gates.yaml, current: "${eval.eval}"}

References, ``${STAGE.ATTR}``, name an artifact of an earlier stage. Every stage has ``run_dir``;
a training stage also ``final`` (its final/ model), ``metrics``, ``alerts``, ``samples``; a data
stage one attribute per file it holds; an eval stage ``eval`` (eval.json) and ``samples``. In a
group, ``${dpo.final}`` is this round's dpo (which must come earlier in the round),
``${prev.dpo.final}`` the previous round's, with a fallback after ``|`` for round 1, and
``${round}`` the round number (1, 2, ...). After the group, ``${dpo.final}`` is the last round's
and ``${dpo-1.final}`` names one round. Everything is resolved and every stage config validated
before anything runs: a reference to an unknown stage, a later stage or an unknown attribute is an
error naming the stage and the key.

Stage kinds: ``train`` (the default: any config with ``algorithm``), ``data`` (the bundled task
files and tiny model, and/or existing ``files: {name: path}`` to hash and name), ``eval``
(:mod:`posttrain.eval.suite`: ``suite``, ``model``, optional ``against``) and ``gates``
(:mod:`posttrain.eval.gates`: ``gates``, ``current``, optional ``baseline``; a failed gate stops
the pipeline). The eval modules are imported only when a pipeline has such a stage.

Reuse and resume. A stage's hash covers its config as written (defaults merged, round numbers in)
and the hashes of the stages it references, so a change upstream re-runs everything downstream,
while moving the whole output directory does not. A stage whose run directory holds a
``STAGE_COMPLETE`` marker with the same hash (and its final/ or outputs) is reused; one that failed
or was interrupted with the same hash resumes from its last checkpoint; a stage directory written
under another hash (its ``STAGE_STARTED`` marker says which) is deleted and the stage runs afresh
(``--fresh``: every selected stage does); a non-empty directory without that marker was not written
by a pipeline and is an error, never deleted. The hash covers configs, not file contents: after
editing a data file in place, run the stages that read it with ``--fresh``.
``<out>/pipeline.json`` records every stage's status, run directory, hash and start/finish times.

Lineage: each stage's manifest.json names the runs it read from (``parents``), so
:func:`posttrain.audit.lineage` walks back from any stage to every input file. Files a data stage
writes live in its run directory and so lead back to it; ``files:`` are used where they are (not
copied) and are hashed into the manifests of the data stage and of every stage that reads them. At
the end of a run every finished training stage gets a MODEL_CARD.md (:mod:`posttrain.audit`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from posttrain.config import apply_override, load_config
from posttrain.errors import ConfigError, PosttrainError
from posttrain.sections import Section

MARKER = "STAGE_COMPLETE"  # {"hash", "finished"}: written when a stage finished
STARTED = "STAGE_STARTED"  # {"hash", "started"}: which config the (partial) contents of a stage dir belong to
STATE = "pipeline.json"
KINDS = ("train", "data", "eval", "gates")
TOP_KEYS = ("out", "description", "intended_use", "limitations", "defaults", "stages")
# Stage names are identifiers: "-" is kept for the rounds of a group (dpo-1, dpo-2).
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED = ("prev", "round")
REF = re.compile(r"\$\{([^}]*)\}")

# Files of the bundled task each `bundled:` entry of a data stage writes (attribute -> file).
BUNDLED = {
    "arithmetic": ("sft_train", "prompts_train", "eval", "pretrain"),
    "preference": ("pref_train", "pref_eval", "feedback_train"),
    "tiny": ("tiny",),
}
TRAIN_ATTRS = {
    "final": "final",
    "metrics": "metrics.jsonl",
    "alerts": "alerts.jsonl",
    "samples": "samples.jsonl",
    "config": "config.yaml",
}
EVAL_ATTRS = {"eval": "eval.json", "samples": "eval_samples.jsonl"}


class PipelineInterrupted(PosttrainError):
    """A stage stopped early (signal, health monitor); the pipeline resumes there next time."""


class GatesFailed(PosttrainError):
    """A gates stage found a regression; `posttrain pipeline` exits with code 1."""


# ------------------------------------------------------------------------------------ stage kinds


class DataStage(Section):
    """Data a pipeline starts from: the bundled task written here, and/or existing files named."""

    kind: Literal["data"] = "data"
    bundled: list[Literal["arithmetic", "preference", "tiny"]] = Field(
        default_factory=list,
        description="arithmetic: sft_train, prompts_train, eval, pretrain; preference: pref_train, "
        "pref_eval, feedback_train; tiny: a tokenizer and a random tiny model (attribute `tiny`).",
    )
    files: dict[str, str] = Field(
        default_factory=dict, description="Existing files to hash into the manifest, by attribute name."
    )
    rows: int = Field(20_000, gt=0, description="Rows per generated training file.")
    levels: list[str] = Field(default_factory=lambda: ["add1", "add2", "sub2"])
    size: str = Field("tiny", description="Size of the tiny model (posttrain.tasks.tiny).")
    seed: int = 0

    @model_validator(mode="after")
    def _has_files(self) -> DataStage:
        if not self.bundled and not self.files:
            raise ValueError(
                "a data stage needs 'bundled' (the bundled task) and/or 'files' (existing files)"
            )
        clash = sorted(set(self.files) & {n for b in self.bundled for n in BUNDLED[b]})
        if clash:
            raise ValueError(f"files {clash} are also written by 'bundled'; rename them")
        return self


class EvalStage(Section):
    """`posttrain eval run SUITE --model MODEL [--against B]`, written into the stage's directory."""

    kind: Literal["eval"] = "eval"
    suite: str = Field(description="Suite YAML file or bundled suite name.")
    model: str
    against: str | None = None


class GatesStage(Section):
    """`posttrain eval gates`: a failed gate stops the pipeline."""

    kind: Literal["gates"] = "gates"
    gates: str = Field(description="Gates YAML file.")
    current: str = Field(description="eval.json to check, usually ${EVAL_STAGE.eval}.")
    baseline: str | None = None


SPECS = {"data": DataStage, "eval": EvalStage, "gates": GatesStage}


# ------------------------------------------------------------------------------------ the plan


@dataclass
class Stage:
    """One stage of the plan, resolved: references replaced by paths, config validated."""

    name: str  # unique: "sft", or "dpo-2" for round 2 of a group
    base: str  # the name in the file: "dpo"
    kind: str
    spec: dict  # resolved; for training stages the RunConfig dict, `out` included
    run_dir: Path
    hash: str
    needs: list[str] = field(default_factory=list)  # stages it references
    group: str | None = None
    round: int | None = None
    config: Any = None  # the validated RunConfig / DataStage / EvalStage / GatesStage

    def attributes(self) -> dict[str, Path]:
        """What `${NAME.ATTR}` can name."""
        d = self.run_dir
        out = {"run_dir": d}
        if self.kind == "train":
            out.update({k: d / v for k, v in TRAIN_ATTRS.items()})
        elif self.kind == "eval":
            out.update({k: d / v for k, v in EVAL_ATTRS.items()})
        elif self.kind == "data":
            out.update(data_files(self.config, d))
        return out

    def outputs(self) -> list[Path]:
        """What must exist for a finished stage to be reused."""
        if self.kind == "train":
            return [self.run_dir / "final"]
        if self.kind == "eval":
            return [self.run_dir / "eval.json"]
        if self.kind == "data":
            return list(data_files(self.config, self.run_dir).values())
        return []


@dataclass
class Pipeline:
    path: Path | None
    out: Path
    stages: list[Stage]
    intended_use: str | None = None
    limitations: list[str] = field(default_factory=list)
    description: str = ""

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def data_files(cfg: DataStage, run_dir: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for entry in cfg.bundled:
        for name in BUNDLED[entry]:
            out[name] = run_dir / name if entry == "tiny" else run_dir / f"{name}.jsonl"
    out.update({k: Path(v) for k, v in cfg.files.items()})
    return out


def load_pipeline(
    source: str | Path | dict, *, out: str | Path | None = None, overrides: list[str] | tuple = ()
) -> Pipeline:
    """Read, expand (groups), resolve references and validate every stage; nothing runs.

    Args:
        source: a pipeline YAML file, or its content as a dict.
        out: replaces the file's ``out``.
        overrides: ``STAGE.key=value`` (``GROUP.stages.STAGE.key=value`` in a group), as ``--set``.

    Raises:
        ConfigError: naming the file, the stage and the key of every problem found first.
    """
    if isinstance(source, dict):
        raw, where, path = copy.deepcopy(source), "<pipeline>", None
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"pipeline file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping (out, stages, ...)")
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(TOP_KEYS)}"
            raise ConfigError(f"{where}: unknown key '{key}'; {hint}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{where}: 'stages' must be a non-empty mapping of stage name -> stage config")
    for item in overrides:
        head = item.partition("=")[0].split(".")[0].strip()
        if head not in stages_raw:
            raise ConfigError(f"--set {item}: no stage or group '{head}' (have: {', '.join(stages_raw)})")
        apply_override(stages_raw, item)
    out_dir = Path(out if out is not None else raw.get("out") or "")
    if not str(out_dir) or str(out_dir) == ".":
        raise ConfigError(f"{where}: missing 'out' (the directory that holds one run directory per stage)")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: 'defaults' must be a mapping of config sections")
    limitations = raw.get("limitations") or []
    if isinstance(limitations, str):
        limitations = [limitations]

    entries = _expand(stages_raw, where)
    stages: list[Stage] = []
    for name, base, group, rnd, body in entries:
        stages.append(_resolve_stage(name, base, group, rnd, body, stages, entries, defaults, out_dir, where))
    return Pipeline(
        path=path,
        out=out_dir,
        stages=stages,
        intended_use=raw.get("intended_use"),
        limitations=[str(x) for x in limitations],
        description=str(raw.get("description") or ""),
    )


def _expand(stages_raw: dict, where: str) -> list[tuple[str, str, str | None, int | None, dict]]:
    """(name, base, group, round, body) per stage, groups unrolled round by round."""
    entries, seen = [], set()

    def add(name, base, group, rnd, body):
        if name in seen:
            raise ConfigError(f"{where}: two stages are named '{name}'")
        seen.add(name)
        entries.append((name, base, group, rnd, body))

    for name, body in stages_raw.items():
        _check_name(name, where)
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: stage '{name}' must be a mapping, got {type(body).__name__}")
        if "repeat" not in body:
            add(name, name, None, None, body)
            continue
        extra = set(body) - {"repeat", "stages"}
        if extra:
            raise ConfigError(
                f"{where}: group '{name}': unknown key(s) {sorted(extra)}; a group has repeat, stages"
            )
        rounds, inner = body.get("repeat"), body.get("stages")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise ConfigError(
                f"{where}: group '{name}': 'repeat' must be a whole number >= 1, got {rounds!r}"
            )
        if not isinstance(inner, dict) or not inner:
            raise ConfigError(f"{where}: group '{name}': 'stages' must be a non-empty mapping")
        for sub, sub_body in inner.items():
            _check_name(sub, where)
            if not isinstance(sub_body, dict) or "repeat" in sub_body:
                raise ConfigError(
                    f"{where}: group '{name}': stage '{sub}' must be a stage mapping (no nested groups)"
                )
        for r in range(1, rounds + 1):
            for sub, sub_body in inner.items():
                add(f"{sub}-{r}", sub, name, r, sub_body)
    return entries


def _check_name(name, where: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError(
            f"{where}: stage name {name!r} must be a letter or _ followed by letters, digits or _, "
            f"and not {' or '.join(RESERVED)}"
        )


def _resolve_stage(
    name, base, group, rnd, body, done: list[Stage], entries, defaults, out_dir, where
) -> Stage:
    body = copy.deepcopy(body)
    kind = body.pop("kind", "train")
    label = f"{where}: stage '{name}'"
    if kind not in KINDS:
        raise ConfigError(f"{label}: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "train":
        if "out" in body:
            raise ConfigError(f"{label}: remove 'out': the pipeline writes the stage to {out_dir / name}")
        body = _merge(defaults, body)
    refs: dict[str, list] = {}  # expression -> [target stage, attribute, target hash]

    def substitute(value, key: str):
        if isinstance(value, dict):
            return {k: substitute(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = REF.fullmatch(value.strip())
        if whole:
            return lookup(whole.group(1).strip(), key)
        return REF.sub(lambda m: str(lookup(m.group(1).strip(), key)), value)

    def lookup(expr: str, key: str):
        where_key = f"{label}, key '{key}': ${{{expr}}}"
        if expr == "round":
            if rnd is None:
                raise ConfigError(f"{where_key}: ${{round}} is only defined inside a group (repeat:)")
            refs[expr] = ["round", rnd, ""]
            return rnd
        target, attr = _target(expr, name, base, group, rnd, done, entries, where_key)
        attrs = target.attributes()
        if attr not in attrs:
            close = difflib.get_close_matches(attr, attrs, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"{where_key}: stage '{target.name}' ({target.kind}) has no '{attr}'; {hint}"
                f"it has {', '.join(attrs)}"
            )
        refs[expr] = [target.name, attr, target.hash]
        return str(attrs[attr])

    resolved = substitute(body, "")
    spec_model = SPECS.get(kind)
    if kind == "train":
        resolved = {**resolved, "out": str(out_dir / name)}
        try:
            cfg = load_config(resolved)
        except ConfigError as e:
            raise ConfigError(str(e).replace("<dict>", label, 1)) from None
    else:
        try:
            cfg = spec_model.model_validate({"kind": kind, **resolved})
        except ValidationError as e:
            problems = "\n".join(
                f"  {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"{label}: invalid {kind} stage\n{problems}") from None
        _check_kind_available(kind, label)
    digest = hashlib.sha256(
        json.dumps(
            {"kind": kind, "spec": body, "round": rnd, "refs": refs}, sort_keys=True, default=str
        ).encode()
    ).hexdigest()
    needs = sorted({t for t, *_ in refs.values() if t != "round"}, key=[s.name for s in done].index)
    return Stage(
        name=name, base=base, kind=kind, spec=resolved, run_dir=out_dir / name, hash=digest, needs=needs,
        group=group, round=rnd, config=cfg,
    )  # fmt: skip


def _target(expr, name, base, group, rnd, done: list[Stage], entries, where_key) -> tuple[Stage, str]:
    """The earlier stage and attribute an expression names (see the module docstring)."""
    expr, _, fallback = expr.partition("|")
    parts = expr.strip().split(".")
    if parts[0] == "prev":
        if group is None:
            raise ConfigError(f"{where_key}: ${{prev.STAGE.ATTR}} is only defined inside a group (repeat:)")
        if len(parts) != 3:
            raise ConfigError(f"{where_key}: write ${{prev.STAGE.ATTR}}, e.g. ${{prev.dpo.final}}")
        members = {b for _, b, g, _, _ in entries if g == group}
        if parts[1] not in members:
            raise ConfigError(
                f"{where_key}: group '{group}' has no stage '{parts[1]}' (has: {', '.join(sorted(members))})"
            )
        if rnd > 1:
            return _find(f"{parts[1]}-{rnd - 1}", done, where_key), parts[2]
        if not fallback.strip():
            raise ConfigError(
                f"{where_key}: round 1 has no previous '{parts[1]}'; give a fallback after '|', "
                f"e.g. ${{prev.{parts[1]}.{parts[2]}|sft.final}}"
            )
        return _target(fallback.strip(), name, base, None, None, done, entries, where_key)
    if fallback:
        raise ConfigError(f"{where_key}: a fallback after '|' only follows ${{prev.STAGE.ATTR}}")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{where_key}: write ${{STAGE.ATTR}}, e.g. ${{sft.final}}")
    ref, attr = parts
    names = [n for n, *_ in entries]
    if ref in names:  # an exact name: "sft", "dpo-2"
        return _find(ref, done, where_key), attr
    instances = [(n, g, r) for n, b, g, r, _ in entries if b == ref]
    if not instances:
        close = difflib.get_close_matches(ref, names + [b for _, b, *_ in entries], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{where_key}: unknown stage '{ref}'; {hint}stages: {', '.join(names)}")
    if group is not None and instances[0][1] == group:  # a stage of this group: this round's
        return _find(f"{ref}-{rnd}", done, where_key), attr
    earlier = [n for n, _, _ in instances if any(s.name == n for s in done)]
    if not earlier:
        raise ConfigError(
            f"{where_key}: stage '{ref}' runs after '{name}'; a stage can only use earlier ones"
        )
    return _find(earlier[-1], done, where_key), attr


def _find(target: str, done: list[Stage], where_key: str) -> Stage:
    for s in done:
        if s.name == target:
            return s
    raise ConfigError(
        f"{where_key}: stage '{target}' does not run before this one; a stage can only use earlier ones"
    )


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def _check_kind_available(kind: str, label: str) -> None:
    module = {"eval": "posttrain.eval.suite", "gates": "posttrain.eval.gates"}.get(kind)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{label}: a {kind} stage needs {module}, which this installation of posttrain lacks"
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
    from posttrain.audit.cards import count_rows
    from posttrain.engine.run import Run

    cfg: DataStage = stage.config
    d = stage.run_dir
    levels = tuple(cfg.levels)
    if "arithmetic" in cfg.bundled:
        from posttrain.tasks import arithmetic

        n = cfg.rows
        arithmetic.write_task_files(d, n_sft=n, n_prompts=n, n_pretrain_docs=n, seed=cfg.seed, levels=levels)
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
    from posttrain.eval.suite import format_table, run_suite

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
