"""Supervised fine-tuning: maximise the log-likelihood of the completion tokens.

Which tokens carry the loss is decided once, in `posttrain.data.templates` (assistant turns of
chat rows, the completion of prompt/completion rows, every token of text rows). The loss is
the mean negative log-likelihood over every loss token of the global batch: the loop divides
the summed NLL by the batch's token count, so long and short examples weigh per token, and
gradient accumulation does not change the result.
"""

from __future__ import annotations

import torch

from posttrain.data.templates import encode_sft_row
from posttrain.logprobs import token_stats
from posttrain.models import forward_head

KIND = "sft"  # the row schema this algorithm reads


def encode(row: dict, tokenizer, cfg, where: str):
    return encode_sft_row(
        row, tokenizer, max_length=cfg.data.max_length, truncation=cfg.data.truncation, where=where
    )


class Objective:
    """Token-level NLL. weight = loss tokens in the micro-batch."""

    def __init__(self, cfg=None):
        self.cfg = cfg

    def weight(self, batch: dict) -> int:
        return int((batch["targets"] != -100).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets_RL = batch["targets"]
        stats = token_stats(forward_head(model, batch), targets_RL, with_argmax=True)
        logps_RL = stats.logps  # 0 where target is -100
        mask_RL = targets_RL != -100
        correct = ((stats.argmax == targets_RL) & mask_RL).sum()
        return -logps_RL.sum(), {"token_accuracy": correct.float()}
