"""The `posttrain` command.

    posttrain quickstart [--out DIR]            the demo: build a tiny model, pretrain it, SFT it, compare
    posttrain train CONFIG.yaml [--set k=v]     run one stage (the config names the algorithm)
    posttrain data validate FILE [--kind K]     check a dataset file; errors name file, line and field
    posttrain eval rm --model DIR [--data F]    audit a reward model: accuracy, calibration, biases
    posttrain report RUN_DIR                    report.html (plots, tables, alerts) of a run or a pipeline
    posttrain pipeline PIPELINE.yaml [--until S|--only S] [--fresh] [--dry-run]   multi-stage run, finished stages reused
    posttrain generate best-of-n|constitutional|label ...   SFT / preference data with AI feedback, data card
    posttrain card RUN_DIR                      MODEL_CARD.md: stages, data hashes, hyper-parameters, evals, alerts
    posttrain lineage RUN_DIR [--json]          runs and input files (sha256) a run descends from
    posttrain eval run SUITE --model DIR [--against DIR] [--out DIR] [--baseline EVAL.json --gates G.yaml]
                                                run an eval suite (YAML file or bundled name), write eval.json
    posttrain eval SUITE.yaml --model DIR ...   the same: a .yaml first argument after 'eval' means 'run'
    posttrain eval gates --current EVAL.json [--baseline EVAL.json] --gates G.yaml
                                                regression gates; exit code 1 when one fails
    posttrain eval judge --model DIR --labels F a judge model's agreement with human labels (kappa)
    posttrain env list | env check ENV          agent environments; golden trajectories and hack probes

Errors caused by input (config, data, paths) are printed as one clear message, exit code 2.
A failed regression gate exits with code 1.
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


def _contamination(args) -> int:
    import json

    from posttrain.data.quality import contamination_report

    report = contamination_report(
        args.train, args.against, field=args.field, eval_field=args.eval_field, n=args.n, unit=args.unit,
        threshold=args.threshold,
    )  # fmt: skip
    flagged = report["rows"]
    print(
        f"{report['eval_rows']} eval rows against {report['train_rows']} training rows ({args.n}-{args.unit} "
        f"overlap): {len(flagged)} flagged"
    )
    for row in flagged[:20]:
        print(f"  {row['eval']}: {row['share']:.0%} of its n-grams also in {row['train']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 1 if flagged and args.fail else 0


def _dedup(args) -> int:
    from posttrain.data.quality import dedup_files

    report = dedup_files(
        args.files, out=args.out, field=args.field, near=not args.exact, threshold=args.threshold
    )
    print(f"{report['rows']} rows: {report['kept']} kept, {report['removed']} duplicates removed")
    for group in report["groups"][:10]:
        print("  " + " = ".join(group))
    if args.out:
        print(f"wrote {args.out}")
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


def _eval_run(args) -> int:
    from posttrain.errors import ConfigError
    from posttrain.eval.suite import format_table, run_suite

    if args.baseline and not args.gates:
        raise ConfigError("--baseline is only used with --gates")
    if args.gates:  # a broken gates file should fail before minutes of generation, not after
        from posttrain.eval.gates import load_gates

        load_gates(args.gates)
    result, path = run_suite(args.suite, args.model, against=args.against, out=args.out)
    print(format_table(result.report))
    print(f"wrote {path} and {path.with_name('eval_samples.jsonl')}")
    if not args.gates:
        return 0
    return _gates_exit(args.gates, result.report["metrics"], args.baseline)


def _gates_exit(gates: str, current, baseline) -> int:
    from posttrain.eval.gates import format_gates, run_gates

    results, passed = run_gates(gates, current, baseline)
    print(format_gates(results))
    return 0 if passed else 1


def _eval_gates(args) -> int:
    return _gates_exit(args.gates, args.current, args.baseline)


def _eval_judge(args) -> int:
    import json
    from pathlib import Path

    from posttrain.eval.judge import Judge, agreement, load_rubric, read_labels
    from posttrain.eval.suite import strict_json

    read_labels(args.labels, load_rubric(args.rubric))  # bad input fails before the model loads
    judge = Judge.from_pretrained(args.model, args.rubric, max_new_tokens=args.max_new_tokens)
    result = agreement(judge, args.labels, swap=not args.no_swap, inconsistent=args.inconsistent)
    for key, value in result.items():
        print(f"  {key:<16}{value:.3f}" if isinstance(value, float) else f"  {key:<16}{value}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "judge_agreement.json").write_text(json.dumps(strict_json(result), indent=2) + "\n")
        print(f"wrote {out / 'judge_agreement.json'}")
    return 0


def _eval_shorthand(argv: list[str]) -> list[str]:
    """`posttrain eval SUITE.yaml ...` is `posttrain eval run SUITE.yaml ...`."""
    if len(argv) >= 2 and argv[0] == "eval" and argv[1].endswith((".yaml", ".yml")):
        return ["eval", "run", *argv[1:]]
    return argv


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
        help="the demo: tiny model through pretraining, SFT, reward model, DPO and GRPO",
        description="Build a tiny tokenizer and Llama-style model, pretrain it on the bundled arithmetic corpus, "
        "fine-tune it (SFT), train a reward model and DPO on gold-scored preference pairs, run GRPO against "
        "the exact-match reward, and print held-out results of every stage; writes report.html and a model "
        "card. CPU, a few minutes.",
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

    c = dsub.add_parser(
        "contamination",
        help="long n-gram overlap of eval rows with training data",
        description="Report, per eval row, the share of its long n-grams (13 words by default) that also occur "
        "in the training files, and the training row it overlaps most.",
    )
    c.add_argument("train", nargs="+", help="training data file(s)")
    c.add_argument("--against", nargs="+", required=True, metavar="EVAL", help="eval data file(s)")
    c.add_argument("--field", help="text field of training rows (default: text, messages, prompt+completion)")
    c.add_argument("--eval-field", help="text field of eval rows (default: --field)")
    c.add_argument("-n", type=int, default=13, help="n-gram length (default: %(default)s)")
    c.add_argument("--unit", choices=["word", "char"], default="word", help="n-grams of words or characters")
    c.add_argument("--threshold", type=float, default=0.0, help="flag rows whose overlap share exceeds this")
    c.add_argument("--out", help="write the full report as JSON")
    c.add_argument("--fail", action="store_true", help="exit 1 when any eval row is flagged (for CI)")
    c.set_defaults(func=_contamination)

    dd = dsub.add_parser(
        "dedup",
        help="remove exact and near-duplicate rows",
        description="Find exact (normalised text) and near duplicates (MinHash over shingles, verified by exact "
        "Jaccard) across the files; keep the first of each group.",
    )
    dd.add_argument("files", nargs="+")
    dd.add_argument("--out", help="write the kept rows here (jsonl)")
    dd.add_argument("--field", help="text field (default: text, messages, prompt+completion)")
    dd.add_argument(
        "--threshold", type=float, default=0.8, help="near-duplicate Jaccard (default: %(default)s)"
    )
    dd.add_argument("--exact", action="store_true", help="exact duplicates only")
    dd.set_defaults(func=_dedup)

    e = sub.add_parser(
        "eval",
        help="eval suites, regression gates, LLM judges, reward-model audits",
        description="Evaluation and audits. 'posttrain eval SUITE.yaml ...' is short for "
        "'posttrain eval run SUITE.yaml ...'.",
    )
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

    run = esub.add_parser(
        "run",
        help="run an eval suite on a model: accuracy, pass@k, reward, lengths, refusals, win rate",
        description="Generate with the model on the suite's prompts, score, and write eval.json (metrics with "
        "bootstrap intervals) and eval_samples.jsonl; print a table. 'posttrain eval SUITE.yaml ...' is the "
        "same command. With --gates, also check regression gates and exit 1 when one fails.",
    )
    run.add_argument("suite", help="suite YAML file, or a bundled suite: arithmetic, harmful, over_refusal")
    run.add_argument(
        "--model", required=True, metavar="DIR", help="model directory (a run's final/) or hub name"
    )
    run.add_argument(
        "--against",
        metavar="DIR",
        help="model B: evaluated on the same prompts; reports the win rate of --model over it",
    )
    run.add_argument(
        "--out", metavar="DIR", help="where to write eval.json (default: the directory holding --model)"
    )
    run.add_argument("--baseline", metavar="EVAL_JSON", help="with --gates: the eval.json to compare with")
    run.add_argument("--gates", metavar="GATES_YAML", help="regression gates to check the results against")
    run.set_defaults(func=_eval_run)

    g = esub.add_parser(
        "gates",
        help="check regression gates on an eval.json (exit code 1 when one fails)",
        description="Compare an eval.json with absolute bounds (min, max) and with a baseline eval.json "
        "(max_drop, max_rise); print a pass/fail table; exit code 1 when any gate fails, 0 when all pass.",
    )
    g.add_argument("--current", required=True, metavar="EVAL_JSON", help="the results to check")
    g.add_argument("--baseline", metavar="EVAL_JSON", help="the results to compare with (relative gates)")
    g.add_argument("--gates", required=True, metavar="GATES_YAML", help="the gates file")
    g.set_defaults(func=_eval_gates)

    j = esub.add_parser(
        "judge",
        help="measure an LLM judge against human labels: Cohen's kappa, position-swap consistency",
        description="Judge a labelled file with a local model and report agreement with the human labels. "
        "Pairwise rows: prompt, completion_a, completion_b, label (A, B or tie); pointwise rows: prompt, "
        "completion, label (a score on the rubric's scale).",
    )
    j.add_argument("--model", required=True, metavar="DIR", help="the judge model (directory or hub name)")
    j.add_argument(
        "--labels", required=True, metavar="FILE", help="human-labelled rows (jsonl, json, csv, parquet)"
    )
    j.add_argument("--rubric", default="default", help="rubric YAML or bundled name (default: %(default)s)")
    j.add_argument(
        "--inconsistent",
        choices=["tie", "drop"],
        default="tie",
        help="pairwise: a verdict that flips when the answers swap places becomes a tie or is dropped "
        "(default: %(default)s)",
    )
    j.add_argument("--no-swap", action="store_true", help="pairwise: judge each pair in one order only")
    j.add_argument(
        "--max-new-tokens", type=int, default=256, metavar="N", help="judge budget (default: %(default)s)"
    )
    j.add_argument("--out", metavar="DIR", help="also write judge_agreement.json there")
    j.set_defaults(func=_eval_judge)
    from posttrain.agents.cli import add_parser as add_env_parser
    from posttrain.audit import add_parser as add_audit_parser
    from posttrain.generate import add_parser as add_generate_parser
    from posttrain.pipeline import add_parser as add_pipeline_parser
    from posttrain.report import add_parser as add_report_parser

    add_pipeline_parser(sub)
    add_generate_parser(sub)  # generate best-of-n | constitutional | label
    add_report_parser(sub)
    add_audit_parser(sub)  # card, lineage
    add_env_parser(sub)  # env list | env check ENV
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(_eval_shorthand(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except PosttrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
