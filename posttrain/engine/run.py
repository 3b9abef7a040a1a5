"""The run directory: resolved config, manifest, metrics log.

runs/NAME/
  config.yaml      the resolved config, every default filled in
  manifest.json    versions, git commit, seed, host, sha256 of every input, parent runs
  metrics.jsonl    one JSON object per logged step
  tensorboard/     the same scalars, when tensorboard is installed
  checkpoints/     step-N/ (see checkpoint.py)
  final/           save_pretrained output
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from posttrain.audit.hashes import hash_inputs, model_files
from posttrain.audit.run_dir import RunDir
from posttrain.errors import disk_full

PACKAGES = (
    "posttrain",
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "tokenizers",
    "safetensors",
    "trl",
)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | Path = ".") -> str | None:
    """HEAD of the git repository the run was launched from (the user's project), if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        return out + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def parent_runs(paths: list[str | Path]) -> list[str]:
    """Run directories that produced any of these inputs (a model at RUN/final, a file inside RUN)."""
    parents = []
    for p in map(Path, paths):
        for d in [p, *p.resolve().parents][:4]:
            if (d / "manifest.json").is_file() and d.resolve() not in parents:
                parents.append(d.resolve())
                break
    return [str(p) for p in parents]


class Run:
    """A run directory. Only the main process writes (`write=False` on the others)."""

    def __init__(self, path: str | Path, *, write: bool = True):
        self.path = Path(path)
        self.write = write
        self._trackers: list = []
        self._config: dict = {}
        self._lock = None
        self.resume_record: dict | None = None  # set by `claim` on --resume, appended to the manifest
        if write:
            self.path.mkdir(parents=True, exist_ok=True)

    checkpoints = property(lambda self: self.path / "checkpoints")
    final = property(lambda self: self.path / "final")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    samples_file = property(lambda self: self.path / "samples.jsonl")

    def claim(self, **kw) -> None:
        """Refuse or lock this directory before anything is written (engine/rundir.py); main process."""
        if self.write:
            from posttrain.engine.rundir import claim

            self._lock = claim(self, **kw)

    def release(self) -> None:
        """Drop the run's lock (the end of the stage, success or not)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_text(self, name: str, text: str) -> None:
        if self.write:
            with disk_full(f"writing {self.path / name}"):
                (self.path / name).write_text(text)

    def write_manifest(
        self, *, config: dict, seed: int, inputs: list[str | Path], models: list[str], **extra
    ) -> dict:
        """manifest.json: what an auditor needs to reproduce or trace this run."""
        self._config = config
        model_inputs = [f for m in models for f in model_files(m)]
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "algorithm": config.get("algorithm"),
            "seed": seed,
            "versions": versions(),
            "git_commit": git_commit(),
            "host": {"name": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()},
            "models": models,
            "inputs": hash_inputs([*inputs, *model_inputs]),
            "parents": parent_runs([*inputs, *models]),
            **extra,
        }
        previous = self.path / "manifest.json"
        if self.resume_record is not None and previous.is_file():
            # a resumed run keeps its start and its history of resumes (with any accepted changes)
            old = json.loads(previous.read_text())
            manifest["created"] = old.get("created", manifest["created"])
            manifest["resumes"] = [*old.get("resumes", []), self.resume_record]
        self.write_text("manifest.json", json.dumps(manifest, indent=2))
        return manifest

    def update_manifest(self, **fields) -> None:
        if not self.write:
            return
        path = self.path / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {}
        manifest.update(fields)
        with disk_full(f"writing {path}"):
            path.write_text(json.dumps(manifest, indent=2))

    # ------------------------------------------------------------------ metrics

    def open_metrics(self, *, resume_step: int | None, tensorboard: bool, trackers=()) -> None:
        """Start the metrics log. On resume, drop the lines of metrics.jsonl and samples.jsonl logged
        after the checkpoint we resume from: those steps are about to be run again and would otherwise
        appear twice."""
        if not self.write:
            return
        # samples.jsonl, trajectories.jsonl (agent episodes): by the step that trains on them
        for log in (self.metrics_file, self.samples_file, self.path / "trajectories.jsonl"):
            if resume_step is not None and log.exists():
                kept = [
                    line
                    for line in log.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
                log.write_text("".join(line + "\n" for line in kept))
            elif resume_step is None and log.exists():
                log.unlink()
        from posttrain.monitor.trackers import available, make_trackers

        names = list(trackers)
        if tensorboard and "tensorboard" not in names and available("tensorboard"):
            names.append("tensorboard")  # on by default where installed; the jsonl log is enough otherwise
        self._trackers = make_trackers(names, self.path, self._config, resume=resume_step is not None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.write:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with disk_full(f"step {step}: writing {self.metrics_file}"), open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self._trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl of a run, one dict per logged step (audit/run_dir.py: a line cut by a kill is skipped)."""
    return RunDir(run_dir).metrics
