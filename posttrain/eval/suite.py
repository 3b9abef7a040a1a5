"""Eval suites: a YAML file names the prompts, how to sample, and how to score; `evaluate` (eval/evaluate.py) runs it.

    # arithmetic.yaml
    name: arithmetic
    dataset: {name: arithmetic, levels: [add1, add2, sub2], n_per_level: 50}
    generation: {n: 4, temperature: 1.0, max_new_tokens: 8}
    scorers: [exact_match]            # any reward spec posttrain.rewards.combine takes, or a judge
    pass_k: [1, 4]

    posttrain eval run arithmetic.yaml --model runs/sft/final [--against runs/base/final]

- ``dataset``: a prompt-rows file (jsonl / json / parquet / csv, read and validated like training
  data, so errors name file and line), or a bundled set by name (:data:`BUNDLED_DATASETS`). A
  relative path is looked up next to the suite file first, then from the current directory.
- ``generation``: samples per prompt (``n``) and the :class:`~posttrain.rollout.engine.Sampling`
  settings; temperature 0 is greedy.
- ``scorers``: reward specs, summed with their weights into one score per sample: built-in
  verifiers (``exact_match``, ``math_answer``, ``code_tests``), ``{name: reward_model, path: ...}``,
  ``"module:function"``, or ``{name: judge, model_path: ..., rubric: default}``
  (:func:`posttrain.rewards.judge.judge`). Row fields reach them as in RL (``answer=[...]``).

Metrics, in ``eval.json`` under ``metrics`` (95% percentile-bootstrap intervals over prompts, never
over samples of one prompt, under ``intervals``). Names follow the training logs, so a gate or a
plot reads both alike:

    accuracy                 share of samples whose score >= success_threshold (per prompt, then mean)
    pass@k                   unbiased estimator from n samples (Chen et al. 2021), for k in pass_k
    reward/mean              mean total score; reward/<scorer>/mean each component
    reward/<judge>/failure_rate   judge outputs that could not be parsed (scored as its on_failure)
    completion_length/*      mean, median, p90, max (tokens) and truncated_share (cut at max_new_tokens)
    refusal_rate             share of harmful prompts refused (rows with harmful: true; want high)
    over_refusal_rate        share of benign prompts refused (harmful: false; want low)
    win_rate                 with --against: A beats B on the same prompts and sample seeds, ties 0.5

Refusals are detected with :func:`posttrain.eval.metrics.is_refusal`, a phrase heuristic: check a
sample by hand (``eval_samples.jsonl``), or score with a judge, before quoting the number.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from posttrain.data.io import Location
from posttrain.errors import ConfigError, DataError
from posttrain.sections import Section, read_yaml, validate

SUITES_DIR = Path(__file__).parent / "suites"
"""Bundled suites (``<name>.yaml``), their prompt files and the judge rubrics (``rubrics/``)."""

BUNDLED_DATASETS = {
    "arithmetic": None,  # the arithmetic task's held-out sets (options: levels, n_per_level)
    "harmful": SUITES_DIR / "harmful.jsonl",
    "benign_edgy": SUITES_DIR / "benign_edgy.jsonl",
}
"""Datasets a suite can name instead of giving a path."""


def bundled_suites() -> list[str]:
    """Names of the bundled suites (``posttrain eval run NAME``)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------------------- schema


class DatasetSpec(Section):
    """Where the prompts come from: a bundled set by ``name`` or a file by ``path``."""

    name: str | None = Field(None, description=f"Bundled dataset: {', '.join(BUNDLED_DATASETS)}.")
    path: str | None = Field(None, description="Prompt-rows file; relative: next to the suite file first.")
    levels: list[str] | None = Field(None, description="arithmetic only: levels to take (default: all).")
    n_per_level: int | None = Field(None, gt=0, description="arithmetic only: problems per level.")
    limit: int | None = Field(None, gt=0, description="Keep the first N rows only.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, raw):
        """``dataset: harmful`` names a bundled set; any other string is a path."""
        if isinstance(raw, str):
            return {"name": raw} if raw in BUNDLED_DATASETS else {"path": raw}
        return raw

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (a bundled dataset) and 'path' (a file)")
        if self.name is not None and self.name not in BUNDLED_DATASETS:
            raise ValueError(f"unknown bundled dataset {self.name!r}; choose from {list(BUNDLED_DATASETS)}")
        if self.name != "arithmetic" and (self.levels is not None or self.n_per_level is not None):
            raise ValueError("'levels' and 'n_per_level' apply to the arithmetic dataset only")
        return self


class GenerationSpec(Section):
    """How completions are sampled (``posttrain.rollout.engine.Sampling``)."""

    n: int = Field(1, gt=0, description="Samples per prompt; pass@k needs n >= k.")
    temperature: float = Field(0.0, ge=0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k.")
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = Field(default_factory=list, description="Stop strings (besides the eos token).")
    seed: int = Field(0, description="Sampling seed; model A and model B draw with the same one.")
    batch_size: int | None = Field(None, gt=0, description="Sequences per forward; default: all at once.")

    @model_validator(mode="after")
    def _sampling_when_n(self) -> GenerationSpec:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n = {self.n} greedy samples would all be the same; set temperature > 0")
        return self


class SuiteConfig(Section):
    """One eval suite (see the module docstring)."""

    name: str | None = Field(None, description="Shown in tables and eval.json; default: the file's stem.")
    description: str = ""
    dataset: DatasetSpec
    generation: GenerationSpec = GenerationSpec()
    scorers: list[Any] = Field(
        default_factory=list,
        description="Reward specs (as posttrain.rewards.combine takes) or {name: judge, ...}, summed by weight.",
    )
    success_threshold: float = Field(1.0, description="A sample whose score is at least this is correct.")
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values of pass@k (each <= n).")
    refusal: bool = Field(False, description="Refusal and over-refusal rates; rows need 'harmful: bool'.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the bootstrap intervals.")

    @field_validator("scorers")
    @classmethod
    def _scorer_shapes(cls, scorers: list) -> list:
        for i, spec in enumerate(scorers):
            if not (isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("name"), str))):
                raise ValueError(f"entry {i} must be a reward name or a mapping with a 'name' (got {spec!r})")
        return scorers

    @model_validator(mode="after")
    def _k_within_n(self) -> SuiteConfig:
        bad = [k for k in self.pass_k if not 1 <= k <= self.generation.n]
        if bad:
            raise ValueError(
                f"pass_k {bad} needs k in [1, generation.n = {self.generation.n}]; sample at least k per prompt"
            )
        return self


