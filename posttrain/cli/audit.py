"""``posttrain card RUN_DIR`` and ``posttrain lineage RUN_DIR``."""

from __future__ import annotations

import argparse
import json

from posttrain.audit import lineage, model_card


def add_parsers(subparsers) -> None:
    """Add the ``card`` and ``lineage`` subcommands to ``posttrain``'s subparsers."""
    c = subparsers.add_parser(
        "card",
        help="write MODEL_CARD.md for a run: stages, data hashes, hyper-parameters, evals, alerts",
        description="Write MODEL_CARD.md from the run's files and its lineage: intended use, every training "
        "stage with its data files (sha256, rows) and key hyper-parameters, evaluation results with "
        "confidence intervals, held-out metrics, known limitations and the health alerts raised.",
    )
    c.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its final/)")
    c.add_argument("--out", metavar="FILE", help="the file to write (default: RUN_DIR/MODEL_CARD.md)")
    c.add_argument("--intended-use", metavar="TEXT", help="replaces the pipeline's or the default paragraph")
    c.add_argument(
        "--limitation",
        action="append",
        default=[],
        metavar="TEXT",
        help="add a known limitation (repeatable)",
    )
    c.add_argument("--no-hash", action="store_true", help="do not list the sha256 of final/'s files")
    c.set_defaults(func=_card)

    g = subparsers.add_parser(
        "lineage",
        help="print the runs and input files (sha256) a run descends from",
        description="Follow manifest.json 'parents' from a run back to every input file, with its sha256.",
    )
    g.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its final/)")
    g.add_argument("--json", action="store_true", help="print the tree as JSON (with each run's config)")
    g.set_defaults(func=_lineage)


def _card(args: argparse.Namespace) -> int:
    path = model_card(
        args.run_dir,
        out=args.out,
        intended_use=args.intended_use,
        limitations=args.limitation,
        hash_weights=not args.no_hash,
    )
    print(path)
    return 0


def _lineage(args: argparse.Namespace) -> int:
    tree = lineage(args.run_dir)
    print(json.dumps(tree.to_dict(), indent=2) if args.json else tree.format())
    return 0
