"""``posttrain replay RUN_DIR --regrade | --execute | --to-sft FILE | --to-dpo FILE``."""

from __future__ import annotations

import argparse


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Add the ``replay`` subcommand to ``posttrain``'s subparsers."""
    p = subparsers.add_parser(
        "replay",
        help="agent runs: regrade, re-execute, or export stored episodes as SFT / DPO data",
        description="Reads RUN_DIR/trajectories.jsonl and the run's config.yaml (its env section; task rows "
        "from its data files or the environment's generator). --regrade: today's grader on the state the "
        "recorded actions reach, a table of the episodes whose grade changed. --execute: re-run every "
        "recorded action in a fresh environment and report each observation, state key or grade that "
        "differs, by episode (step/index), turn and tool. Exit code 1 when anything differs. --to-sft / "
        "--to-dpo write successful episodes as SFT rows, success-vs-failure pairs on the same task as "
        "preference rows, with provenance and a DATA_CARD.md.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="an agent run directory (or its trajectories.jsonl)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--regrade", action="store_true", help="today's grader; diff table episode/old/new")
    what.add_argument("--execute", action="store_true", help="re-run the actions; diff every observation")
    what.add_argument("--to-sft", metavar="FILE", help="SFT rows (jsonl) of the successful episodes")
    what.add_argument(
        "--to-dpo", metavar="FILE", help="preference rows (jsonl): success vs failure, same task"
    )
    p.add_argument("--tasks", nargs="+", metavar="FILE", help="task rows (jsonl) in place of the run's own")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per environment call (default: %(default)s)"
    )
    p.add_argument(
        "--max-pairs", type=int, default=4, help="--to-dpo: pairs per task at most (default: %(default)s)"
    )
    p.set_defaults(func=_replay)
    return p


def _replay(args) -> int:
    from posttrain.agents import replay

    if args.to_sft or args.to_dpo:
        from posttrain.agents.export import export

        out, n, card = export(args.run_dir, sft=args.to_sft, dpo=args.to_dpo, max_pairs=args.max_pairs)
        print(f"{n} rows written to {out} (data card {card})")
        return 0
    for change in replay.environment_changes(args.run_dir, args.tasks):
        print(f"environment changed since the run: {change}")
    results = replay.replay_run(args.run_dir, tasks_files=args.tasks, timeout=args.timeout)
    skipped = [r for r in results if r.skipped]
    ran = len(results) - len(skipped)
    if args.regrade:
        rows = replay.regrade_rows(results)
        if rows:
            print(replay.table(["episode", "task", "old", "new", "note"], rows))
        print(f"regrade: {len(rows)} of {ran} episodes changed grade ({len(skipped)} skipped)")
        return 1 if rows else 0
    diffs = [d for r in results for d in r.diffs]
    if diffs:
        rows = [[d.episode, d.turn, d.what, d.tool or "-", d.recorded, d.replayed] for d in diffs]
        print(replay.table(["episode", "turn", "what", "tool", "recorded", "replayed"], rows))
        tools = sorted({d.tool for d in diffs if d.tool})
        if tools:
            print(f"nondeterministic (or changed) tools: {', '.join(tools)}")
    bad = sum(bool(r.diffs) for r in results)
    print(
        f"execute: {ran - bad} of {ran} episodes reproduced every observation and grade ({len(skipped)} skipped)"
    )
    for r in skipped[:5]:
        print(f"  skipped {r.record.name}: {r.skipped}")
    return 1 if diffs else 0
