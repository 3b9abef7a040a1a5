"""The one reader of run directories: what the report, the model card, the lineage and ``read_metrics`` read of
a run, each file optional. A run still going, or killed mid-line, loses only its broken lines; a file that is
not valid JSON / YAML reads as empty, never as an exception (the writers are ``engine/run.py`` and the loop).

    run = RunDir("runs/dpo")            # or RunDir.of("runs/dpo/final"): the run holding a model
    run.manifest, run.config, run.metrics, run.alerts, run.eval
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import yaml


def read_json(path: Path) -> dict:
    """A JSON object file; {} when missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text(errors="replace")) if Path(path).is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def parse_line(line: str) -> dict | None:
    """One jsonl line as an object; None for a line cut by a killed run (or any non-object)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a jsonl file, in order; broken lines are left out; [] when missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [r for r in map(parse_line, path.read_text(errors="replace").splitlines()) if r is not None]


class RunDir:
    """A run directory's files, each read once on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run of a path: itself, or the run holding it when given a model directory (RUN/final)."""
        path = Path(path)
        if not (path / "manifest.json").is_file() and (path.parent / "manifest.json").is_file():
            return cls(path.parent)
        return cls(path)

    @property
    def is_run(self) -> bool:
        return (self.path / "metrics.jsonl").is_file() or (self.path / "manifest.json").is_file()

    @cached_property
    def manifest(self) -> dict:
        return read_json(self.path / "manifest.json")

    @cached_property
    def config_text(self) -> str:
        path = self.path / "config.yaml"
        try:
            return path.read_text(errors="replace") if path.is_file() else ""
        except OSError:
            return ""

    @cached_property
    def config(self) -> dict:
        """config.yaml, the resolved config of the stage; {} when missing or not YAML."""
        try:
            data = yaml.safe_load(self.config_text) if self.config_text else {}
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    @cached_property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    @cached_property
    def alerts(self) -> list[dict]:
        return read_jsonl(self.path / "alerts.jsonl")

    @cached_property
    def eval(self) -> dict:
        return read_json(self.path / "eval.json")
