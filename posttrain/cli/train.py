"""``posttrain quickstart`` and ``posttrain train``."""

from __future__ import annotations


def add_parsers(sub) -> None:
    """Add these subcommands to ``posttrain``'s subparsers."""
    q = sub.add_parser(
        "quickstart",
        help="the demo: tiny model through pretraining, SFT, reward model, DPO and GRPO",
        description="Build a tiny tokenizer and Llama-style model, pretrain it on the bundled arithmetic corpus, "
        "fine-tune it (SFT), train a reward model and DPO on gold-scored preference pairs, run GRPO against "
        "the exact-match reward, and print held-out results of every stage; writes report.html and a model "
        "card per stage. The stages are the bundled pipeline posttrain/pipelines/quickstart.yaml (the same "
        "runner as 'posttrain pipeline'). CPU, a few minutes.",
    )
    q.add_argument(
        "--out", default="runs/quickstart", help="directory for all runs and data (default: %(default)s)"
    )
    q.add_argument(
        "--fresh", action="store_true", help="run every stage again instead of reusing finished ones"
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
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run directory from its last complete checkpoint; a config that changes "
        "the result (lr, batch sizes, data, model, seed, algorithm options) is refused unless --allow-changed",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in the run directory and start again (without it, or --resume, an "
        "existing run is refused)",
    )
    t.add_argument(
        "--allow-changed",
        action="append",
        metavar="KEY[,KEY]",
        help="with --resume: accept a change to these config keys or sections, e.g. train.lr or train "
        "(repeatable; recorded in manifest.json)",
    )
    t.set_defaults(func=_train)


def _quickstart(args) -> int:
    from posttrain.quickstart import quickstart

    quickstart(out=args.out, fresh=args.fresh)
    return 0


def _train(args) -> int:
    from posttrain.train import train

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    result = train(
        args.config,
        overrides=overrides,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changed=args.allow_changed or (),
    )
    if result.interrupted:
        print(f"interrupted by {result.interrupted} at step {result.step}; resume with --resume")
        return 130
    print(f"done: {result.step} steps; final model in {result.final}")
    return 0
