"""PPO with a learned value function (Schulman et al. 2017; the RLHF recipe of Ouyang et al. 2022).

    reward per token   r_t = -kl_coef * KL_t (k1 by default)  (+ the sequence reward on its last token)
    advantages         GAE(gamma, lam) over the values V_t of the critic, whitened over the batch
    loss               clipped policy surrogate + vf_coef * clipped value loss, several minibatch epochs

The critic is a value head (one linear layer, zero-initialised) on the policy's last hidden state, or,
with `ppo.critic: PATH`, a separate model with a scalar head (usually the reward model: it already reads
the task) whose per-token outputs are the values. Either way policy and critic are one module for the
loop, so one optimiser, one checkpoint and one `accelerate` wrapper cover both.

KL control: fixed `rl.kl_coef`, or adaptive towards `rl.kl_target` (Ziegler et al. 2019), the controller
living with the rollout source and saved in its checkpoints.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from posttrain.advantages import gae, kl_penalty, whiten
from posttrain.data.templates import IGNORE_INDEX
from posttrain.logprobs import token_stats
from posttrain.losses import loss_units, policy_loss_sum, value_loss_sum
from posttrain.models import load_model as load_causal_lm
from posttrain.models import save_final as save_causal_lm
from posttrain.rollout.buffer import Rollout, completion_head

VALUES = True  # the trained module has a critic: the rollout source records its values at rollout time


class PolicyWithValue(nn.Module):
    """A causal LM policy and its critic, as one module."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy = policy
        self.critic = critic  # a RewardModel (backbone + scalar head) or None for a value head
        if critic is None:
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: dict, share_prompts: bool = True, temperature: float = 1.0):
        """The policy's distribution (`logprobs.HiddenHead` or logits / temperature [N, C, V]) and values
        [N, C] at the positions that predict each completion token (the rollout layout): V(s_t) sits where
        the policy acts."""
        logits, hidden = completion_head(self.policy, batch, temperature, share_prompts=share_prompts)
        if self.critic is None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            C = batch["targets"].shape[1]
            P = batch["input_ids"].shape[1] - C
            kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            hidden = self.critic.backbone(**kwargs, use_cache=False).last_hidden_state[:, P - 1 : P - 1 + C]
            values = self.critic.head(hidden).squeeze(-1)
        return logits, values


def load_model(cfg) -> PolicyWithValue:
    policy = load_causal_lm(cfg.model)
    critic = None
    if cfg.ppo.critic:
        from posttrain.rewards.model import RewardModel

        critic = RewardModel.from_pretrained(cfg.ppo.critic, dtype=cfg.model.dtype)
    return PolicyWithValue(policy, critic)


def policy(model: PolicyWithValue):
    """The causal LM the generation engine samples from."""
    return model.policy


def save_final(model: PolicyWithValue, tokenizer, out) -> None:
    """final/ is the policy (loads with AutoModelForCausalLM); the critic is kept next to it."""
    save_causal_lm(model.policy, tokenizer, out)
    if model.critic is None:
        save_file(
            {k: v.contiguous() for k, v in model.value_head.state_dict().items()},
            f"{out}/value_head.safetensors",
        )
    else:
        model.critic.save_pretrained(f"{out}/critic")


def forward(model, batch: dict, temperature: float, *, share_prompts: bool = True):
    return model(batch, share_prompts, temperature)


def advantages(rollout: Rollout, cfg, kl_coef: float) -> dict[str, torch.Tensor]:
    """Per-token rewards (the k1 KL penalty on every token + the sequence reward on the last one), GAE over
    the rollout-time values, whitened over the batch: ``{"advantages": [N, C], "returns": [N, C]}``."""
    ppo, mask = cfg.ppo, rollout.mask
    rewards = rollout.rewards.clone()
    if ppo.whiten_rewards:
        rewards = whiten(rewards, shift_mean=False)
    token_rewards = torch.zeros(mask.shape)
    last = mask.float().cumsum(1).argmax(1)  # position of each completion's last token
    rows = torch.arange(len(rewards))
    has_tokens = mask.any(1)
    token_rewards[rows[has_tokens], last[has_tokens]] = rewards[has_tokens]
    if rollout.ref_logps is not None and kl_coef > 0:
        kl = kl_penalty(rollout.old_logps, rollout.ref_logps, estimator="k1")
        token_rewards = token_rewards - kl_coef * kl * mask
    adv, returns = gae(token_rewards, rollout.old_values, mask, gamma=ppo.gamma, lam=ppo.lam)
    return {"advantages": whiten(adv, mask), "returns": returns}


class Objective:
    """Clipped policy loss + vf_coef x clipped value loss, both token means over the global batch."""

    def __init__(self, cfg):
        self.cfg, self.rl, self.ppo = cfg, cfg.rl, cfg.ppo

    def mask(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != IGNORE_INDEX) & (batch["loss_mask"][:, None] > 0)

    def weight(self, batch: dict) -> float:
        return loss_units(self.mask(batch), "token_mean")

    def loss(self, model, batch: dict):
        logits, values = forward(
            model, batch, self.cfg.rollout.temperature, share_prompts=self.rl.share_prompts
        )
        mask = self.mask(batch)
        stats = token_stats(logits, batch["targets"], with_entropy=True)
        logps = stats.logps
        loss, _, metrics = policy_loss_sum(
            logps,
            batch["old_logps"],
            batch["advantages"],
            mask,
            clip_low=self.rl.clip_low,
            clip_high=self.rl.clip_high,
            aggregation="token_mean",
            dual_clip=self.rl.dual_clip,
            is_weights=batch.get("is_weights"),
        )
        v_loss, _, v_metrics = value_loss_sum(
            values.float(), batch["old_values"], batch["returns"], mask, clip=self.ppo.value_clip
        )
        with torch.no_grad():
            metrics["entropy"] = torch.where(mask, stats.entropy.detach(), 0.0).sum()
            metrics["value_loss"] = v_loss.detach()
            metrics["value_clip_fraction"] = v_metrics["clip_fraction"]
            metrics["value_mean"] = torch.where(mask, values.detach().float(), 0.0).sum()
            metrics["policy_loss"] = loss.detach()
        return loss + self.ppo.vf_coef * v_loss, metrics
