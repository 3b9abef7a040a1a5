"""Model cards and data cards, written from what runs leave on disk.

    model_card("runs/pipeline/dpo")          # -> runs/pipeline/dpo/MODEL_CARD.md
    data_card("data/gen.jsonl", sources=["prompts.jsonl"], filters=[("dedup", 12)], protocol="judge")

A model card is generated, never typed: every number in it comes from a file of the run or of an
ancestor in its lineage (manifest.json, config.yaml, metrics.jsonl, alerts.jsonl, eval.json), so it
cannot drift from what was trained. It has the intended use (``intended_use`` of the pipeline file,
or the argument, or a default paragraph), every training stage with its data files (sha256, rows)
and key hyper-parameters, evaluation results with their confidence intervals, the held-out metrics
logged last during training, known limitations (a default list, the pipeline's, the argument's) and
every health alert raised along the way.

Evaluation results are read from eval.json in the run directory and, for a run inside a pipeline,
from every eval stage of the pipeline whose model was this run's final/. Three eval.json shapes are
understood: posttrain's own (``metrics`` and ``intervals``: see :mod:`posttrain.eval.suite`), a flat
``{metric: value}``, and ``{metric: {value, low, high}}``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from posttrain.audit.lineage import LineageNode, lineage, run_of
from posttrain.audit.run_dir import read_json, read_jsonl
from posttrain.errors import ConfigError

DEFAULT_INTENDED_USE = (
    "Research and development: this model was produced by posttrain to study post-training methods. "
    "It has not been evaluated for deployment, and nothing below shows it is safe or suitable for use "
    "by or on people. Decide fitness for any other use from the evaluations listed here and your own."
)
DEFAULT_LIMITATIONS = (
    "Trained and evaluated only on the data listed above; behaviour on other tasks, domains and languages "
    "is untested.",
    "Evaluation numbers are estimates on finite held-out sets; the intervals (where shown) cover sampling "
    "noise over prompts, not distribution shift.",
    "The model can state wrong answers fluently; verify its output where correctness matters.",
)
PROXY_LIMITATION = (
    "A learned reward model or an LLM judge scored this model's training or evaluation; such proxies can be "
    "gamed, so gains measured by them can overstate real improvement (reward hacking)."
)
REFUSAL_LIMITATION = (
    "Refusal rates come from a phrase heuristic (posttrain.eval.metrics.is_refusal); check samples by hand "
    "before quoting them."
)
NO_SAFETY_LIMITATION = "No safety or refusal evaluation was run on this model."

# Keys shown as "key hyper-parameters" per algorithm family, from config.yaml (dotted paths).
COMMON_KEYS = (
    "model.path", "model.lora.r", "model.lora.alpha", "data.max_length", "data.packing", "train.lr",
    "train.schedule", "train.warmup_steps", "train.batch_size", "train.micro_batch_size", "train.max_steps",
    "train.epochs", "train.weight_decay", "train.max_grad_norm", "train.precision", "train.seed",
)  # fmt: skip
FAMILY_KEYS = {
    "dpo": (
        "dpo.kind", "dpo.beta", "dpo.label_smoothing", "dpo.gamma", "dpo.tau", "dpo.delta", "dpo.sft_weight",
        "dpo.ref_model",
    ),  # a kind's options are in config.yaml only when the kind takes them
    "reward": ("reward.margin", "reward.center_coef"),
    "kto": ("kto.beta", "kto.desirable_weight", "kto.undesirable_weight"),
    "online": (
        "rl.rewards", "rl.advantage", "rl.scale", "rl.aggregation", "rl.clip_low", "rl.clip_high",
        "rl.kl_coef", "rl.kl_estimator", "rl.epochs", "rl.minibatches", "rl.dynamic_sampling",
        "rollout.prompts_per_step", "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature",
    ),
    "data": ("bundled", "files", "rows", "levels", "seed"),
    "eval": ("suite", "model", "against"),
}  # fmt: skip
ONLINE_ALGORITHMS = (
    "grpo", "dr_grpo", "dapo", "cispo", "gspo", "rloo", "reinforce_pp", "ppo", "distill", "online_dpo",
)  # fmt: skip
FAMILY_KEYS["online_dpo"] = FAMILY_KEYS["online"] + FAMILY_KEYS["dpo"]  # its own family: both sections


# ------------------------------------------------------------------------------------ helpers


def _cell(value: Any) -> str:
    """A markdown table cell: pipes escaped, one line."""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value)
    )
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _get(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def key_hyperparameters(config: Mapping) -> dict[str, Any]:
    """The settings worth reading first, by algorithm family; unset (None) and zero options left out."""
    algorithm = config.get("algorithm")
    if algorithm in ("data", "eval"):
        keys = FAMILY_KEYS[algorithm]
    else:
        family = (
            algorithm if algorithm in FAMILY_KEYS
            else "online" if algorithm in ONLINE_ALGORITHMS
            else "dpo" if algorithm in ("dpo", "orpo", "simpo")
            else algorithm
        )  # fmt: skip
        keys = COMMON_KEYS + FAMILY_KEYS.get(family, ())
    optional = ("dpo.label_smoothing", "dpo.sft_weight", "reward.center_coef", "train.weight_decay")
    out = {}
    for key in keys:
        value = _get(config, key)
        if value is None or value == [] or value == {} or (key in optional and value == 0):
            continue
        if key == "train.epochs" and _get(config, "train.max_steps") is not None:
            continue  # max_steps overrides epochs
        out[key] = value
    return out


def count_rows(path: str | Path) -> int | None:
    """Rows of a jsonl file (non-empty lines), None for other formats or a missing file."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def eval_metrics(report: Mapping) -> list[tuple[str, Any, Any, Any]]:
    """(metric, value, low, high) for each metric of an eval.json in any of the three shapes."""
    if isinstance(report.get("metrics"), Mapping):
        intervals = report.get("intervals") or {}
        out = []
        for name, value in report["metrics"].items():
            low, high = (list(intervals.get(name) or []) + [None, None])[:2]
            out.append((name, value, low, high))
        return out
    out = []
    for name, value in report.items():
        if isinstance(value, Mapping) and "value" in value:
            low, high = value.get("low"), value.get("high")
            if low is None and isinstance(value.get("ci"), (list, tuple)) and len(value["ci"]) == 2:
                low, high = value["ci"]
            out.append((name, value["value"], low, high))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, value, None, None))
    return out


