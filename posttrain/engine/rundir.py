"""Claiming a run directory before anything is written into it.

`claim` runs first thing in every training stage (main process), before a tokenizer or a model is
loaded and long before config.yaml or manifest.json are written:

- a directory that already holds a run (finished or not, with or without checkpoints) is refused unless
  the caller asks to `resume` it or to `overwrite` it (which first deletes everything in the directory
  but `KEEP`);
- the directory is locked for the whole run (`flock` on RUN/.lock): a second run into it, from this
  process or any other, fails at once with the holder's pid instead of interleaving its metrics;
- on resume, the new config is compared with the run's config.yaml, and the files it reads with the
  sha256 recorded in manifest.json. A difference in a key that changes what the run computes (lr, batch
  sizes, data, model, seed, algorithm options, ...) is refused unless that key is in `allow_changed`;
  accepted changes are recorded in manifest.json under `resumes`. Keys that only change how the run is
  watched or kept (`NEUTRAL`: logging, checkpoint cadence, trackers, evaluation) may change freely.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ConfigError, TrainingError

RUN_FILES = (
    "config.yaml",
    "manifest.json",
    "metrics.jsonl",
    "samples.jsonl",
    "trajectories.jsonl",
    "alerts.jsonl",
    "checkpoints",
    "final",
)
LOCK = ".lock"
# Kept by --overwrite: the lock, and the marker of a pipeline that owns the directory (posttrain.pipeline).
KEEP = (LOCK, "STAGE_STARTED")
# Keys (or whole sections) that do not change what a run computes: how it is logged, watched, kept and
# evaluated. Everything else is compared on --resume.
NEUTRAL = (
    "out",
    "train.progress",
    "train.tensorboard",
    "train.trackers",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.max_seconds",
    "train.max_nonfinite_steps",
    "train.eval_every",
    "data.eval",
    "rl.eval_rewards",
    "rollout.samples_log",
    "rollout.vllm_gpu_memory_utilization",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Result-changing keys whose values differ: {key: (old, new)} (a missing key reads as None)."""
    a, b = flatten(old), flatten(new)
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not _covered(k, NEUTRAL)
    }


def input_changes(old_hashes: dict[str, str], inputs: dict[str, list[str | Path]]) -> dict[str, tuple]:
    """Config keys whose files changed content since the run started: {key: (file, "sha256 changed")}.
    Files the old manifest did not hash (a new path) are the config diff's business."""
    from posttrain.audit.hashes import hash_inputs

    out = {}
    for key, paths in inputs.items():
        for path, digest in hash_inputs([p for p in paths if Path(p).exists()]).items():
            if path in old_hashes and old_hashes[path] != digest:
                out.setdefault(key, (path, "content changed (sha256)"))
    return out


class Lock:
    """An exclusive, non-blocking `flock` on RUN/.lock, held until `release` (or the process ends)."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = run_dir / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise TrainingError(
                f"{run_dir} is in use by another run ({holder}); wait for it to end, or choose another out"
            ) from None
        os.ftruncate(self._fd, 0)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now}".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def existing_run(run_dir: Path) -> list[str]:
    """The run files already in `run_dir` (empty: no run there)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def describe(run_dir: Path, found: list[str]) -> str:
    from posttrain.engine import checkpoint

    last = checkpoint.latest(run_dir / "checkpoints")
    state = "finished (final/)" if "final" in found else "not finished"
    ckpt = f"last checkpoint {last.name}" if last else "no checkpoint"
    return f"{state}, {ckpt}; holds {', '.join(found)}"


def claim(
    run,
    *,
    config_text: str,
    inputs: dict[str, list[str | Path]],
    resume: bool,
    overwrite: bool,
    allow_changed=(),
) -> Lock:
    """Check `run.path` and lock it for this run (see the module docstring). `config_text` is the new
    config.yaml; `inputs` maps config keys to the files they read (for the content check on resume).
    Sets `run.resume_record` (for manifest.json) on resume. Returns the held lock."""
    from posttrain.engine import checkpoint

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if allow_changed and not resume:
        raise ConfigError("--allow-changed is only used with --resume (it accepts changes to a resumed run)")
    path = run.path
    lock = Lock(path)
    try:
        found = existing_run(path)
        if found and not resume and not overwrite:
            raise TrainingError(
                f"{path} already holds a run ({describe(path, found)}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another out"
            )
        if found and overwrite:
            print(f"--overwrite: deleting the run in {path} ({', '.join(found)})")
            for entry in path.iterdir():
                if entry.name in KEEP:
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if resume and found:
            last = checkpoint.latest(path / "checkpoints")
            if last is None and "final" in found:
                raise TrainingError(
                    f"{path}: --resume of a finished run that holds no checkpoint to resume from; pass "
                    "--overwrite to run it again, or choose another out"
                )
            run.resume_record = _check_resume(path, config_text, inputs, allow_changed, last)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_resume(path: Path, config_text: str, inputs, allow_changed, last) -> dict:
    old_config = path / "config.yaml"
    changes = {}
    if old_config.is_file():
        changes = config_changes(yaml.safe_load(old_config.read_text()) or {}, yaml.safe_load(config_text))
    manifest = path / "manifest.json"
    if manifest.is_file():
        old_hashes = json.loads(manifest.read_text()).get("inputs", {})
        for key, change in input_changes(old_hashes, inputs).items():
            changes.setdefault(key, change)
    allowed = [k.strip() for item in allow_changed for k in str(item).split(",") if k.strip()]
    refused = {k: v for k, v in changes.items() if not _covered(k, allowed)}
    if refused:
        lines = "\n  ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise TrainingError(
            f"{path}: --resume with a config that changes the result:\n  {lines}\n"
            f"Resume with the run's own config ({old_config}), start a new run, or accept the change with "
            f"--allow-changed {','.join(refused)} (it is recorded in manifest.json)"
        )
    return {
        "resumed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": last.name if last else None,
        "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
    }


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
