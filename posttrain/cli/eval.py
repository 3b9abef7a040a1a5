"""``posttrain eval rm | run | gates | judge`` (``posttrain eval SUITE.yaml`` is ``eval run``)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    """Add these subcommands to ``posttrain``'s subparsers."""
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


def _eval_rm(args) -> int:
    from pathlib import Path

    from posttrain.data.schemas import load_rows
    from posttrain.eval.rm_audit import audit_reward_model, format_report
    from posttrain.rewards.model import RewardModel
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
    from posttrain.eval.evaluate import format_table, run_suite

    if args.baseline and not args.gates:
        raise ConfigError("--baseline is only used with --gates")
    if args.gates:  # a broken gates file (or a misspelt metric) fails before minutes of generation
        from posttrain.eval.gates import check_metric_names, load_gates, suite_metric_names
        from posttrain.eval.suite import load_suite

        known = suite_metric_names(load_suite(args.suite), against=args.against is not None)
        check_metric_names(load_gates(args.gates), known, args.gates)
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


def shorthand(argv: list[str]) -> list[str]:
    """`posttrain eval SUITE.yaml ...` is `posttrain eval run SUITE.yaml ...`."""
    if len(argv) >= 2 and argv[0] == "eval" and argv[1].endswith((".yaml", ".yml")):
        return ["eval", "run", *argv[1:]]
    return argv