def last_eval(metrics: list[dict]) -> tuple[int | None, dict[str, Any]]:
    """The step and eval/ metrics of the last metrics.jsonl line that has any."""
    for record in reversed(metrics):
        held_out = {k: v for k, v in record.items() if k.startswith("eval/")}
        if held_out:
            return record.get("step"), held_out
    return None, {}


def pipeline_of(run_dir: Path) -> dict:
    """pipeline.json of the pipeline this run is a stage of ({} if none)."""
    return read_json(run_dir.parent / "pipeline.json")


def evaluations(run_dir: Path) -> list[tuple[str, dict]]:
    """(where, eval.json content) of every evaluation of this run's model."""
    out = []
    own = read_json(run_dir / "eval.json")
    if own:
        out.append((str(run_dir / "eval.json"), own))
    for name, stage in (pipeline_of(run_dir).get("stages") or {}).items():
        model = Path(str(stage.get("model") or ""))
        # matched by names, not absolute paths: the pipeline may have run from another directory
        if stage.get("kind") == "eval" and model.name == "final" and model.parent.name == run_dir.name:
            path = run_dir.parent / name / "eval.json"
            report = read_json(path)
            if report:
                out.append((str(path), report))
    return out


# ------------------------------------------------------------------------------------ model card


def model_card(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    intended_use: str | None = None,
    limitations: Sequence[str] = (),
    hash_weights: bool = True,
) -> Path:
    """Write MODEL_CARD.md for a run (or its final/) and return its path.

    Args:
        run_dir: the run directory, or the model directory inside it (RUN/final).
        out: the file to write; default RUN_DIR/MODEL_CARD.md.
        intended_use: replaces the pipeline's ``intended_use`` and the default paragraph.
        limitations: added to the default list and the pipeline's.
        hash_weights: list the sha256 of the final model's files (reads all the weights once).
    """
    run_dir = run_of(run_dir).resolve()
    if not (run_dir / "manifest.json").is_file():
        raise ConfigError(f"{run_dir}: no manifest.json; is this a posttrain run directory?")
    text = "\n".join(model_card_lines(run_dir, intended_use, limitations, hash_weights)) + "\n"
    path = Path(out) if out else run_dir / "MODEL_CARD.md"
    path.write_text(text)
    return path


