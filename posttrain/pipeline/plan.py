"""The plan of a pipeline: its stage kinds, the YAML read into stages in order, with every `${ref}`
resolved and checked before anything runs (the package docstring has the format)."""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from posttrain.config import apply_override
from posttrain.errors import ConfigError, PosttrainError
from posttrain.sections import Section
from posttrain.stage import load_stage

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
    prompt_levels: list[str] | None = Field(
        None, description="Levels of the RL prompts (prompts_train) of `arithmetic`; default: levels."
    )
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
            cfg = load_stage(resolved)
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
