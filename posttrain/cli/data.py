"""``posttrain data validate | contamination | dedup``."""

from __future__ import annotations

from collections import Counter


def add_parsers(sub) -> None:
    """Add these subcommands to ``posttrain``'s subparsers."""
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
    _add_flywheel(dsub)


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


def _add_flywheel(dsub) -> None:
    f = dsub.add_parser(
        "flywheel",
        help="product logs -> SFT, preference, KTO, eval and red-team splits (PII scrubbed, deduplicated)",
        description="Turn chat logs (OpenAI-style messages with thumbs, regenerations, edits, flags, consent) into "
        "training splits: consent filter, PII scrubbing, red-team routing, exact + near dedup, held-out eval "
        "prompts and a contamination check against them; a data card per split counts every removal. "
        "See posttrain/flywheel.py for the row format.",
    )
    f.add_argument("logs", nargs="+", help="log files (jsonl, json, parquet)")
    f.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/{sft,preference,kto,eval,redteam}/"
    )
    f.add_argument(
        "--eval-share", type=float, default=0.1, help="share of prompts held out (default: %(default)s)"
    )
    f.add_argument("--against", nargs="+", default=[], metavar="EVAL", help="existing eval sets to keep out")
    f.add_argument("--assume-consent", action="store_true", help="keep rows without consent: true")
    f.add_argument("--review", metavar="PROJECT", help="add the uncertain rows to this collect project")
    f.add_argument(
        "--judge", metavar="MODEL", help="with --review: an LLM judge pre-labels each uncertain row"
    )
    f.add_argument("--rubric", default="default", help="the judge's rubric (default: %(default)s)")
    f.add_argument(
        "--judge-max-new-tokens", type=int, default=256, metavar="N", help="(default: %(default)s)"
    )
    f.set_defaults(func=_flywheel)


def _flywheel(args) -> int:
    import json
    from pathlib import Path

    from posttrain.collect.ingest import send_to_review
    from posttrain.flywheel import flywheel

    report = flywheel(
        args.logs,
        args.out,
        eval_share=args.eval_share,
        against=args.against,
        assume_consent=args.assume_consent,
    )
    print(json.dumps(report, indent=2))
    if args.review and report["uncertain"]:
        from posttrain.cli.collect import project_path

        prelabel = None
        if args.judge:
            from posttrain.rewards.judge import Judge

            judge = Judge.from_pretrained(args.judge, args.rubric, max_new_tokens=args.judge_max_new_tokens)

            def prelabel(prompt, answer):
                r = judge.pointwise([prompt], [answer])[0]
                return {"judge": args.judge, "scores": r.scores, "overall": r.overall, "error": r.error}

        sent = send_to_review(
            project_path(args.review), Path(args.out) / "uncertain.jsonl", prelabel=prelabel
        )
        print(f"{sent['items']} uncertain rows sent to {args.review} for review")
    return 0