def model_card_lines(
    run_dir: Path, intended_use: str | None, extra_limitations: Sequence[str], hash_weights: bool
) -> list[str]:
    tree = lineage(run_dir)
    manifest = tree.manifest
    pipeline = pipeline_of(run_dir)
    final = run_dir / "final"
    lines = [f"# Model card: {run_dir.name}", ""]
    facts = [
        ("model", str(final) if final.is_dir() else "(no final/ yet: the run did not finish)"),
        ("algorithm", tree.algorithm),
        ("base model", ", ".join(tree.models) or "-"),
        ("created", manifest.get("created")),
        ("steps", (manifest.get("result") or {}).get("step")),
        ("posttrain", (manifest.get("versions") or {}).get("posttrain")),
        ("git commit", manifest.get("git_commit")),
        ("pipeline", pipeline.get("pipeline")),
        ("sandbox", (manifest.get("sandbox") or {}).get("backend")),
        ("environment", env_card_line(manifest)),
    ]
    lines += [f"- **{k}**: {_cell(v)}" for k, v in facts if v is not None]
    if (manifest.get("sandbox") or {}).get("weak"):
        lines.append(
            "- **warning**: untrusted code (code rewards, agent tools) ran on the weak `process` sandbox "
            "backend, without OS-level isolation"
        )
    lines += [
        "",
        "## Intended use",
        "",
        intended_use or pipeline.get("intended_use") or DEFAULT_INTENDED_USE,
        "",
    ]

    lines += ["## Training stages", ""]
    nodes = tree.walk()
    lines.append(
        f"{len(nodes)} run(s), earliest first; each used the data files listed (sha256 of the bytes read) "
        "and the model of the stage before it."
    )
    for i, node in enumerate(nodes, 1):
        lines += [""] + _stage_lines(i, node)

    lines += ["", "## Evaluation", ""]
    evals = evaluations(run_dir)
    if not evals:
        lines.append("No eval.json found for this model (run `posttrain eval run SUITE --model RUN/final`).")
    for where, report in evals:
        lines += _eval_lines(where, report)

    step, held_out = last_eval(read_jsonl(run_dir / "metrics.jsonl"))
    lines += ["", "## Held-out metrics during training", ""]
    if held_out:
        lines.append(f"Last evaluation logged in metrics.jsonl (step {step}):")
        lines += [""] + _table(["metric", "value"], [(k, _num(v)) for k, v in held_out.items()])
    else:
        lines.append("None logged (no data.eval, or train.eval_every not set).")

    lines += ["", "## Known limitations", ""]
    lines += [f"- {x}" for x in _limitations(nodes, evals, pipeline, extra_limitations)]

    lines += ["", "## Alerts", ""]
    alerts = [(node.name, a) for node in nodes for a in read_jsonl(node.run_dir / "alerts.jsonl")]
    if alerts:
        names = Counter(a.get("rule") for _, a in alerts)
        lines.append(
            "Health alerts raised in this model's lineage: "
            + ", ".join(f"{r} ({n})" for r, n in names.items())
        )
        lines += [""] + _table(
            ["stage", "step", "rule", "action", "message"],
            [(stage, a.get("step"), a.get("rule"), a.get("action"), a.get("message")) for stage, a in alerts],
        )
    else:
        lines.append("No health alert was raised in any stage.")

    lines += ["", "## Reproduce", ""]
    if hash_weights and final.is_dir():
        from posttrain.audit.hashes import model_files, sha256_file

        weights = [(f.name, sha256_file(f)) for f in model_files(final)]
        if weights:
            lines += ["Files of final/:", ""] + _table(["file", "sha256"], weights) + [""]
    versions = manifest.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if manifest.get("command"):
        lines.append(f"- command: `{' '.join(map(str, manifest['command']))}`")
    lines.append(f"- card written {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {run_dir}")
    return lines


