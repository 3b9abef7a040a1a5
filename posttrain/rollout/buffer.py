"""The rollout buffer: one batch of sampled completions with everything training and logging need.

Samples are stored flat, prompt-major: the `group_size` completions of a prompt are consecutive, which is
what group advantages (GRPO, RLOO) rely on. Per-token quantities (sampling log-probs, reference log-probs,
values, advantages) are kept as [N, L] tensors aligned with the padded training layout built by `batch`,
so that a minibatch is a row selection, never a re-alignment.

Training layout of one sample (right-padded to the longest in the micro-batch):

    input_ids  p0 p1 p2 c0 c1 c2 pad
    targets    -  -  c0 c1 c2 -   -      targets[t] = input_ids[t + 1] on completion tokens, else -100

so `token_logprobs(logits, targets)` gives each completion token's log-prob at the position that
predicts it, and every per-token tensor here uses the same positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from posttrain.data.templates import IGNORE_INDEX
from posttrain.rollout.engine import Completion


@dataclass
class RolloutBuffer:
    prompt_ids: list[list[int]]  # per sample (repeated over its group)
    completions: list[Completion]
    rows: list[dict]  # the prompt row of each sample (answer, tests, ... for the reward fns)
    group_size: int
    rewards: Tensor | None = None  # [N] total reward
    components: dict[str, list[float]] = field(default_factory=dict)
    token: dict[str, Tensor] = field(default_factory=dict)  # per-token [N, L] tensors, layout above
    sequence: dict[str, Tensor] = field(default_factory=dict)  # per-sample [N] tensors (advantages, ...)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def width(self) -> int:
        return max(len(p) + len(c.token_ids) for p, c in zip(self.prompt_ids, self.completions))

    def completion_lengths(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]

    def layout(self, pad_id: int) -> dict[str, Tensor]:
        """input_ids, targets, attention_mask, position_ids [N, L] of all samples (right-padded)."""
        N, L = len(self), self.width
        input_ids = torch.full((N, L), pad_id, dtype=torch.long)
        targets = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((N, L), dtype=torch.long)
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completions)):
            seq = p + c.token_ids
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            if c.token_ids:
                targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(c.token_ids)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids,
            "targets": targets,
            "attention_mask": attention,
            "position_ids": position_ids,
        }

    def per_token(self, values: list[list[float]]) -> Tensor:
        """Per-completion-token values (e.g. sampling log-probs) placed in the [N, L] training layout."""
        out = torch.zeros((len(self), self.width), dtype=torch.float32)
        for i, (p, v) in enumerate(zip(self.prompt_ids, values)):
            if v:
                out[i, len(p) - 1 : len(p) - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
        return out

    def select(self, index: list[int]) -> RolloutBuffer:
        """The samples at `index` (in that order), per-token tensors cut to their own width."""
        sub = RolloutBuffer(
            prompt_ids=[self.prompt_ids[i] for i in index],
            completions=[self.completions[i] for i in index],
            rows=[self.rows[i] for i in index],
            group_size=self.group_size,
            rewards=None if self.rewards is None else self.rewards[index],
            components={k: [v[i] for i in index] for k, v in self.components.items()},
        )
        width = sub.width
        sub.token = {k: v[index, :width] for k, v in self.token.items()}
        sub.sequence = {k: v[index] for k, v in self.sequence.items()}
        return sub

    def batch(self, index: list[int], pad_id: int) -> dict[str, Tensor]:
        """One micro-batch: the training layout and every per-token / per-sample tensor, trimmed to the
        longest sequence among `index`."""
        sub = self.select(index)
        return {**sub.layout(pad_id), **sub.token, **sub.sequence}

    def write_samples(
        self, path: Path, *, step: int, prompts: list[str], extra: dict[str, list] | None = None
    ):
        """Append one JSON line per sample to samples.jsonl."""
        extra = extra or {}
        with open(path, "a") as f:
            for i, c in enumerate(self.completions):
                record = {
                    "step": step,
                    "group": i // self.group_size,
                    "prompt": prompts[i],
                    "completion": c.text,
                    "reward": None if self.rewards is None else round(float(self.rewards[i]), 6),
                    "components": {k: round(float(v[i]), 6) for k, v in self.components.items()},
                    "finish_reason": c.finish_reason,
                    "tokens": len(c.token_ids),
                    "policy_version": c.policy_version,
                    **{k: v[i] for k, v in extra.items()},
                }
                f.write(json.dumps(record) + "\n")
