"""The sections every stage has: model (and LoRA), data, train."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from posttrain.errors import ConfigError
from posttrain.sections import Section


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
