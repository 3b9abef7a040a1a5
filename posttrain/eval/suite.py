"""Eval suites: a YAML file names the prompts, how to sample, and how to score; `evaluate` runs it.

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
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from posttrain.data.io import Location
from posttrain.errors import ConfigError, DataError
from posttrain.eval.metrics import bootstrap_ci, is_refusal, length_stats, pass_at_k, win_rate
from posttrain.rollout.engine import load_engine
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


# --------------------------------------------------------------------------------------- running


@dataclass
class EvalResult:
    """What `evaluate` returns: the report (eval.json) and one record per sample."""

    report: dict
    samples: list[dict] = field(default_factory=list)


@dataclass
class _ModelRun:
    metrics: dict[str, float]
    intervals: dict[str, list[float]]
    counts: dict[str, int]
    scores_PS: np.ndarray | None  # [P, S] total score of each sample, None without scorers
    samples: list[dict]


def _sampling(gen: GenerationSpec):
    from posttrain.rollout.engine import Sampling

    return Sampling(
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        stop=tuple(gen.stop),
        seed=gen.seed,
    )


def _run_model(suite: Suite, rows: list[dict], engine, tokenizer, label: str) -> _ModelRun:
    """Generate n samples per prompt with one model and compute its metrics."""
    from posttrain.data.templates import encode_prompts

    cfg, gen = suite.config, suite.config.generation
    P, S = len(rows), gen.n
    _, prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    groups = engine.generate(prompt_ids, S, _sampling(gen))
    if len(groups) != P or any(len(g) != S for g in groups):
        raise RuntimeError(f"the engine returned {len(groups)} groups for {P} prompts x {S} samples")
    flat = [c for g in groups for c in g]
    texts = [c.text for c in flat]
    metrics: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}

    def add(name: str, per_prompt, *, seed: int = 0) -> None:
        est, low, high = bootstrap_ci(per_prompt, confidence=cfg.confidence, seed=seed)
        metrics[name], intervals[name] = est, [low, high]

    scores_PS, components, correct_PS = None, {}, None
    if suite.scorer is not None:
        scores_PS, components = _score(suite, rows, texts, flat)
        correct_PS = scores_PS >= cfg.success_threshold
        add("accuracy", correct_PS.mean(axis=1))
        for k in cfg.pass_k:
            add(f"pass@{k}", [pass_at_k(S, int(c), k) for c in correct_PS.sum(axis=1)])
        add("reward/mean", scores_PS.mean(axis=1))
        for name, values in components.items():
            add(f"reward/{name}/mean", np.asarray(values).reshape(P, S).mean(axis=1))
        for name, rate in _judge_failure_rates(suite.scorer, len(flat)).items():
            metrics[f"reward/{name}/failure_rate"] = rate

    lengths = [len(c.token_ids) for c in flat]
    for key, value in length_stats(lengths).items():
        metrics[f"completion_length/{key}"] = value
    metrics["completion_length/truncated_share"] = float(np.mean([c.finish_reason == "length" for c in flat]))

    refused_PS = np.array([is_refusal(t) for t in texts]).reshape(P, S)
    counts = {"prompts": P, "samples": P * S}
    if cfg.refusal:
        harmful = np.array([row["harmful"] for row in rows], dtype=bool)
        share = refused_PS.mean(axis=1)
        counts["harmful_prompts"], counts["benign_prompts"] = int(harmful.sum()), int((~harmful).sum())
        # seeds 0 and 1 as in metrics.refusal_rates; per-prompt shares so that n > 1 samples of one
        # prompt stay one resampling unit
        if harmful.any():
            add("refusal_rate", share[harmful], seed=0)
        if (~harmful).any():
            add("over_refusal_rate", share[~harmful], seed=1)

    samples = []
    for i, c in enumerate(flat):
        p, s = divmod(i, S)
        record = {"model": label, "prompt_index": p, "sample": s, "prompt": rows[p]["prompt"]}
        record.update(completion=c.text, finish_reason=c.finish_reason, length=len(c.token_ids))
        if scores_PS is not None:
            record["reward"] = float(scores_PS[p, s])
            record["correct"] = bool(correct_PS[p, s])
            if len(components) > 1:
                record["components"] = {k: v[i] for k, v in components.items()}
        if cfg.refusal:
            record.update(harmful=rows[p]["harmful"], refused=bool(refused_PS[p, s]))
        samples.append(record)
    return _ModelRun(metrics, intervals, counts, scores_PS, samples)


def _score(suite: Suite, rows: list[dict], texts: list[str], flat: list) -> tuple[np.ndarray, dict]:
    """[P, S] total scores and each component's flat scores, row fields passed as in RL."""
    S = suite.config.generation.n
    prompts = [row["prompt"] for row in rows for _ in range(S)]
    names = sorted({k for row in rows for k in row if k != "prompt"})
    fields = {k: [row.get(k) for row in rows for _ in range(S)] for k in names}
    fields["completion_lengths"] = [len(c.token_ids) for c in flat]
    fields["finish_reasons"] = [c.finish_reason for c in flat]
    scores = suite.scorer.score(prompts, texts, **fields)
    return np.asarray(scores.total, dtype=np.float64).reshape(len(rows), S), scores.components


