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

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class PreferenceOptions(Section):
    """DPO family (section `dpo`, also read by `algorithm: orpo` and `algorithm: simpo`)."""

    kind: str = Field(
        "sigmoid", description="Loss kind: sigmoid (DPO), ipo, hinge, robust, ..., simpo, orpo."
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from posttrain.losses import kind_options

        kind_options(kind)  # raises with the list of kinds and a did-you-mean
        return kind

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward (KL strength).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed label noise (cDPO, robust, exo_pair)."
    )
    gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    tau: float = Field(0.05, gt=0, description="DiscoPOP's temperature.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the chosen completions' NLL added to the loss (RPO; ORPO's lambda is 1).",
    )
    ref_model: str | None = Field(None, description="Reference model path; default: the model as loaded.")

    def kind_options(self, **lengths) -> dict:
        """The options `preference_loss` takes for this kind (lengths only where used)."""
        from posttrain.losses import kind_options

        values = {"label_smoothing": self.label_smoothing, "gamma": self.gamma, "tau": self.tau, **lengths}
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


# algorithm: presets of the `dpo` section it implies
PREFERENCE_PRESETS = {
    "dpo": {},
    "orpo": {"kind": "orpo", "sft_weight": 1.0},
    "simpo": {"kind": "simpo", "beta": 2.0},
}
ALGORITHMS = ("sft", "reward", "kto", *PREFERENCE_PRESETS)


class RunConfig(Section):
    """One stage: the algorithm, its model, data and loop settings, and where the run is written."""

    algorithm: Literal[ALGORITHMS] = Field(description="The objective to optimise.")
    out: str = Field(description="Run directory (created; resumable with --resume).")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    dpo: PreferenceOptions = PreferenceOptions()
    reward: RewardOptions = RewardOptions()
    kto: KTOOptions = KTOOptions()

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, raw):
        """`algorithm: orpo` / `simpo` are DPO-family presets: fill the keys the user left out."""
        if isinstance(raw, dict) and raw.get("algorithm") in PREFERENCE_PRESETS:
            section = raw.get("dpo") or {}
            if isinstance(section, dict):
                raw = {**raw, "dpo": {**PREFERENCE_PRESETS[raw["algorithm"]], **section}}
        return raw

    @model_validator(mode="after")
    def _check_batch(self) -> RunConfig:
        t = self.train
        if t.micro_batch_size is not None and t.micro_batch_size > t.batch_size:
            raise ValueError(
                f"train.micro_batch_size ({t.micro_batch_size}) exceeds train.batch_size ({t.batch_size})"
            )
        return self


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
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{name}: invalid config\n" + "\n".join(_explain(e, RunConfig))) from None


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
    """The resolved config as YAML, every default filled in (written to run_dir/config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _explain(err: ValidationError, root: type[BaseModel]) -> list[str]:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(root, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            hint = (
                f"; did you mean '{'.'.join(loc[:-1] + close)}'?"
                if close
                else f"; valid keys here: {', '.join(known)}"
            )
            lines.append(f"  unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return lines


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the section reached by following `loc` from `model`."""
    for part in loc:
        field = model.model_fields.get(part)
        sub = _section_type(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # Optional[Section]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