def _stage_lines(i: int, node: LineageNode) -> list[str]:
    m = node.manifest
    lines = [f"### {i}. {node.name} ({node.algorithm or 'unknown'})", ""]
    if node.missing:
        return lines + [
            f"Run directory {node.run_dir} is gone; its hashes survive in the next stage's manifest."
        ]
    facts = [("run", node.run_dir), ("created", m.get("created")), ("seed", m.get("seed"))]
    facts += [("steps", (m.get("result") or {}).get("step")), ("model", ", ".join(node.models) or None)]
    lines += [f"- {k}: {_cell(v)}" for k, v in facts if v not in (None, "")]
    counts = m.get("data") or {}
    used = {k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}
    if used:
        lines.append("- examples: " + ", ".join(f"{k} {v}" for k, v in used.items()))
    per_file = {str(Path(e["path"]).resolve()): e.get("rows") for e in (counts.get("files") or {}).values()}
    data = node.data_inputs()
    if data:
        rows = []
        for path, digest in data.items():
            n = per_file.get(str(Path(path).resolve()), count_rows(path))
            rows.append((path, digest, "-" if n is None else n))
        lines += ["", "Data:", ""] + _table(["file", "sha256", "rows"], rows)
    params = key_hyperparameters(node.config or {"algorithm": node.algorithm})
    if params:
        lines += ["", "Key hyper-parameters:", ""] + _table(["setting", "value"], params.items())
    step, held_out = last_eval(read_jsonl(node.run_dir / "metrics.jsonl"))
    if held_out:
        lines += ["", f"Held-out at step {step}: " + ", ".join(f"{k} {_num(v)}" for k, v in held_out.items())]
    return lines


def _eval_lines(where: str, report: Mapping) -> list[str]:
    rows = eval_metrics(report)
    suite = report.get("suite") or Path(where).parent.name
    lines = [
        f"### {suite}",
        "",
        f"From {where}" + (f", model {report['model']}" if report.get("model") else ""),
    ]
    against = report.get("against")
    if isinstance(against, Mapping) and against.get("model"):
        lines.append(f"(win_rate is against {against['model']})")
    counts = report.get("counts") or {}
    if counts.get("prompts"):
        lines.append(f"{counts['prompts']} prompts, {counts.get('samples', '?')} samples.")
    has_ci = any(low is not None for _, _, low, _ in rows)
    if has_ci:
        lines.append("Intervals: 95% bootstrap over prompts unless the suite says otherwise.")
    header = ["metric", "value"] + (["low", "high"] if has_ci else [])
    table = [(name, _num(v), _num(lo), _num(hi))[: len(header)] for name, v, lo, hi in rows]
    lines += [""] + _table(header, table)
    for warning in report.get("warnings") or []:
        lines.append(f"\nwarning: {warning}")
    return lines + [""]


def _limitations(nodes, evals, pipeline: Mapping, extra: Sequence[str]) -> list[str]:
    out = list(DEFAULT_LIMITATIONS)
    uses_proxy = any(
        "reward_model" in json.dumps(n.config.get("rl") or {})
        or "judge" in json.dumps(n.config.get("rl") or {})
        for n in nodes
        if n.algorithm in ONLINE_ALGORITHMS
    ) or any("judge" in json.dumps(r.get("scorers") or []) for _, r in evals)
    if uses_proxy:
        out.append(PROXY_LIMITATION)
    metrics = {name for _, r in evals for name, *_ in eval_metrics(r)}
    out.append(
        REFUSAL_LIMITATION if {"refusal_rate", "over_refusal_rate"} & metrics else NO_SAFETY_LIMITATION
    )
    out += [str(x) for x in pipeline.get("limitations") or []]
    out += [str(x) for x in extra]
    return out


def env_card_line(manifest: dict) -> str | None:
    """The one-line summary of an agent run's environment (manifest "env", written by agents/audit.py); None
    for other runs."""
    env = manifest.get("env")
    if not isinstance(env, dict) or "sources" not in env:
        return None
    parts = [
        f"{env.get('name')} v{env.get('version')}",
        f"{env.get('tasks')} tasks (sha256 {str(env.get('tasks_sha256'))[:12]})",
    ]
    parts += [f"{f} {h[:12]}" for f, h in sorted(env["sources"].items())]
    if env.get("trajectories_sha256"):
        parts.append(
            f"{env.get('episodes')} episodes in {env['trajectories']} (sha256 {env['trajectories_sha256'][:12]})"
        )
    return "; ".join(parts)
