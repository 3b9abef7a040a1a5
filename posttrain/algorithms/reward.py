"""Reward models: a causal LM with a scalar head, trained Bradley-Terry on preference pairs.

The model is `AutoModelForSequenceClassification(num_labels=1)` on any causal LM checkpoint,
so `final/` loads with plain transformers. The score of a sequence is the head applied to the
hidden state of its last token; we pool that token ourselves (from the batch's example index),
which lets chosen and rejected of a whole micro-batch share ONE packed forward, like DPO.

`RewardModel` (in posttrain.rewards.model, beside the reward fn built on it) and its
`score(prompts, completions)`, the reward function later stages call, are re-exported here.
"""

from __future__ import annotations

import torch

from posttrain.algorithms import preference
from posttrain.hf_compat import enable_activation_checkpointing
from posttrain.losses import reward_loss
from posttrain.rewards.model import RewardModel, last_token_positions

KIND = "preference"
__all__ = ["RewardModel", "last_token_positions", "load_model", "Objective"]


def load_model(cfg) -> RewardModel:
    """The policy checkpoint with a fresh scalar head (LoRA, if configured, trains the head too)."""
    cfg_model = cfg.model
    rm = RewardModel.from_pretrained(cfg_model.path, dtype=cfg_model.dtype)
    if cfg_model.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = cfg_model.lora
        rm = RewardModel(
            get_peft_model(
                rm.model,
                LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules, task_type="SEQ_CLS"),
            ),
            rm.tokenizer,
        )  # fmt: skip
    if cfg_model.gradient_checkpointing:
        enable_activation_checkpointing(rm.model)
    return rm


encode = preference.encode  # the same rows, encoded the same way as for DPO
collate = preference.collate


def save_final(model: RewardModel, tokenizer, out) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


class Objective:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), summed over pairs."""

    def __init__(self, cfg):
        self.opts = cfg.reward

    def weight(self, batch: dict) -> int:
        return batch["num_pairs"]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = batch["num_pairs"]
        scores = model(batch)
        chosen, rejected = scores[:p], scores[p:]
        loss = reward_loss(chosen, rejected, margin=self.opts.margin or None).sum()
        if self.opts.center_coef:
            # Keeps scores near zero (the pairwise loss is blind to a shared offset); as TRL's
            # center_rewards_coefficient: coef * mean over pairs of (r_c + r_r)^2.
            loss = loss + self.opts.center_coef * ((chosen + rejected) ** 2).sum()
        d = (chosen - rejected).detach()
        return loss, {
            "accuracy": (d > 0).float().sum(),
            "margin": d.sum(),
            "score/chosen": chosen.detach().sum(),
        }
