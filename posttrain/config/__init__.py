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
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from posttrain.config.common import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from posttrain.config.offline import (
    KIND_OPTION_FIELDS,
    PREFERENCE_PRESETS,
    KTOOptions,
    PreferenceOptions,
    RewardOptions,
)
from posttrain.config.online import (
    GROUP_RL,
    ONLINE,
    ONLINE_TRAIN_DEFAULTS,
    RL_PRESETS,
    ROLLOUT_PRESETS,
    DistillOptions,
    EnvConfig,
    GroupRLOptions,
    PPOOptions,
    RLOptions,
    RolloutConfig,
    SandboxConfig,
)
from posttrain.errors import ConfigError, unknown
from posttrain.monitor.health import MonitorConfig
from posttrain.sections import Section, explain

__all__ = [
    "ALGORITHMS",
    "COMMON_SECTIONS",
    "DataConfig",
    "DistillOptions",
    "DistillRun",
    "EnvConfig",
    "GROUP_RL",
    "GroupRLOptions",
    "KIND_OPTION_FIELDS",
    "KTOOptions",
    "KTORun",
    "LoraConfig",
    "ModelConfig",
    "ONLINE",
    "ONLINE_TRAIN_DEFAULTS",
    "OWN_SECTIONS",
    "OnlineDPORun",
    "OnlineRun",
    "PPOOptions",
    "PPORun",
    "PREFERENCE_PRESETS",
    "PreferenceOptions",
    "PreferenceRun",
    "RLOptions",
    "RL_PRESETS",
    "ROLLOUT_PRESETS",
    "RUN_TYPES",
    "RewardOptions",
    "RewardRun",
    "RolloutConfig",
    "RolloutRun",
    "RunConfig",
    "SFTRun",
    "SandboxConfig",
    "TrainConfig",
    "apply_override",
    "dump_config",
    "load_config",
    "run_config",
]


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
        presets = [("dpo", PREFERENCE_PRESETS.get(algorithm)), ("rollout", ROLLOUT_PRESETS.get(algorithm))]
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


class DistillRun(RolloutRun):
    algorithm: Literal["distill"]
    rl: GroupRLOptions = GroupRLOptions()
    distill: DistillOptions


class OnlineDPORun(RolloutRun):
    """Online DPO (algorithms/online_dpo.py): a pair of the policy's own samples per prompt, ordered by the
    rewards of `rl.rewards`, trained with a `dpo` kind against a frozen reference (`dpo.ref_model`, default the
    policy as loaded). `rl` gives the rewards, epochs, minibatches and dynamic sampling (which replaces tied
    pairs); its clip and KL options are the GRPO family's and do not apply (dpo.beta is the KL strength)."""

    algorithm: Literal["online_dpo"]
    rl: RLOptions = RLOptions()
    dpo: PreferenceOptions = PreferenceOptions()

    @model_validator(mode="after")
    def _pairs(self) -> OnlineDPORun:
        micro, G = self.train.micro_batch_size, self.rollout.group_size
        if G != 2:
            raise ValueError(f"online_dpo: rollout.group_size must be 2 (one pair per prompt), got {G}")
        if micro is not None and micro % 2:
            raise ValueError(
                f"online_dpo: train.micro_batch_size ({micro}) must be even: a pair is never split"
            )
        if self.rl.kl_coef > 0:
            raise ValueError(
                "online_dpo: rl.kl_coef is the GRPO family's and PPO's; dpo.beta is the KL strength"
            )
        if self.env is not None:
            raise ValueError(
                "online_dpo trains on prompts; agent episodes (env) are the GRPO family's and PPO's"
            )
        return self


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
    "online_dpo": OnlineDPORun,
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
