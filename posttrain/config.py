"""Typed run configs, loaded from YAML, with `--set a.b=c` overrides.

One run = one stage = one `RunConfig`. The sections are small and flat:

    algorithm: sft            # which objective the loop optimises
    out: runs/sft             # the run directory
    model: {...}              # what to load (and LoRA)
    data: {...}               # which files, how to tokenise and batch them
    train: {...}              # the loop: optimiser, schedule, precision, checkpoints
    <algorithm>: {...}        # options of the chosen algorithm only (SFT has none)

Every model forbids unknown keys, and `load_config` turns pydantic's errors into one
message per problem that names the key and, for a misspelling, the key that was meant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from posttrain.errors import ConfigError, unknown
from posttrain.monitor.health import MonitorConfig
from posttrain.sections import Section, explain


class LoraConfig(Section):
    """LoRA adapter (peft). The adapter-disabled base is the frozen reference where one is needed."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' (every linear layer but the output head).",
    )


class ModelConfig(Section):
    """The model to post-train: a local directory or a hub name."""

    path: str = Field(description="Directory written by save_pretrained, or a hub model name.")
    tokenizer: str | None = Field(None, description="Tokenizer path or name; defaults to `path`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the weights as loaded. Training keeps float32 master weights by default and "
        "uses autocast for lower precision (train.precision); 'auto' takes the checkpoint's own dtype.",
    )
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'eager', 'flash_attention_2'.")
    trust_remote_code: bool = False
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    freeze: list[str] = Field(
        default_factory=list,
        description="Glob patterns of parameter names to keep frozen, e.g. ['*embed_tokens*'] (with tied "
        "embeddings this freezes the output head too).",
    )


class DataConfig(Section):
    """Which files to read, and how rows become batches."""

    train: str | list[str] = Field(
        description="jsonl / json / parquet / csv file(s), or a saved HF dataset directory."
    )
    eval: str | list[str] | None = Field(None, description="Held-out rows for eval loss (same schema).")
    max_length: int = Field(1024, gt=1, description="Longest sequence in tokens (prompt + completion).")
    truncation: Literal["error", "drop", "truncate"] = Field(
        "error",
        description="A row longer than max_length is an error (default: nothing is lost silently), is dropped "
        "and counted, or is cut to its first max_length tokens.",
    )
    packing: bool = Field(
        True,
        description="Padding-free packing: several sequences per row with per-sequence position ids, no "
        "cross-attention between them. Falls back to length-grouped padded batches when the model does not "
        "support it (checked at start-up).",
    )
    group_by_length: bool = Field(
        True, description="Without packing: batch sequences of similar length together."
    )


