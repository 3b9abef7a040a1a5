"""Reading run directories for the report. Every file is optional except that a run has a
metrics.jsonl or a manifest.json; a file that is half written (a run still going, or killed
mid-line) loses only its broken lines."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    return (path / "metrics.jsonl").is_file() or (path / "manifest.json").is_file()


def stage_dirs(path: Path) -> list[Path]:
    """The run directories directly inside a pipeline directory, in the order they ran (the
    manifest's creation time; directories without one last, by name)."""
    stages = [d for d in sorted(path.iterdir()) if d.is_dir() and is_run(d)]
    created = {d: str(_read_json(d / "manifest.json").get("created") or "~") for d in stages}
    return sorted(stages, key=lambda d: (created[d], d.name))


def load_run(path: Path) -> RunData:
    config_text = _read_text(path / "config.yaml")
    try:
        config = yaml.safe_load(config_text) if config_text else {}
    except yaml.YAMLError:
        config = {}
    png = path / "rm_audit.png"
    return RunData(
        path=path,
        metrics=read_jsonl(path / "metrics.jsonl"),
        alerts=[a for a in read_jsonl(path / "alerts.jsonl") if isinstance(a.get("step"), int)],
        manifest=_read_json(path / "manifest.json"),
        config=config if isinstance(config, dict) else {},
        config_text=config_text,
        eval=_read_json(path / "eval.json") or None,
        rm_audit=_read_json(path / "rm_audit.json") or None,
        rm_audit_png=png if png.is_file() else None,
        summary=_read_json(path / "summary.json") or None,
        samples=last_step_samples(path / "samples.jsonl"),
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in map(_parse, path.read_text(errors="replace").splitlines()) if r is not None]


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
            records = [r for r in map(_parse, lines) if r is not None]
            steps = {r.get("step") for r in records}
            if start == 0 or len(steps) > 1 or block >= max_bytes:
                break
            block *= 2
    if not records:
        return []
    last = records[-1].get("step")
    return [r for r in records if r.get("step") == last]


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path) or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