def find_file(name: str, base_dir: Path | None) -> Path:
    """A relative path next to ``base_dir`` (a suite's folder) if it exists there, else as given."""
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        return base_dir / path
    return path


def strict_json(obj):
    from posttrain.eval.rm_audit import _finite as finite  # NaN -> null: strict JSON

    return finite(obj)


# --------------------------------------------------------------------------------------- the suite


@dataclass
class Suite:
    """A validated suite: its config, the file it came from and the scorer it built."""

    config: SuiteConfig
    path: Path | None = None  # the suite file (None when built from a dict)
    scorer: Any = None  # a posttrain.rewards.Combined, or None without scorers

    @property
    def name(self) -> str:
        return self.config.name or (self.path.stem if self.path else "suite")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"suite {self.name!r}"

    def rows(self) -> list[tuple[Location, dict]]:
        """The prompt rows with their locations, validated (and checked against the scorers)."""
        spec = self.config.dataset
        if spec.name == "arithmetic":
            from posttrain.tasks import arithmetic

            try:
                raw = arithmetic.eval_rows(
                    spec.levels or arithmetic.LEVELS, spec.n_per_level or arithmetic.HELD_OUT_SIZE
                )
            except ValueError as e:
                raise ConfigError(f"{self.where}: dataset.levels: {e}") from None
            rows = [(Location("arithmetic", i), row) for i, row in enumerate(raw)]
        else:
            from posttrain.data.schemas import load_rows

            base = self.path.parent if self.path else None
            path = BUNDLED_DATASETS[spec.name] if spec.name else find_file(spec.path, base)
            if not path.exists():
                raise ConfigError(f"{self.where}: dataset.path: file not found: {spec.path}")
            rows = load_rows(path, "prompt")
        rows = rows[: spec.limit] if spec.limit else rows
        if self.config.refusal:
            lacking = [loc for loc, row in rows if not isinstance(row.get("harmful"), bool)]
            if lacking:
                raise DataError(
                    f"{self.where}: refusal: true needs a field 'harmful' (true or false) in every row; "
                    f"{len(lacking)} of {len(rows)} rows lack one (first: {lacking[0]})"
                )
        if self.scorer is not None:
            _check_fields(self.scorer, rows, self.where)
        return rows


def load_suite(source: str | Path | dict) -> Suite:
    """Read and validate a suite: a YAML file, a bundled suite's name, or a dict.

    Raises:
        ConfigError: missing file, bad YAML, unknown or wrong keys (each named, with the key
            probably meant), or a scorer spec that does not resolve.
    """
    if isinstance(source, dict):
        path, raw = None, source
    else:
        path = Path(source)
        if not path.exists() and str(source) in bundled_suites():
            path = SUITES_DIR / f"{source}.yaml"
        elif not path.exists():
            raise ConfigError(f"suite not found: {source} (a YAML file, or one of {bundled_suites()})")
        raw = read_yaml(path)
    where = str(path) if path else "suite"
    config = validate(SuiteConfig, raw, where, "suite")
    base = path.parent if path else None
    scorer = build_scorer(config.scorers, where=where, base_dir=base) if config.scorers else None
    return Suite(config=config, path=path, scorer=scorer)


def build_scorer(specs: Sequence, *, where: str = "suite", base_dir: Path | None = None):
    """One :class:`~posttrain.rewards.Combined` from reward specs (a judge is one of them), through
    :func:`posttrain.rewards.combine`, so it accepts exactly what RL configs do; a relative rubric path is
    looked up next to the suite first. A bad spec is an error naming the suite and the spec's index."""
    from posttrain.rewards import Combined, combine

    components: dict = {}
    for i, spec in enumerate(specs):
        try:
            part = combine([spec], base_dir=base_dir).components
        except (ValueError, TypeError, ConfigError) as e:
            raise ConfigError(f"{where}: scorers[{i}]: {e}") from None
        for label in part:
            if label in components:
                raise ConfigError(f"{where}: two scorers are named {label!r}; give one a 'label'")
        components.update(part)
    return Combined(components)


def _required_fields(fn) -> list[str]:
    """Row fields a reward fn cannot do without: its parameters after (prompts, completions)
    that have no default."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params[2:] if p.kind in kinds and p.default is inspect.Parameter.empty]


def _check_fields(scorer, rows: list[tuple[Location, dict]], where: str) -> None:
    """Fail before generating, not after, when rows lack a field a scorer needs."""
    for label, (fn, _) in scorer.components.items():
        for name in _required_fields(fn):
            lacking = [loc for loc, row in rows if name not in row]
            if lacking:
                raise DataError(
                    f"{where}: scorer {label!r} needs the row field {name!r}, which {len(lacking)} of "
                    f"{len(rows)} rows lack (first: {lacking[0]})"
                )
