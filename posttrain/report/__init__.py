"""The run report: ``posttrain report RUN_DIR`` writes RUN_DIR/report.html and its plots.

    from posttrain.report import write_report
    write_report("runs/grpo")              # -> runs/grpo/report.html, runs/grpo/report/*.png
    write_report("runs/quickstart")        # a directory of stage runs: one section per stage

What it reads from a run directory (all optional but metrics.jsonl or manifest.json):
metrics.jsonl (curves and a table of every metric), alerts.jsonl (dashed lines on every
plot and a table), manifest.json and config.yaml (algorithm, model, input files with their
sha256, versions, parent runs), eval.json, rm_audit.json / rm_audit.png, samples.jsonl (the
best and worst samples of the last step) and, at a pipeline's root, summary.json.

The HTML is self-contained: plots are base64 data URIs, CSS is inline, nothing is fetched.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "write_report"]


def __getattr__(name: str):
    # write_report (matplotlib, numpy) is imported on first use, so that adding the subcommand
    # to `posttrain`'s parser costs nothing for the other commands.
    if name == "write_report":
        from posttrain.report.page import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_parser(subparsers) -> argparse.ArgumentParser:
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
