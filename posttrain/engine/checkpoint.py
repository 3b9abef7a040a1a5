"""Checkpoints: model, optimiser, scheduler, RNG states and data position.

accelerate's `save_state` / `load_state` do the heavy lifting (sharded FSDP/DeepSpeed states
included); objects registered with `accelerator.register_for_checkpointing` (our scheduler
and `LoopState`) travel with them. A checkpoint counts only once its `COMPLETE` marker is
written, so a process killed while saving never leaves a half checkpoint that resume would
trust.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def save(accelerator, root: Path, step: int, *, keep: int) -> Path:
    path = checkpoint_dir(root, step)
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / COMPLETE).write_text(json.dumps({"step": step}))
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


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
        self.train_seconds = 0.0  # training time so far, evaluation excluded (for train.max_seconds)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