def _judge_failure_rates(scorer, n: int) -> dict[str, float]:
    """Share of this batch's judge calls whose output could not be parsed, per judge component."""
    out = {}
    for name, (fn, _) in scorer.components.items():
        batch = getattr(fn, "last_failures", None)
        if batch is not None:
            out[name] = batch / max(n, 1)
    return out


def evaluate(
    suite: Suite,
    engine,
    tokenizer,
    *,
    against: tuple[Any, Any] | None = None,
    model: str = "model",
    against_model: str = "against",
) -> EvalResult:
    """Run ``suite`` with one model, or two for a win rate.

    Args:
        suite: from :func:`load_suite`.
        engine, tokenizer: the model to evaluate (anything with the engine protocol's
            ``generate(prompt_ids, n, sampling)``) and its tokenizer (renders the prompts).
        against: ``(engine, tokenizer)`` of model B: it answers the same prompts with the same
            sampling seed, is scored by the same scorer, and ``win_rate`` is A's share of wins
            over B per sample (ties 0.5), bootstrapped over prompts.
        model, against_model: names for the report.

    Returns:
        :class:`EvalResult`; ``report`` is what eval.json holds (see the module docstring).
    """
    cfg = suite.config
    if against is not None and suite.scorer is None:
        raise ConfigError(f"{suite.where}: a win rate (--against) needs scorers to compare the models")
    rows = [row for _, row in suite.rows()]
    a = _run_model(suite, rows, engine, tokenizer, "A")
    report = {
        "suite": suite.name,
        "suite_file": str(suite.path) if suite.path else None,
        "model": model,
        "against": None,
        "dataset": cfg.dataset.model_dump(exclude_none=True),
        "generation": cfg.generation.model_dump(),
        "scorers": list(suite.scorer.components) if suite.scorer is not None else [],
        "metrics": a.metrics,
        "intervals": a.intervals,
        "counts": a.counts,
    }
    samples = a.samples
    if against is not None:
        b = _run_model(suite, rows, *against, "B")
        wr = win_rate(a.scores_PS, b.scores_PS, confidence=cfg.confidence)
        a.metrics["win_rate"], a.intervals["win_rate"] = wr.rate, [wr.low, wr.high]
        a.counts.update(wins=wr.wins, losses=wr.losses, ties=wr.ties)
        report["against"] = {"model": against_model, "metrics": b.metrics, "intervals": b.intervals}
        samples = samples + b.samples
    report["warnings"] = _warnings(report)
    report["posttrain_version"] = _version()
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return EvalResult(report=report, samples=samples)


TRUNCATION_WARNING = 0.5
"""A truncated share above this is flagged: the scores are then mostly of cut-off answers."""