class TrainConfig(Section):
    """The one training loop."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup from 0 to lr over this many optimiser steps."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay, as a fraction of lr.")
    batch_size: int = Field(
        32, gt=0, description="Global batch: examples per optimiser step, over all processes."
    )
    micro_batch_size: int | None = Field(
        None, gt=0, description="Examples per forward on one process; accumulation steps are derived from it."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, gt=0, description="Optimiser steps to run; overrides epochs.")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="Training-time budget: end (evaluate, save) after the step that passes it. Time spent "
        "in evaluation is not counted; a resumed run continues the same budget.",
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm; null to disable."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision. 'auto': bf16 on a GPU that supports it, else fp32."
    )
    seed: int = 0
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    eval_every: int | None = Field(
        None, gt=0, description="Eval loss on data.eval every N steps (and at the end)."
    )
    save_every: int | None = Field(
        None, gt=0, description="Checkpoint every N steps (and always on SIGTERM/SIGINT)."
    )
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep on disk.")
    max_nonfinite_steps: int = Field(
        3,
        ge=0,
        description="Consecutive steps with NaN/Inf loss or gradients to skip before stopping the run.",
    )
    tensorboard: bool = Field(
        True, description="Also log to TensorBoard (run_dir/tensorboard) when it is installed."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    trackers: list[str] = Field(
        default_factory=list,
        description="Also log metrics to these: 'tensorboard', 'mlflow', 'wandb' (each needs its pip package; "
        "W&B offline unless configured) or 'module:Class'. metrics.jsonl is always written.",
    )

    @field_validator("trackers")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        from posttrain.monitor.trackers import check_trackers

        try:
            return check_trackers(names)
        except ConfigError as e:  # pydantic reports ValueErrors with the key they belong to
            raise ValueError(str(e)) from None


# The options of the preference kinds. Each kind takes the ones its loss function declares (its keyword-only
# arguments in posttrain.losses, with their defaults there, once); an option the chosen kind does not take
# is a config error, and the resolved config holds the chosen kind's options only.
KIND_OPTION_FIELDS = ("label_smoothing", "gamma", "tau", "delta")


class PreferenceOptions(Section):
    """DPO family (section `dpo`, also read by `algorithm: orpo` and `algorithm: simpo`)."""

    kind: str = Field(
        "sigmoid", description="Loss kind: sigmoid (DPO), ipo, hinge, robust, ..., simpo, orpo."
    )
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward (KL strength).")
    label_smoothing: float | None = Field(
        None, ge=0, lt=0.5, description="Assumed label noise (sigmoid = cDPO, robust, exo_pair, aot, simpo)."
    )
    gamma: float | None = Field(None, ge=0, description="SimPO's target reward margin.")
    tau: float | None = Field(None, gt=0, description="DiscoPOP's temperature.")
    delta: float | None = Field(None, description="BCO's reward shift.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the chosen completions' NLL added to the loss (RPO; ORPO's lambda is 1).",
    )
    ref_model: str | None = Field(None, description="Reference model path; default: the model as loaded.")

    @model_validator(mode="before")
    @classmethod
    def _options_of_the_kind(cls, raw):
        """Fill in the chosen kind's option defaults; refuse options it does not take."""
        if not isinstance(raw, dict):
            return raw
        from posttrain.losses import kind_option_defaults

        kind = raw.get("kind", "sigmoid")
        defaults = kind_option_defaults(kind)  # an unknown kind: the list of kinds and a did-you-mean
        wrong = [k for k in KIND_OPTION_FIELDS if raw.get(k) is not None and k not in defaults]
        if wrong:
            takes = ", ".join(["beta", *defaults, "sft_weight", "ref_model"])
            raise ValueError(f"kind {kind!r} does not take {', '.join(wrong)}; {kind!r} takes: {takes}")
        return {**defaults, **{k: v for k, v in raw.items() if v is not None or k not in defaults}}

    @model_validator(mode="after")
    def _options_in_range(self) -> PreferenceOptions:
        """The loss function checks its own options (exo_pair's ε > 0, DiscoPOP's τ, ...): ask it now, on
        one dummy pair, so that a bad value is a config error at load time, not a crash at the first step
        after the reference pass."""
        import torch

        from posttrain.losses import REFERENCE_FREE_KINDS, preference_loss

        zero, one = torch.zeros(1), torch.ones(1)
        ref = () if self.kind in REFERENCE_FREE_KINDS else (zero, zero)
        lengths = {"chosen_lengths": one, "rejected_lengths": one}
        preference_loss(self.kind, -one, -one, *ref, beta=self.beta, **self.kind_options(**lengths))
        return self

    def kind_options(self, **lengths) -> dict:
        """The options `preference_loss` takes for this kind (lengths only where used)."""
        from posttrain.losses import kind_options

        values = {k: getattr(self, k) for k in KIND_OPTION_FIELDS} | lengths
        return {k: values[k] for k in kind_options(self.kind)}


class RewardOptions(Section):
    """Reward model (Bradley-Terry on preference pairs)."""

    margin: float = Field(0.0, ge=0, description="Required score gap: -log sigmoid(r_c - r_r - margin).")
    center_coef: float = Field(0.0, ge=0, description="Weight of (r_c + r_r)^2, keeping scores centred at 0.")


