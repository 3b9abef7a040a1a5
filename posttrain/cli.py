"""The `posttrain` command.

    posttrain quickstart [--out DIR]            the demo: build a tiny model, pretrain it, SFT it, compare
    posttrain train CONFIG.yaml [--set k=v]     run one stage (the config names the algorithm)
    posttrain data validate FILE [--kind K]     check a dataset file; errors name file, line and field
    posttrain eval rm --model DIR [--data F]    audit a reward model: accuracy, calibration, biases

Errors caused by input (config, data, paths) are printed as one clear message, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from posttrain import __version__
from posttrain.errors import PosttrainError


def _quickstart(args) -> int:
    from posttrain.quickstart import quickstart

    quickstart(out=args.out, fresh=args.fresh)
    return 0


def _train(args) -> int:
    from posttrain.train import train

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    result = train(args.config, overrides=overrides, resume=args.resume)
    if result.interrupted:
        print(f"interrupted by {result.interrupted} at step {result.step}; resume with --resume")
        return 130
    print(f"done: {result.step} steps; final model in {result.final}")
    return 0


def _validate(args) -> int:
    from posttrain.data.schemas import detect_kind, load_rows

    rows = load_rows(args.file, args.kind)
    kind = args.kind or detect_kind(rows[0][1])
    print(f"{args.file}: {len(rows)} valid {kind} rows")
    shapes = Counter(" + ".join(k for k in sorted(row) if not k.startswith("_")) for _, row in rows)
    for shape, n in shapes.most_common(5):
        print(f"  {n:>8}  {shape}")
    if args.tokenizer:
        _length_report(rows, kind, args)
    return 0


def _length_report(rows, kind, args) -> None:
    """Token lengths with a real tokenizer, and the rows a max_length would reject."""
    from posttrain.config import ModelConfig
    from posttrain.data.templates import encode_sft_row
    from posttrain.models import load_tokenizer

    if kind != "sft":
        print("  (token lengths are reported for sft rows only)")
        return
    tok = load_tokenizer(ModelConfig(path=args.tokenizer))
    lengths, too_long = [], []
    for loc, row in rows:
        ex = encode_sft_row(row, tok, max_length=10**9, truncation="error", where=str(loc))
        lengths.append(len(ex.input_ids))
        if args.max_length and len(ex.input_ids) > args.max_length:
            too_long.append(str(loc))
    lengths.sort()
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    print(f"  tokens: min {lengths[0]}, median {pct(0.5)}, p95 {pct(0.95)}, max {lengths[-1]}")
    if args.max_length:
        print(
            f"  {len(too_long)} row(s) longer than {args.max_length}"
            + (f": {', '.join(too_long[:10])}" if too_long else "")
        )


def _eval_rm(args) -> int:
    from pathlib import Path

    from posttrain.algorithms.reward import RewardModel
    from posttrain.data.schemas import load_rows
    from posttrain.eval.rm_audit import audit_reward_model, format_report
    from posttrain.tasks import preference

    pairs = (
        [row for _, row in load_rows(args.data, "preference")]
        if args.data
        else preference.preference_eval_rows()
    )
    probes = preference.audit_rows(n_per_level=args.probes_per_level)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    report = audit_reward_model(RewardModel.from_pretrained(args.model), pairs, probes, out_dir=out)
    print(format_report(report))
    print(f"wrote {out / 'rm_audit.json'} and {out / 'rm_audit.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for Hugging Face causal LMs: SFT, reward models, DPO family, PPO/GRPO family.",
        epilog="Run 'posttrain COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quickstart",
        help="the demo: tiny model, pretraining, SFT, held-out accuracy before and after",
        description="Build a tiny tokenizer and Llama-style model, pretrain it on the bundled arithmetic corpus, "
        "fine-tune it (SFT) and print held-out exact-match accuracy before and after. CPU, a few minutes.",
    )
    q.add_argument(
        "--out", default="runs/quickstart", help="directory for all runs and data (default: %(default)s)"
    )
    q.add_argument(
        "--fresh", action="store_true", help="rebuild everything instead of reusing finished stages"
    )
    q.set_defaults(func=_quickstart)

    t = sub.add_parser(
        "train",
        help="run one training stage from a YAML config",
        description="Run one stage from a YAML config (the config's 'algorithm' names the objective). "
        "Under 'accelerate launch' the same command runs data-parallel.",
    )
    t.add_argument("config", help="YAML config file (see examples/)")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    t.add_argument("--out", help="run directory (overrides the config's 'out')")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.set_defaults(func=_train)

    d = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    v = dsub.add_parser(
        "validate",
        help="check a dataset file against its schema",
        description="Read a jsonl / json / parquet / csv file or a saved HF dataset, validate every row, and "
        "report all problems with file, line and field. Exit code 2 if any row is bad.",
    )
    v.add_argument("file")
    v.add_argument(
        "--kind", choices=["sft", "preference", "feedback", "prompt"], help="row schema (default: detected)"
    )
    v.add_argument("--tokenizer", help="also report token lengths with this tokenizer (path)")
    v.add_argument("--max-length", type=int, help="with --tokenizer: list the rows longer than this")
    v.set_defaults(func=_validate)

    e = sub.add_parser("eval", help="evaluation and audits", description="Evaluation and audits.")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    r = esub.add_parser(
        "rm",
        help="audit a reward model: held-out accuracy, calibration, length/boilerplate/refusal biases",
        description="Score held-out pairs and the bundled bias probes with a reward model; print a table and "
        "write rm_audit.json and rm_audit.png.",
    )
    r.add_argument("--model", required=True, metavar="DIR", help="reward model directory (a run's final/)")
    r.add_argument(
        "--data",
        metavar="FILE",
        help="held-out preference pairs (default: the bundled arithmetic eval pairs)",
    )
    r.add_argument(
        "--out",
        metavar="DIR",
        help="directory for rm_audit.json/.png (default: the directory holding --model)",
    )
    r.add_argument(
        "--probes-per-level",
        type=int,
        metavar="N",
        default=100,
        help="probe pairs per level and probe (default: %(default)s)",
    )
    r.set_defaults(func=_eval_rm)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PosttrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