def _warnings(report: dict) -> list[str]:
    """What usually means a mis-set suite, said out loud (also in eval.json)."""
    out = []
    runs = [(report["model"], report["metrics"])]
    if report["against"]:
        runs.append((report["against"]["model"], report["against"]["metrics"]))
    for name, metrics in runs:
        share = metrics.get("completion_length/truncated_share", 0.0)
        if share > TRUNCATION_WARNING:
            out.append(
                f"{share:.0%} of {name}'s completions hit max_new_tokens "
                f"({report['generation']['max_new_tokens']}): scores are of cut-off answers; raise it"
            )
        for key, value in metrics.items():
            if key.endswith("/failure_rate") and value > 0:
                out.append(f"{key} = {value:.0%} for {name}: unparseable judgments scored as failures")
    return out


def _version() -> str:
    from posttrain import __version__

    return __version__


def write_results(result: EvalResult, out_dir: str | Path) -> Path:
    """Write ``eval.json`` (strict JSON: NaN as null) and ``eval_samples.jsonl``; returns eval.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    path.write_text(json.dumps(strict_json(result.report), indent=2) + "\n")
    with (out_dir / "eval_samples.jsonl").open("w", encoding="utf-8") as f:
        for record in result.samples:
            f.write(json.dumps(strict_json(record)) + "\n")
    return path


def default_out_dir(model: str) -> Path:
    """Next to the model: the run directory holding ``final/``."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--model {model} is not a local directory; say where to write eval.json with --out"
        )
    return path.resolve().parent


def run_suite(
    suite: str | Path | Suite, model: str, *, against: str | None = None, out: str | Path | None = None
) -> tuple[EvalResult, Path]:
    """Load the suite and the model(s), evaluate, write eval.json; returns the result and its path.

    ``out`` defaults to the directory holding ``model`` (a run's ``final/`` -> the run directory).
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    out_dir = Path(out) if out else default_out_dir(model)
    rows = suite.rows()  # fail on bad data before loading any model
    gen = suite.config.generation
    print(
        f"eval {suite.name}: {len(rows)} prompts x {gen.n} sample(s), {model}"
        + (f" against {against}" if against else ""),
        file=sys.stderr,
    )
    engine, tokenizer = load_engine(model, batch_size=gen.batch_size)
    other = load_engine(against, batch_size=gen.batch_size) if against else None
    result = evaluate(suite, engine, tokenizer, against=other, model=model, against_model=against or "")
    return result, write_results(result, out_dir)


# --------------------------------------------------------------------------------------- table


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name.startswith("completion_length/") and not name.endswith("share"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_table(report: dict) -> str:
    """The report as a terminal table: one row per metric, with its interval; B's column too."""
    metrics, intervals = report["metrics"], report.get("intervals", {})
    against = report.get("against") or {}
    counts = report.get("counts", {})
    gen = report.get("generation", {})

    def cell(name, values, ivals) -> str:
        if name not in values:
            return ""
        text = _fmt(name, values[name])
        if name in ivals and None not in ivals[name]:
            low, high = ivals[name]
            text += f" [{_fmt(name, low)}, {_fmt(name, high)}]"
        return text

    head = (
        f"suite {report['suite']}: {counts.get('prompts', '?')} prompts x {gen.get('n', '?')} sample(s), "
        f"temperature {gen.get('temperature', '?')}, max_new_tokens {gen.get('max_new_tokens', '?')}"
    )
    names = list(metrics)
    width = max(len(n) for n in names) + 2 if names else 10
    columns = [report.get("model", "model")] + ([against["model"]] if against else [])
    col = max(24, *(len(c) + 2 for c in columns))
    lines = [head, (f"{'metric':<{width}}" + "".join(f"{c:<{col}}" for c in columns)).rstrip()]
    for name in names:
        row = f"{name:<{width}}{cell(name, metrics, intervals):<{col}}"
        if against:
            row += cell(name, against.get("metrics", {}), against.get("intervals", {}))
        lines.append(row.rstrip())
    if "win_rate" in metrics:
        lines.append(
            f"win_rate = A ({columns[0]}) over B ({columns[-1]}): {counts.get('wins')} wins, "
            f"{counts.get('losses')} losses, {counts.get('ties')} ties (ties count 0.5)"
        )
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