class KTOOptions(Section):
    """KTO (unpaired desirable / undesirable feedback)."""

    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(
        1.0, gt=0, description="lambda_D; balance lambda_D*n_D / (lambda_U*n_U) in [1, 4/3]."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U.")


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
    # Ahmadian et al. 2024: leave-one-out baseline.
    "rloo": {"advantage": "rloo", "aggregation": "token_mean"},
    # Hu 2025: batch-normalised advantages, token KL in the reward.
    "reinforce_pp": {"advantage": "reinforce_pp", "aggregation": "token_mean", "kl_in_reward": True},
    # Schulman et al. 2017 / Ouyang et al. 2022: value head, GAE (the `ppo` section), KL penalty in the reward.
    "ppo": {"kl_in_reward": True, "kl_coef": 0.05, "epochs": 2, "minibatches": 2},
}  # fmt: skip
ONLINE = tuple(RL_PRESETS)
GROUP_RL = tuple(a for a in ONLINE if a not in ("ppo", "distill"))
# Online defaults of the loop: Adam's beta2 0.999 reacts too slowly to the sudden gradient-scale changes of
# RL and can collapse the policy (seen with TRL's defaults on the bundled task); 0.99 and a constant lr.
ONLINE_TRAIN_DEFAULTS = {"betas": (0.9, 0.99), "schedule": "constant"}

# algorithm: presets of the `dpo` section it implies
PREFERENCE_PRESETS = {
    "dpo": {},
    "orpo": {"kind": "orpo", "sft_weight": 1.0},
    "simpo": {"kind": "simpo", "beta": 2.0},
}
ALGORITHMS = ("sft", "reward", "kto", *PREFERENCE_PRESETS, *ONLINE)
COMMON_SECTIONS = ("algorithm", "out", "model", "data", "train", "monitor")


class RunConfig(Section):
    """One stage: the algorithm, its model, data and loop settings, and where the run is written. Each
    algorithm family has its own subclass holding its own sections only (`RUN_TYPES`); `load_config` picks
    it by `algorithm`, so a stage's config.yaml holds what applies to it and nothing else."""

    algorithm: str = Field(description="The objective to optimise.")
    out: str = Field(description="Run directory (created; resumable with --resume).")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, raw):
        """`algorithm: orpo` / `simpo` are DPO-family presets, `grpo`, `dapo`, `ppo`, ... RL presets:
        fill the keys the user left out. A section of another algorithm is an error (it would be ignored)."""
        if not isinstance(raw, dict):
            return raw
        algorithm = raw.get("algorithm")
        own = OWN_SECTIONS.get(algorithm)
        foreign = [k for k in raw if own is not None and k not in COMMON_SECTIONS and k not in own]
        known = [k for k in foreign if any(k in sections for sections in OWN_SECTIONS.values())]
        if known:
            users = {k: sorted(a for a, s in OWN_SECTIONS.items() if k in s) for k in known}
            raise ValueError(
                "; ".join(f"section '{k}' is for algorithm {', '.join(users[k])}" for k in known)
                + f", not {algorithm!r}, which reads "
                + ", ".join(COMMON_SECTIONS[2:] + own)
                + " (remove it, or change `algorithm`)"
            )
        if isinstance(raw.get("env"), dict):  # agent episodes: tasks may come from the env, the grade rewards
            raw = {"data": {"train": []}, **raw}
            if isinstance(raw.get("rl", {}), dict) and "rewards" not in raw.get("rl", {}):
                raw["rl"] = {**raw.get("rl", {}), "rewards": []}
        presets = [("dpo", PREFERENCE_PRESETS.get(algorithm))]
        if algorithm in RL_PRESETS:
            presets += [("rl", RL_PRESETS[algorithm]), ("train", ONLINE_TRAIN_DEFAULTS)]
        for name, preset in presets:
            section = raw.get(name) or {}
            if preset is not None and isinstance(section, dict):
                raw = {**raw, name: {**preset, **section}}
        return raw

    @property
    def online(self) -> bool:
        """An online stage: its run type has a rollout section (it samples from the policy it trains)."""
        return "rollout" in type(self).model_fields

    @model_validator(mode="after")
    def _check_batch(self) -> RunConfig:
        t = self.train
        if t.micro_batch_size is not None and t.micro_batch_size > t.batch_size:
            raise ValueError(
                f"train.micro_batch_size ({t.micro_batch_size}) exceeds train.batch_size ({t.batch_size})"
            )
        return self


