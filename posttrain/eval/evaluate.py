"""Running an eval suite (what a suite is: eval/suite.py): generate with the model (and model B) on the suite's
prompts, score, aggregate with bootstrap intervals, write eval.json and eval_samples.jsonl, print the table."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.errors import ConfigError
from posttrain.eval.metrics import bootstrap_ci, is_refusal, length_stats, pass_at_k, win_rate
from posttrain.eval.suite import (
    GenerationSpec,
    Suite,
    load_suite,
    strict_json,
)
from posttrain.rollout.engine import load_engine

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
