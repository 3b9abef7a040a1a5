"""``posttrain report RUN_DIR``."""

from __future__ import annotations

import argparse


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``posttrain``'s subparsers."""
    p = subparsers.add_parser(
        "report",
        help="write report.html (plots and tables) for a run or a pipeline directory",
        description="Write a self-contained report.html with the curves of every logged metric (alerts "
        "marked), the run's manifest, alerts, eval results, reward-model audit and samples; the plots are "
        "also written as PNG files under RUN_DIR/report/. A directory of stage runs (posttrain quickstart's "
        "output) gets one report with a section per stage. Prints the path of the HTML file.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a directory of stage runs")
    p.add_argument("--out", metavar="FILE", help="the HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=_report)
    return p


def _report(args) -> int:
    from posttrain.report.page import write_report

    print(write_report(args.run_dir, args.out))
    return 0
