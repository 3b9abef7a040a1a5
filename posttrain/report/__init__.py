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

__all__ = ["write_report"]


def __getattr__(name: str):
    # write_report (matplotlib, numpy) is imported on first use, so that importing the package
    # (the CLI does) costs nothing for the other commands.
    if name == "write_report":
        from posttrain.report.page import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
