"""The online stages' sections: rollout (generation), rl (the PPO / GRPO family), ppo, env (agent episodes), sandbox,
distill; the RL presets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.sections import Section


class RolloutConfig(Section):
    """Generation for online RL: how many samples, how they are drawn, by which engine."""

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="'auto': vLLM when it is installed and a GPU is present, else the HF engine."
    )
    prompts_per_step: int = Field(16, gt=0, description="Prompts per rollout, over all processes.")
    group_size: int = Field(8, gt=0, description="Completions sampled per prompt (G).")
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the loss uses the same).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (besides the eos token).")
    max_policy_lag: int = Field(
        0,
        ge=0,
        description="0: synchronous (generate, then train). k > 0: generation runs ahead of training in a "
        "background thread by at most k policy versions; the PPO ratio against the sampling policy corrects "
        "for the staleness.",
    )
    generation_batch_size: int | None = Field(
        None, gt=0, description="Sequences per generation forward (HF engine); default: all at once."
    )
    samples_log: bool = Field(True, description="Write every sample with its rewards to samples.jsonl.")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    dtype: Literal["same", "float32", "bfloat16", "float16"] = Field(
        "same",
        description="HF engine: sample with a copy of the policy in this dtype (e.g. bfloat16 while training "
        "in fp32, as a fast sampler would); its log-probs then differ from the trainer's, which recomputes "
        "them. The mismatch is logged (mismatch/*) every step.",
    )
    is_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        Field(
            "none",
            description="Correct the sampler/trainer mismatch with truncated or masked importance weights, per "
            "token or per sequence (losses.importance_weights).",
        )
    )
    is_clip_min: float | None = Field(None, ge=0, description="Lower bound of the correction's weights.")
    is_clip_max: float = Field(
        2.0,
        gt=1,
        description="Upper bound of the correction's weights; also the mismatch/share_past_bound bound.",
    )

    @model_validator(mode="after")
    def _check_dtype(self):
        if self.dtype != "same" and self.engine == "vllm":
            raise ValueError("rollout.dtype applies to the HF engine (vLLM samples in its own precision)")
        if self.dtype != "same" and self.max_policy_lag > 0:
            raise ValueError("rollout.dtype needs rollout.max_policy_lag: 0 (synchronous generation)")
        return self


class RLOptions(Section):
    """Online RL, shared by the GRPO family and PPO: rewards, the policy loss's clipping and passes, KL
    (section `rl`; presets by algorithm name)."""

    rewards: list[str | dict] = Field(
        default_factory=lambda: ["exact_match"],
        description="Reward functions: built-in names, {name: ..., weight: ..., <options>}, or "
        "'module:function' import paths. Their weighted sum is the reward; each is logged.",
    )
    clip_low: float = Field(0.2, ge=0, description="Ratio clip below: 1 - clip_low.")
    clip_high: float = Field(
        0.2, ge=0, description="Ratio clip above: 1 + clip_high (DAPO's clip-higher: 0.28)."
    )
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip bound c for negative advantages.")
    epochs: int = Field(1, gt=0, description="Passes over each rollout (PPO epochs; GRPO's mu).")
    minibatches: int = Field(1, gt=0, description="Optimiser steps per pass over a rollout.")
    kl_coef: float = Field(0.0, ge=0, description="KL-to-reference strength (beta); 0: no reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = Field(
        False,
        description="Subtract kl_coef * KL from the per-token reward (PPO) instead of adding a KL loss.",
    )
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL controller target (Ziegler et al.).")
    kl_horizon: int = Field(10_000, gt=0)
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose rewards are all equal and sample more prompts to refill."
    )
    max_resample_rounds: int = Field(4, ge=0, description="Extra generation rounds to refill the batch.")
    overlong_penalty: bool = Field(
        False, description="DAPO's soft overlong punishment as a reward component."
    )
    overlong_cache: int | None = Field(
        None, gt=0, description="Tokens before max_new_tokens where the penalty ramps in (default: a fifth)."
    )
    mask_truncated: bool = Field(False, description="Give completions cut at max_new_tokens no loss.")
    success_threshold: float = Field(1.0, description="Reward at or above which a sample counts as a pass.")
    share_prompts: bool = Field(
        True,
        description="Training forward: run each distinct prompt once and let its samples attend to its cached "
        "keys / values (same numbers, less work). false: one full forward per sample (the fallback for a "
        "distributed wrapper that objects to two calls per micro-batch).",
    )
    eval_rewards: list[str | dict] | None = Field(
        None,
        description="Reward fns of the held-out eval during training (data.eval, every train.eval_every "
        "steps); default: `rewards`. A gold metric here lets the reward-hacking alert compare.",
    )


class SandboxConfig(Section):
    """Where untrusted code (code rewards, agent tools) runs: `posttrain.sandbox`."""

    backend: Literal["auto", "bwrap", "process"] = Field(
        "auto",
        description="auto / bwrap: the OS-level bubblewrap sandbox (an error where it cannot run, saying how "
        "to get it). process: the weaker in-process one, opted into explicitly; it warns at every run and "
        "is written into the manifest and model card.",
    )
    cgroup: str | None = Field(
        None,
        description="A delegated cgroup v2 directory (memory and pids controllers) whose children hold each "
        "run, for memory, task and kill-all limits on top of the rlimits; default none (or "
        "POSTTRAIN_SANDBOX_CGROUP).",
    )


class GroupRLOptions(RLOptions):
    """The GRPO family's `rl` section: the shared options plus the advantage estimator and the loss
    aggregation, the two choices that tell GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++ apart."""

    advantage: Literal["group", "rloo", "reinforce_pp"] = Field(
        "group", description="group (GRPO), rloo (leave-one-out), reinforce_pp (batch-normalised)."
    )
    scale: Literal["std", "batch", "none"] = Field(
        "std",
        description="Group advantages: divide by the group's std (GRPO), the batch's, or not (Dr. GRPO).",
    )
    aggregation: Literal[
        "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum"
    ] = Field(
        "token_mean",
        description="How token losses become the batch loss: over all tokens (DAPO), per sequence then over "
        "sequences (GRPO), per-sequence sums over a constant length (Dr. GRPO), or per-sequence sums (LUSPO).",
    )
    kind: Literal["clip", "cispo", "sapo"] = Field(
        "clip",
        description="Policy loss: PPO's clipped surrogate, CISPO (capped detached ratio on log-prob; clip_high is "
        "the cap) or SAPO (soft sigmoid gate). See losses.policy_loss.",
    )
    importance_level: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token, or one per sequence (GSPO: the mean log-ratio)."
    )
    delta: float | None = Field(None, gt=1, description="Two-sided clip: cap on the ratio (INTELLECT-2).")
    sapo_tau_pos: float = Field(1.0, gt=0, description="SAPO gate temperature for positive advantages.")
    sapo_tau_neg: float = Field(1.05, gt=0, description="SAPO gate temperature for negative advantages.")
    off_policy_threshold: float | None = Field(
        None,
        gt=0,
        description="Drop negative-advantage samples whose mean KL from the sampler exceeds this (DeepSeek-V3.2).",
    )
    top_entropy_quantile: float = Field(
        1.0, gt=0, le=1, description="Train only on this top share of tokens by entropy (0.2 in the paper)."
    )


class PPOOptions(Section):
    """PPO's own section: the critic and GAE (Schulman et al. 2016). PPO's policy and value losses are token
    means over the global batch: no aggregation option."""

    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    value_clip: float | None = Field(0.2, gt=0, description="Clip of the value update; null: none.")
    whiten_rewards: bool = False
    critic: str | None = Field(
        None,
        description="None: a value head on the policy; a model path: a separate critic with a scalar head.",
    )


class EnvConfig(Section):
    """An agent environment for online RL (section `env`, GRPO family and PPO): episodes of tool use in
    place of single completions (posttrain.agents). Its names (environment, tool format, budgets) are checked
    by `posttrain.stage.load_stage`, above the agents layer that knows them. Task rows come from `data.train` (jsonl of the
    environment's task rows) or, when it is left empty, from the environment's own generator."""

    name: str = Field(description="A bundled environment (`posttrain env list`) or 'module:Class'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the environment.")
    format: str = Field("tiny", description="Tool-call format: 'tiny' (<call>f(x)</call>) or 'hermes'.")
    tasks: int = Field(256, gt=0, description="Generated training tasks (when data.train is empty).")
    eval_tasks: int = Field(
        64, ge=0, description="Generated held-out tasks for the eval (when data.eval is empty)."
    )
    task_seed: int = Field(0, description="Seed of the generated tasks.")
    budgets: dict[str, float | int | str] = Field(
        default_factory=dict,
        description="Episode budgets (posttrain.agents.Budgets): max_turns, max_tool_calls, max_context, "
        "max_new_tokens (per turn), max_tool_tokens, truncate, tool_timeout_s, episode_timeout_s, "
        "grade_timeout_s, max_repeats.",
    )
    verify: Literal["mask", "warn", "strict"] = Field(
        "mask",
        description="An episode whose ids differ from the template's render: masked, logged, or an error.",
    )
    loss_policy: dict[str, Literal["keep", "mask"]] = Field(
        default_factory=dict, description="Per-label or per-class overrides, e.g. {budget.time: mask}."
    )
    weight: float = Field(
        1.0, description="Weight of the environment's grade in the reward (component 'env')."
    )
    kv_carry: bool = Field(
        True,
        description="Keep each episode's KV cache between its turns and prefill only the new tokens (HF engine; "
        "the same numbers as re-prefilling the conversation every turn, less work). false: re-prefill.",
    )
    credit: dict[str, Any] = Field(
        default_factory=dict,
        description="Per-turn credit (posttrain.agents.credit): {mode: trajectory|discounted|anchor, gamma, "
        "omega}; empty or trajectory is GRPO's one advantage per episode. Needs rl.advantage 'group'.",
    )


RL_PRESETS: dict[str, dict] = {
    # Shao et al. 2024: group-std advantages, per-sequence token means.
    "grpo": {"advantage": "group", "scale": "std", "aggregation": "seq_mean_token_mean"},
    # Liu et al. 2025 (Understanding R1-Zero-like training): no std division, constant length normaliser.
    "dr_grpo": {"advantage": "group", "scale": "none", "aggregation": "seq_mean_token_sum_norm"},
    # Yu et al. 2025: clip-higher, dynamic sampling, token-level loss, soft overlong punishment.
    "dapo": {
        "advantage": "group", "scale": "std", "aggregation": "token_mean", "clip_high": 0.28,
        "dynamic_sampling": True, "overlong_penalty": True,
    },
    # MiniMax 2025 (M1) / ScaleRL: capped, detached IS weight on the log-prob; token-level loss, cap 5.
    "cispo": {"advantage": "group", "scale": "std", "aggregation": "token_mean", "kind": "cispo", "clip_high": 5.0},
    # Zheng et al. 2025: one length-normalised ratio per sequence, clipped in [1 - 3e-4, 1 + 4e-4].
    "gspo": {
        "advantage": "group", "scale": "std", "aggregation": "seq_mean_token_mean", "importance_level": "sequence",
        "clip_low": 3e-4, "clip_high": 4e-4,
    },
    # On-policy distillation (algorithms/distill.py): the student samples, the teacher scores; the `distill`
    # section. A verifiable reward, if mixed in, uses group advantages.
    "distill": {"advantage": "group", "scale": "std", "aggregation": "token_mean"},
    # Guo et al. 2024 (Direct Language Model Alignment from Online AI Feedback): two samples of the policy per
    # prompt, ordered by the rewards, trained with a `dpo` kind against a frozen reference
    # (algorithms/online_dpo.py); the `rl` section gives the rewards and the passes, its clip and KL do not apply.
    "online_dpo": {},
    # Ahmadian et al. 2024: leave-one-out baseline.
    "rloo": {"advantage": "rloo", "aggregation": "token_mean"},
    # Hu 2025: batch-normalised advantages, token KL in the reward.
    "reinforce_pp": {"advantage": "reinforce_pp", "aggregation": "token_mean", "kl_in_reward": True},
    # Schulman et al. 2017 / Ouyang et al. 2022: value head, GAE (the `ppo` section), KL penalty in the reward.
    "ppo": {"kl_in_reward": True, "kl_coef": 0.05, "epochs": 2, "minibatches": 2},
}  # fmt: skip
ONLINE = tuple(RL_PRESETS)
GROUP_RL = tuple(a for a in ONLINE if a not in ("ppo", "distill", "online_dpo"))
# What an algorithm implies of the `rollout` section: online DPO samples one pair per prompt.
ROLLOUT_PRESETS: dict[str, dict] = {"online_dpo": {"group_size": 2}}
# Online defaults of the loop: Adam's beta2 0.999 reacts too slowly to the sudden gradient-scale changes of
# RL and can collapse the policy (seen with TRL's defaults on the bundled task); 0.99 and a constant lr.
ONLINE_TRAIN_DEFAULTS = {"betas": (0.9, 0.99), "schedule": "constant"}


class DistillOptions(Section):
    """On-policy distillation (section `distill`): the student samples, the teacher scores the same tokens."""

    teacher: str = Field(description="Teacher causal LM (a path or hub name); same tokenizer as the student.")
    loss: Literal["reverse_kl", "jsd"] = Field(
        "reverse_kl",
        description="reverse_kl: per-token log π_teacher − log π_student of the sampled tokens as the "
        "advantage (on-policy reverse KL); jsd: GKD's generalised Jensen-Shannon divergence over the full "
        "next-token distributions, with `beta`.",
    )
    beta: float = Field(
        1.0, ge=0, le=1, description="jsd: 0 forward KL(teacher ‖ student), 1 reverse KL, between: the JSD."
    )
    reward_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the verifiable reward's policy gradient mixed into the loss (rl.rewards).",
    )
