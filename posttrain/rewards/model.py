"""Learned reward: the reward model (:class:`RewardModel`, a causal LM with a scalar head, trained by
``algorithm: reward``) and :func:`reward_model`, a RewardFn that scores with one.

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

import torch
from torch import nn

from posttrain.data.batching import collate as collate_examples
from posttrain.data.templates import encode_prompt_completion, to_example
from posttrain.models import DTYPES, _check_source, is_peft


def last_token_positions(example_index: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Flat position (row * L + col) of each example's last token. example_index: [R, L], -1 on padding."""
    flat = example_index.flatten()
    pos = torch.arange(flat.numel(), device=flat.device)
    keep = flat >= 0
    last = torch.full((num_examples,), -1, dtype=torch.long, device=flat.device)
    return last.scatter_reduce(0, flat[keep], pos[keep], reduce="amax")


class RewardModel(nn.Module):
    """Scalar reward on top of a sequence-classification model (any causal LM backbone)."""

    def __init__(self, model, tokenizer=None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        inner = model.get_base_model() if is_peft(model) else model
        if not hasattr(inner, "score"):
            raise ValueError(
                f"{type(inner).__name__} has no scalar 'score' head; not usable as a reward model"
            )
        self.backbone = getattr(inner, inner.base_model_prefix)
        self.head = inner.score

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", **kw) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _check_source(path, "reward model path")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=DTYPES[dtype], **kw
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer)

    def forward(self, batch: dict) -> torch.Tensor:
        """Scores [N] of the N sequences of a collated (padded or packed) batch."""
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        hidden = self.backbone(**kwargs).last_hidden_state  # [R, L, H]
        n = int(batch["example_index"].max()) + 1
        last = last_token_positions(batch["example_index"], n)
        return self.head(hidden.flatten(0, 1)[last]).squeeze(-1).float()

    @staticmethod
    def encode(tokenizer, prompt, completion) -> list[int]:
        """The token ids a (prompt, completion) is scored on: the SFT / DPO row's, the one prompt rule."""
        prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, completion)
        return prompt_ids + completion_ids

    @torch.no_grad()
    def score(self, prompts: list, completions: list, *, batch_size: int = 64, **_row_fields) -> list[float]:
        """Reward of each (prompt, completion): the RewardFn signature of posttrain.rewards."""
        if self.tokenizer is None:
            raise ValueError("RewardModel.score needs a tokenizer (load with RewardModel.from_pretrained)")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            examples = []
            for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size]):
                ids = self.encode(self.tokenizer, p, c)
                examples.append(to_example(ids, [False] * len(ids)))
            batch = collate_examples(examples, pad_id=self.tokenizer.pad_token_id, packing=False)
            out += self({k: v.to(device) for k, v in batch.items()}).tolist()
        self.train(was_training)
        return out

    def save_pretrained(self, out) -> None:
        model = self.model.merge_and_unload() if is_peft(self.model) else self.model
        model.save_pretrained(out)


class RewardModelFn:
    """``fn(prompts, completions, **row_fields) -> list[float]``: the reward model's scores.

    Build it with :func:`reward_model`. ``fn.model`` is the loaded
    :class:`RewardModel` (None before the first call).
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
