"""Checkpoints: model, optimiser, scheduler, RNG states and data position.

accelerate's `save_state` / `load_state` do the heavy lifting (sharded FSDP/DeepSpeed states
included); objects registered with `accelerator.register_for_checkpointing` (our scheduler
and `LoopState`) travel with them. A checkpoint counts only once its `COMPLETE` marker is
written, so a process killed while saving never leaves a half checkpoint that resume would
trust.

The marker holds the sha256 of every file of the checkpoint. Before loading, `load_latest`
checks them: a checkpoint with a missing or changed file (bit rot, a truncated copy) is named
with the file, marked `CORRUPT` instead of `COMPLETE`, and the previous complete one is used.
A checkpoint holding the weights a non-finite streak started from is marked `DIVERGED`
(`mark_diverged`), so that `--resume` does not start from weights known to explode.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from posttrain.errors import TrainingError

COMPLETE = "COMPLETE"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def file_hashes(path: Path) -> dict[str, str]:
    from posttrain.audit.hashes import sha256_file

    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != COMPLETE)
    return {str(f.relative_to(path)): sha256_file(f) for f in files}


def save(accelerator, root: Path, step: int, *, keep: int) -> Path:
    path = checkpoint_dir(root, step)
    if accelerator.is_main_process and path.exists():  # an earlier attempt at this step (corrupt, diverged)
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker = {"step": step, "sha256": file_hashes(path)}
            (path / COMPLETE).write_text(json.dumps(marker, indent=1))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(path, ignore_errors=True)  # a half checkpoint is no checkpoint
        last = latest(root)
        raise TrainingError(
            f"step {step}: disk full while saving checkpoint {path}"
            + (f" ({e.filename})" if e.filename else "")
            + f"; the partial checkpoint was removed. Last complete checkpoint: {last or 'none'}. Free space "
            "(or lower train.keep_checkpoints) and resume with --resume"
        ) from None
    if accelerator.is_main_process:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def verify(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: nothing; markers without hashes, from
    before they were recorded, are trusted)."""
    try:
        expected = json.loads((path / COMPLETE).read_text()).get("sha256")
    except (OSError, ValueError) as e:
        return f"unreadable {COMPLETE} marker ({e})"
    if expected is None:
        return None
    from posttrain.audit.hashes import sha256_file

    for name, digest in expected.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if sha256_file(f) != digest:
            return f"{f} does not match its sha256 in {COMPLETE}"
    return None


def _mark(path: Path, label: str, why: str) -> None:
    """Take a checkpoint out of the complete ones, keeping its files and the reason."""
    marker = path / COMPLETE
    if marker.exists():
        marker.rename(path / label)
        (path / label).write_text(json.dumps({"why": why}))


def load_latest(accelerator, root: Path, say=print) -> Path | None:
    """Load the newest complete checkpoint whose files verify (and that loads); a broken one is named,
    marked CORRUPT and the one before it is tried. None when there is no complete checkpoint."""
    broken = []
    for path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            try:
                load(accelerator, path)
                return path
            except Exception as e:  # a checkpoint that passes its hashes but does not load
                problem = f"it does not load: {type(e).__name__}: {e}"
        say(
            f"warning: checkpoint {path.name} is corrupted: {problem}; trying the previous complete checkpoint"
        )
        broken.append(f"{path.name}: {problem}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _mark(path, "CORRUPT", problem)
    if broken:
        raise TrainingError(f"no usable checkpoint in {root}:\n  " + "\n  ".join(broken))
    return None


def mark_diverged(accelerator, root: Path, start: int) -> list[str]:
    """Mark the checkpoints at or after `start` optimiser steps (the weights a non-finite streak began
    from) DIVERGED; returns their names."""
    bad = [p for p in complete_checkpoints(root) if int(p.name.split("-")[1]) >= start]
    if accelerator.is_main_process:
        for p in bad:
            _mark(p, "DIVERGED", f"a non-finite streak started from the weights of step {start}")
    return [p.name for p in bad]


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load(accelerator, path: Path) -> None:
    accelerator.load_state(str(path))


class LoopState:
    """Where the loop is: registered for checkpointing so that resume continues exactly."""

    def __init__(self):
        self.step = 0  # optimiser steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # next global batch of the epoch's plan
        self.tokens = 0
        self.nonfinite_streak = 0
        self.nonfinite_from = 0  # optimiser steps done when the current non-finite streak began
        self.train_seconds = 0.0  # training time so far, evaluation excluded (for train.max_seconds)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
