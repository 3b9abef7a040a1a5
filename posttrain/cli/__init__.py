"""The `posttrain` command.

    posttrain quickstart [--out DIR]            the demo: build a tiny model, pretrain it, SFT it, compare
    posttrain train CONFIG.yaml [--set k=v]     run one stage (the config names the algorithm)
              [--resume [--allow-changed K] | --overwrite]   continue or replace an existing run
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
    posttrain collect init|serve|export|...     human feedback web app: compare, rate, edit; agreement, leaderboard
    posttrain replay RUN_DIR --regrade|--execute|--to-sft F|--to-dpo F   re-grade, re-run or reuse agent episodes

Errors caused by input (config, data, paths) are printed as one clear message, exit code 2.
A failed regression gate exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain import __version__
from posttrain.cli import audit, collect, data, env, generate, pipeline, replay, report, train
from posttrain.cli import eval as eval_
from posttrain.errors import PosttrainError

GROUPS = (train, data, eval_, pipeline, generate, report, audit, env, collect, replay)
"""One module per command group, each with ``add_parsers(subparsers)``; a new group is one more line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for Hugging Face causal LMs: SFT, reward models, DPO family, PPO/GRPO family.",
        epilog="Run 'posttrain COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(eval_.shorthand(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except PosttrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
