"""``posttrain pipeline PIPELINE.yaml``."""

from __future__ import annotations

import argparse

from posttrain.pipeline import (
    STATE,
    GatesFailed,
    PipelineInterrupted,
    load_pipeline,
    plan_status,
    run_pipeline,
    select,
)


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Add the ``pipeline`` subcommand to ``posttrain``'s subparsers."""
    p = subparsers.add_parser(
        "pipeline",
        help="run a multi-stage pipeline (data, SFT, RM, DPO, RL, eval, gates), reusing finished stages",
        description="Run the stages of a pipeline YAML in order, each into OUT/STAGE. Finished stages (same "
        "config, same upstream) are reused; a failed or interrupted stage resumes from its last checkpoint. "
        "Every reference between stages is checked before anything runs. State: OUT/pipeline.json.",
    )
    p.add_argument("pipeline", metavar="PIPELINE.yaml")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--until", metavar="STAGE", help="run the stages up to and including STAGE")
    which.add_argument(
        "--only", metavar="STAGE", help="run STAGE only (a base name: every round; a group: all of it)"
    )
    p.add_argument("--fresh", action="store_true", help="run the selected stages again from scratch")
    p.add_argument("--out", help="output directory (overrides the file's 'out')")
    p.add_argument(
        "--set",
        action="append",
        metavar="STAGE.KEY=VALUE",
        help="override a stage's key, e.g. --set sft.train.lr=1e-4 (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would run, reuse or resume, and stop")
    p.set_defaults(func=_pipeline_command)
    return p


def _pipeline_command(args) -> int:
    pipe = load_pipeline(args.pipeline, out=args.out, overrides=args.set or ())
    if args.dry_run:
        chosen = {s.name for s in select(pipe, until=args.until, only=args.only)}
        for s in pipe.stages:
            what = plan_status(s, args.fresh) if s.name in chosen else "skip"
            print(f"  {s.name:<20}{s.kind:<7}{what:<8}{s.run_dir}")
        return 0
    try:
        outcome = run_pipeline(pipe, until=args.until, only=args.only, fresh=args.fresh)
    except PipelineInterrupted as e:
        print(f"interrupted: {e}")
        return 130
    except GatesFailed as e:
        print(f"gates failed: {e}")
        return 1
    ran = sum(v != "reused" for v in outcome.values())
    print(f"pipeline done: {ran} stage(s) run, {len(outcome) - ran} reused; state in {pipe.out / STATE}")
    return 0
