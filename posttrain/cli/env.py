"""``posttrain env list`` and ``posttrain env check ENV``."""

from __future__ import annotations

import argparse


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Add the ``env`` subcommand to ``posttrain``'s subparsers."""
    p = subparsers.add_parser(
        "env",
        help="agent environments: list them, check their graders",
        description="Agent environments (posttrain.agents).",
    )
    sub = p.add_subparsers(dest="env_command", required=True, metavar="ENV_COMMAND")
    ls = sub.add_parser("list", help="the bundled environments and their tools")
    ls.set_defaults(func=_list)
    c = sub.add_parser(
        "check",
        help="golden trajectories must score 1, hack probes 0 with their label",
        description="Runs the scripted optimal policy on train and held-out tasks and every hack probe, "
        "through the episode runner with the tiny tokenizer (or --tokenizer). Exit code 1 when a row fails.",
    )
    c.add_argument("env", metavar="ENV", help="a bundled name (posttrain env list) or module:Class")
    c.add_argument("--n", type=int, default=3, help="tasks per split (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="task seed (default: %(default)s)")
    c.add_argument("--format", default="tiny", help="tool-call format: tiny or hermes (default: %(default)s)")
    c.add_argument(
        "--tokenizer", metavar="DIR", help="a tokenizer with a chat template (default: the tiny one)"
    )
    c.set_defaults(func=_check)
    d = sub.add_parser(
        "demos",
        help="SFT rows from golden trajectories (jsonl)",
        description="Runs the environment's scripted optimal policy on generated tasks through the episode "
        "runner and writes the passing episodes as chat rows ({messages, tools}) for an SFT stage.",
    )
    d.add_argument("env", metavar="ENV", help="a bundled name (posttrain env list) or module:Class")
    d.add_argument("--out", required=True, metavar="FILE", help="the jsonl file to write")
    d.add_argument("--n", type=int, default=256, help="tasks (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="task seed (default: %(default)s)")
    d.add_argument("--split", default="train", choices=("train", "held_out"), help="(default: %(default)s)")
    d.add_argument("--format", default="tiny", help="tool-call format: tiny or hermes (default: %(default)s)")
    d.add_argument(
        "--tokenizer", metavar="DIR", help="a tokenizer with a chat template (default: the tiny one)"
    )
    d.set_defaults(func=_demos)
    return p


def _demos(args) -> int:
    import json
    from pathlib import Path

    from posttrain.agents.demos import demo_rows

    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from posttrain.tasks.tiny import build_tokenizer

        tokenizer = build_tokenizer()
    rows = demo_rows(args.env, tokenizer, n=args.n, seed=args.seed, split=args.split, tool_format=args.format)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.env}: {len(rows)} of {args.n} golden episodes written to {out}")
    return 0


def _list(args) -> int:
    from posttrain.agents.envs import BUNDLED, get_env

    for name in BUNDLED:
        cls = get_env(name)
        tools = ", ".join(cls.tool_names())
        print(f"{name:<12} {(cls.__doc__ or '').strip().splitlines()[0]}\n{'':<12} tools: {tools}")
    return 0


def _check(args) -> int:
    from posttrain.agents.check import check_env

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = check_env(args.env, n=args.n, seed=args.seed, tokenizer=tokenizer, tool_format=args.format)
    for r in rows:
        mark = "ok  " if r.ok else "FAIL"
        want = "1.0, no failure" if r.script == "golden" else f"0.0, {r.expected}"
        got = f"{r.reward:.1f}, {r.failure}" if r.script != "split" else ""
        print(f"{mark} {r.script:<20} {r.task_id:<26} want {want:<34} got {got:<34} {r.detail}"[:200])
    bad = sum(not r.ok for r in rows)
    print(f"{args.env}: {len(rows) - bad}/{len(rows)} checks passed")
    return 1 if bad else 0
