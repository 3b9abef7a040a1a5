"""Reward models: a causal LM with a scalar head, trained Bradley-Terry on preference pairs.

The model is `AutoModelForSequenceClassification(num_labels=1)` on any causal LM checkpoint,
so `final/` loads with plain transformers. The score of a sequence is the head applied to the
hidden state of its last token; we pool that token ourselves (from the batch's example index),
which lets chosen and rejected of a whole micro-batch share ONE packed forward, like DPO.

`RewardModel.score(prompts, completions)` is the reward function later stages call.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.algorithms import preference
from posttrain.data.batching import collate as collate_examples
from posttrain.data.templates import encode_prompt_completion, to_example
from posttrain.hf_compat import enable_activation_checkpointing
from posttrain.losses import reward_loss
from posttrain.models import DTYPES, _check_source, is_peft

KIND = "preference"


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


def load_model(cfg_model) -> RewardModel:
    """The policy checkpoint with a fresh scalar head (LoRA, if configured, trains the head too)."""
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
