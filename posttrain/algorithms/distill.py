"""On-policy distillation (`algorithm: distill`): the student samples, the teacher scores the same tokens.

The rollout path is the GRPO family's as is (prompts → the student's completions → rewards → buffer);
what differs is the loss. Per completion token y_t of the student's own sample:

    reverse_kl (default)  the advantage of token t is log π_T(y_t) − log π_S,old(y_t), a per-token reward
                          whose policy gradient is the gradient of the sampled reverse KL(π_S ‖ π_T): the
                          student is pushed up where the teacher likes its tokens more than it does, down
                          where less (Agarwal et al. 2024, arXiv:2306.13649; Thinking Machines, "On-Policy
                          Distillation", 2025). It needs only the teacher's log-prob of each sampled token,
                          computed in the loss.
    jsd                   GKD's generalised JSD with `beta` over the full next-token distributions at each
                          position (`losses.generalized_jsd`), in token chunks recomputed in the backward
                          pass, so neither model's [N, C, V] logits exist at once.

Optionally `reward_weight` mixes in the verifiable reward's group-advantage policy gradient (`rl.rewards`,
logged either way). The teacher must use the student's tokenizer (checked, with a clear error); it runs in
the trainer process, frozen, in the student's dtype, on each micro-batch (one forward without gradients).
Its log-probs come from its hidden states in vocabulary blocks (`logprobs.token_stats`): no
full-vocabulary fp32 copy.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.algorithms.grpo import KIND, advantages, forward  # noqa: F401  (the module API)
from posttrain.errors import ConfigError
from posttrain.logprobs import HiddenHead, token_stats
from posttrain.losses import generalized_jsd, loss_units, policy_loss_sum


def load_teacher(cfg):
    """The frozen teacher, after checking that it shares the student's tokenizer and vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    from posttrain.models import load_model

    path = cfg.distill.teacher
    teacher_cfg = cfg.model.model_copy(update={"path": path, "tokenizer": None, "lora": None, "freeze": None})
    teacher = load_model(teacher_cfg, trainable=False)
    try:
        student_tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        teacher_tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"distill.teacher {path!r}: cannot load the tokenizers to compare ({e})") from None
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if student_vocab != teacher_vocab:
        differ = len(set(student_vocab.items()) ^ set(teacher_vocab.items()))
        raise ConfigError(
            f"distill.teacher {path!r}: its tokenizer differs from the student's ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens, {differ} (token, id) pairs not shared); on-policy distillation "
            "scores the student's token ids with the teacher, so both need the same tokenizer"
        )
    student_rows = AutoConfig.from_pretrained(cfg.model.path).get_text_config().vocab_size
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    if student_rows != teacher_rows:
        raise ConfigError(
            f"distill.teacher {path!r}: its output layer has {teacher_rows} rows, the student's {student_rows} "
            "(same tokenizer, different vocabulary padding); resize one to the other"
        )
    return teacher


class Objective:
    """Distillation loss over the valid completion tokens. weight = tokens (token_mean)."""

    def __init__(self, cfg):
        self.cfg, self.rl, self.opts = cfg, cfg.rl, cfg.distill
        self.teacher = load_teacher(cfg)

    def mask(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != -100) & (batch["loss_mask"][:, None] > 0)

    def weight(self, batch: dict) -> float:
        return loss_units(self.mask(batch), "token_mean")

    def loss(self, model, batch: dict):
        temperature, share = self.cfg.rollout.temperature, self.rl.share_prompts
        device = batch["targets"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        head, _ = forward(model, batch, temperature, share_prompts=share)
        with torch.no_grad():  # the teacher scores the student's tokens; no full-vocabulary fp32 copy
            teacher_head, _ = forward(self.teacher, batch, temperature, share_prompts=share)
            teacher_logps = token_stats(teacher_head, batch["targets"]).logps
        mask, o = self.mask(batch), self.opts
        stats = token_stats(head, batch["targets"], with_entropy=True)
        old = batch["old_logps"]
        # The sampled reverse KL(π_S ‖ π_T) estimate, k1 on the student's own tokens: logged for every loss.
        teacher_gap = torch.where(mask, old - teacher_logps, 0.0)
        reward_adv = batch["advantages"]
        reward_adv = reward_adv[:, None].expand_as(old) if reward_adv.dim() == 1 else reward_adv
        if o.loss == "reverse_kl":
            adv = -teacher_gap + o.reward_weight * reward_adv
            loss, _, metrics = policy_loss_sum(
                stats.logps, old, adv, mask, clip_low=self.rl.clip_low, clip_high=self.rl.clip_high
            )
        else:
            jsd = masked_jsd(head, teacher_head, mask, o.beta)
            loss, metrics = jsd.sum(), {"teacher_jsd": jsd.detach().sum()}
            if o.reward_weight > 0:
                pg, _, _ = policy_loss_sum(stats.logps, old, reward_adv, mask)
                loss = loss + o.reward_weight * pg
        metrics["teacher_kl"] = teacher_gap.sum()
        metrics["entropy"] = torch.where(mask, stats.entropy.detach(), 0.0).sum()
        return loss, metrics


def masked_jsd(student, teacher, mask: torch.Tensor, beta: float, chunk_tokens: int = 256) -> torch.Tensor:
    """`generalized_jsd` at every valid position ([M] float32, differentiable in the student), from
    `HiddenHead`s or logits, `chunk_tokens` positions at a time; each chunk's logits are recomputed in the
    backward pass instead of kept (activation checkpointing), so at most a [chunk_tokens, V] block of each
    model's logits exists."""
    if not isinstance(student, HiddenHead) or not isinstance(teacher, HiddenHead):
        s = student if not isinstance(student, HiddenHead) else _logits(student, student.hidden)
        t = teacher if not isinstance(teacher, HiddenHead) else _logits(teacher, teacher.hidden)
        return generalized_jsd(s[mask], t[mask], beta=beta)
    hs, ht = student.hidden[mask], teacher.hidden[mask].detach()

    def block(h_s, h_t):
        with torch.no_grad():
            t_logits = _logits(teacher, h_t)
        return generalized_jsd(_logits(student, h_s), t_logits, beta=beta)

    parts = [
        checkpoint(block, hs[i : i + chunk_tokens], ht[i : i + chunk_tokens], use_reentrant=False)
        for i in range(0, len(hs), chunk_tokens)
    ]
    return torch.cat(parts) if parts else hs.new_zeros(0, dtype=torch.float32)


def _logits(head: HiddenHead, hidden: torch.Tensor) -> torch.Tensor:
    x = hidden @ head.weight.T
    if head.bias is not None:
        x = x + head.bias
    return x / head.temperature if head.temperature != 1.0 else x