class SFTRun(RunConfig):
    algorithm: Literal["sft"]


class RewardRun(RunConfig):
    algorithm: Literal["reward"]
    reward: RewardOptions = RewardOptions()


class KTORun(RunConfig):
    algorithm: Literal["kto"]
    kto: KTOOptions = KTOOptions()


class PreferenceRun(RunConfig):
    algorithm: Literal[tuple(PREFERENCE_PRESETS)]
    dpo: PreferenceOptions = PreferenceOptions()


class RolloutRun(RunConfig):
    """What every online stage reads besides its algorithm's own options: generation (`rollout`), agent
    episodes in place of prompts (`env`), the sandbox of code rewards and tools (`sandbox`). An online
    algorithm's run type subclasses it and adds its `rl` section (and its own, as PPO's `ppo`)."""

    rollout: RolloutConfig = RolloutConfig()
    env: EnvConfig | None = Field(None, description="Train on agent episodes of this environment.")
    sandbox: SandboxConfig = SandboxConfig()


class OnlineRun(RolloutRun):
    """The GRPO family (grpo, dr_grpo, dapo, cispo, gspo, rloo, reinforce_pp): prompts in, rollouts, group advantages."""

    algorithm: Literal[GROUP_RL]
    rl: GroupRLOptions = GroupRLOptions()


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


class DistillRun(RolloutRun):
    algorithm: Literal["distill"]
    rl: GroupRLOptions = GroupRLOptions()
    distill: DistillOptions


class PPORun(RolloutRun):
    algorithm: Literal["ppo"]
    rl: RLOptions = RLOptions()
    ppo: PPOOptions = PPOOptions()


RUN_TYPES: dict[str, type[RunConfig]] = {
    "sft": SFTRun,
    "reward": RewardRun,
    "kto": KTORun,
    **dict.fromkeys(PREFERENCE_PRESETS, PreferenceRun),
    **dict.fromkeys(GROUP_RL, OnlineRun),
    "ppo": PPORun,
    "distill": DistillRun,
}
# The sections an algorithm reads besides the common ones, from its run type.
OWN_SECTIONS: dict[str, tuple[str, ...]] = {
    name: tuple(f for f in run.model_fields if f not in COMMON_SECTIONS) for name, run in RUN_TYPES.items()
}


def run_config(raw: dict) -> RunConfig:
    """Validate a raw config dict as the run type of its `algorithm` (pydantic's ValidationError, or a
    ConfigError for a missing or unknown algorithm)."""
    algorithm = raw.get("algorithm") if isinstance(raw, dict) else None
    if algorithm not in RUN_TYPES:
        got = (
            "missing required key 'algorithm'"
            if algorithm is None
            else unknown("algorithm", algorithm, ALGORITHMS)
        )
        raise ConfigError(got)
    return RUN_TYPES[algorithm].model_validate(raw)


# --------------------------------------------------------------------------- loading


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or a dict), apply `a.b=c` overrides, validate.

    Raises ConfigError naming the file, every wrong key (with a suggestion for a
    misspelling) and every wrong value.
    """
    if isinstance(source, dict):
        raw, name = dict(source), "<dict>"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
            )
        name = str(path)
    for item in overrides:
        apply_override(raw, item)
    try:
        return run_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{name}: invalid config\n  {e}") from None
    except ValidationError as e:
        raise ConfigError(
            f"{name}: invalid config\n" + "\n".join(explain(e, RUN_TYPES[raw["algorithm"]]))
        ) from None


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-4, true, [1, 2] work)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{p}' is a value, not a section")
        node = child
    node[leaf] = yaml.safe_load(value)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default filled in (written to run_dir/config.yaml): the stage's
    own sections only, and of the `dpo` section the chosen kind's options only."""
    raw = cfg.model_dump(mode="json")
    if "env" in raw and raw["env"] is None:  # not an agent run
        del raw["env"]
    if "dpo" in raw:
        raw["dpo"] = {k: v for k, v in raw["dpo"].items() if not (k in KIND_OPTION_FIELDS and v is None)}
    return yaml.safe_dump(raw, sort_keys=False)
