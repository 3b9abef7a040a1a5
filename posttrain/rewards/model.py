"""Learned reward: a trained reward model (``posttrain.algorithms.reward.RewardModel``) as a RewardFn.

The model loads on the first call, not when the config is read, so building a reward from a
config is cheap and a run that never reaches the online stage never loads it; it then stays
in memory for every later call. Prompts may be strings or chat message lists and completions
strings or assistant message lists: ``RewardModel.score`` renders both with the reward model's
own chat template, exactly as it saw pairs in training.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path


class RewardModelFn:
    """``fn(prompts, completions, **row_fields) -> list[float]``: the reward model's scores.

    Build it with :func:`reward_model`. ``fn.model`` is the loaded
    :class:`~posttrain.algorithms.reward.RewardModel` (None before the first call).
    """

    __name__ = "reward_model"

    def __init__(self, path: str, *, batch_size: int = 64, device: str | None = None, dtype: str = "float32"):
        if batch_size <= 0:
            raise ValueError(f"reward_model batch_size must be positive, got {batch_size}")
        self.path, self.batch_size, self.device, self.dtype = str(path), batch_size, device, dtype
        self.model = None
        self._lock = threading.Lock()  # two threads calling first must not load it twice

    def _load(self):
        with self._lock:
            if self.model is None:
                import torch

                from posttrain.algorithms.reward import RewardModel

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                model = RewardModel.from_pretrained(self.path, dtype=self.dtype)
                self.model = model.to(device).eval()
        return self.model

    def __call__(self, prompts: Sequence, completions: Sequence, **_row_fields) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        model = self.model if self.model is not None else self._load()
        return [float(s) for s in model.score(list(prompts), list(completions), batch_size=self.batch_size)]

    def __repr__(self) -> str:
        return f"reward_model({self.path!r})"


def reward_model(
    path: str, *, batch_size: int = 64, device: str | None = None, dtype: str = "float32"
) -> RewardModelFn:
    """A RewardFn scoring with the reward model saved at ``path`` (loaded lazily, once).

    Args:
        path: a reward-model folder (a reward stage's ``final/``) or hub name.
        batch_size: sequences per forward pass.
        device: e.g. "cuda:1"; default CUDA when available, else CPU.
        dtype: "float32", "bfloat16" or "float16".
    """
    # The same rule as posttrain.models: a name that looks like a path must exist. Checked here, when
    # the config is read, rather than at the first rollout (and without importing torch).
    path = str(path)
    if (path.startswith((".", "/", "~")) or path.count("/") > 1) and not Path(path).expanduser().exists():
        raise ValueError(f"reward_model path not found: {path} (no such directory)")
    return RewardModelFn(path, batch_size=batch_size, device=device, dtype=dtype)
