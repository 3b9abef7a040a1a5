"""Reading run directories for the report. Every file is optional except that a run has a
metrics.jsonl or a manifest.json; a file that is half written (a run still going, or killed
mid-line) loses only its broken lines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.audit.run_dir import RunDir, parse_line, read_json

# Logged with every step but not worth a curve: the x axis, wall-clock time, a running count.
NOT_PLOTTED = frozenset({"step", "time", "tokens", "epoch"})


@dataclass
class RunData:
    """What the report shows of one run directory."""

    path: Path
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl, in order
    alerts: list[dict] = field(default_factory=list)  # alerts.jsonl: step, rule, message, action
    manifest: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    config_text: str = ""
    eval: dict | None = None  # eval.json
    rm_audit: dict | None = None  # rm_audit.json
    rm_audit_png: Path | None = None
    summary: dict | None = None  # summary.json (the quickstart writes one at the pipeline root)
    samples: list[dict] = field(default_factory=list)  # samples.jsonl lines of the last step

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def algorithm(self) -> str | None:
        return self.manifest.get("algorithm") or self.config.get("algorithm")

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.metrics if isinstance(r.get("step"), int)]
        return max(steps) if steps else None

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        """Every numeric metric as (steps, values), finite values only, in log order."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for record in self.metrics:
            step = record.get("step")
            if not isinstance(step, int):
                continue
            for name, value in record.items():
                if name in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    steps, values = out.setdefault(name, ([], []))
                    steps.append(step)
                    values.append(float(value))
        return out

    def nonfinite(self) -> dict[str, list[int]]:
        """Steps at which a metric was logged as NaN or +-Inf (json.dumps writes them bare)."""
        out: dict[str, list[int]] = {}
        for record in self.metrics:
            for name, value in record.items():
                if isinstance(value, float) and not math.isfinite(value) and name not in NOT_PLOTTED:
                    out.setdefault(name, []).append(record.get("step"))
        return out


def is_run(path: Path) -> bool:
    return RunDir(path).is_run


def stage_dirs(path: Path) -> list[Path]:
    """The run directories directly inside a pipeline directory, in the order they ran (the
    manifest's creation time; directories without one last, by name)."""
    stages = [d for d in sorted(path.iterdir()) if d.is_dir() and is_run(d)]
    created = {d: str(RunDir(d).manifest.get("created") or "~") for d in stages}
    return sorted(stages, key=lambda d: (created[d], d.name))


def load_run(path: Path) -> RunData:
    run = RunDir(path)
    png = path / "rm_audit.png"
    return RunData(
        path=path,
        metrics=run.metrics,
        alerts=[a for a in run.alerts if isinstance(a.get("step"), int)],
        manifest=run.manifest,
        config=run.config,
        config_text=run.config_text,
        eval=run.eval or None,
        rm_audit=read_json(path / "rm_audit.json") or None,
        rm_audit_png=png if png.is_file() else None,
        summary=read_json(path / "summary.json") or None,
        samples=last_step_samples(path / "samples.jsonl"),
    )


def last_step_samples(path: Path, *, max_bytes: int = 64 << 20) -> list[dict]:
    """The samples.jsonl lines of the last step. The file grows by a batch every step and can
    reach gigabytes, so it is read backwards from its end, in doubling blocks, until a line of
    an earlier step turns up (or max_bytes have been read)."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        block, records = 1 << 16, []
        while True:
            start = max(0, end - block)
            f.seek(start)
            lines = f.read(end - start).decode(errors="replace").splitlines()
            if start > 0:
                lines = lines[1:]  # the first line may be cut in the middle
            records = [r for r in map(parse_line, lines) if r is not None]
            steps = {r.get("step") for r in records}
            if start == 0 or len(steps) > 1 or block >= max_bytes:
                break
            block *= 2
    if not records:
        return []
    last = records[-1].get("step")
    return [r for r in records if r.get("step") == last]
