"""One small module per algorithm family, and the two contracts they meet.

An algorithm is a module. :func:`get` reads it once into an :class:`Offline` or :class:`Online` record,
filling the optional hooks with their defaults; ``train.py``, the loop and the rollout source call the
record's fields and never probe the module.

**Offline** (SFT, reward model, DPO family, KTO): rows -> examples -> micro-batches -> a summed loss.

    KIND                       the row schema it reads ("sft", "preference", "feedback"; data/schemas.py)
    encode(row, tokenizer, cfg, where) -> Example | None     None: dropped by data.truncation
    Objective(cfg)             .weight(batch) -> units, .loss(model, batch) -> (summed loss, summed metrics)
                               (engine/loop.py's contract); optional .prepare(reference, examples,
                               indices, *, cache, collate_fn, micro_batch): once, before the first step
                               (the reference log-probs of DPO and KTO)
    load_model(cfg) -> model   optional; default: models.load_model(cfg.model)
    collate(examples, *, pad_id, packing, max_length) -> batch   optional; default: data.batching.collate
    save_final(model, tokenizer, out)                       optional; default: models.save_final

**Online** (GRPO family, PPO): prompt rows -> rollouts (rollout/source.py) -> micro-batches -> a summed
loss. The source generates, scores and annotates every rollout itself (sampling and reference log-probs,
the loss mask, values when the algorithm has a critic); the algorithm only says:

    forward(model, batch, temperature, *, share_prompts) -> (logits / temperature [N, C, V] or a
                               logprobs.HiddenHead, values [N, C] or None): the policy's distribution at each
                               completion token (and V(s_t)); logprobs.token_stats / token_logprobs read both
    advantages(rollout, cfg, kl_coef) -> {name: tensor}     pure: rollout.buffer.Rollout's tensors in,
                               "advantages" ([N], or [N, C] per token) and anything else the loss reads
                               ("returns") out; checked against numbers by hand like advantages.py
    Objective(cfg)             as offline, over the rollout's micro-batches; a micro-batch also holds the
                               step's "kl_coef" (the source's, possibly adapted) and "policy_token_budget"
                               (Dr. GRPO's constant: max_new_tokens, an episode's budget for agents)
    VALUES = True              optional; the trained module has a critic: the source asks `forward` for
                               the values of each rollout (PPO's old values)
    WHOLE_GROUPS = True        optional; minibatches and micro-batches hold whole groups of group_size
                               samples, in order (online DPO's pairs); default: samples are shuffled singly
    reference(cfg) -> ModelConfig | None                    optional; the frozen reference model the source
                               scores every rollout with (`ref_logps`); default: the policy as loaded when
                               rl.kl_coef > 0, else none
    load_model(cfg), save_final(...)                        optional, as offline
    policy(model) -> the causal LM the engine samples from  optional; default: the model itself

Adding an algorithm: write the module (the toy in tests/test_algorithm_contract.py is one screen), then
add its name to OFFLINE or ONLINE below and give it a run type in posttrain/config's RUN_TYPES (a subclass of
RunConfig with its own sections; an online one subclasses RolloutRun).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from posttrain.data.batching import collate
from posttrain.errors import ConfigError, unknown
from posttrain.models import load_model, save_final

OFFLINE = {
    "sft": "posttrain.algorithms.sft",
    "reward": "posttrain.algorithms.reward",
    "kto": "posttrain.algorithms.kto",
    "dpo": "posttrain.algorithms.preference",
    "orpo": "posttrain.algorithms.preference",
    "simpo": "posttrain.algorithms.preference",
}
ONLINE = {
    **dict.fromkeys(
        ("grpo", "dr_grpo", "dapo", "cispo", "gspo", "rloo", "reinforce_pp"), "posttrain.algorithms.grpo"
    ),
    "ppo": "posttrain.algorithms.ppo",
    "distill": "posttrain.algorithms.distill",
    "online_dpo": "posttrain.algorithms.online_dpo",
}


def _load_model(cfg):
    return load_model(cfg.model)


def _the_model(model):
    return model


def _kl_reference(cfg):
    """The KL term's reference: the policy as loaded (without its LoRA adapter), when rl.kl_coef > 0."""
    return cfg.model.model_copy(update={"lora": None}) if cfg.rl.kl_coef > 0 else None


@dataclass(frozen=True)
class Offline:
    """An offline algorithm, every hook filled (module docstring)."""

    name: str
    kind: str
    encode: Callable
    Objective: type
    load_model: Callable = _load_model
    collate: Callable = collate
    save_final: Callable = save_final


@dataclass(frozen=True)
class Online:
    """An online algorithm, every hook filled (module docstring)."""

    name: str
    forward: Callable
    advantages: Callable
    Objective: type
    values: bool = False
    load_model: Callable = _load_model
    save_final: Callable = save_final
    policy: Callable = _the_model
    kind: str = "prompt"
    whole_groups: bool = False
    reference: Callable = _kl_reference


def from_module(name: str, module, *, online: bool) -> Offline | Online:
    """The record of an algorithm module; a missing required hook is an error naming it."""
    required = ("forward", "advantages", "Objective") if online else ("KIND", "encode", "Objective")
    missing = [hook for hook in required if not hasattr(module, hook)]
    if missing:
        raise ConfigError(f"algorithm {name!r} ({module.__name__}) lacks {', '.join(missing)}")
    optional = ("load_model", "save_final") + (("policy", "reference") if online else ("collate",))
    hooks = {hook: getattr(module, hook) for hook in optional if hasattr(module, hook)}
    if online:
        return Online(
            name,
            module.forward,
            module.advantages,
            module.Objective,
            getattr(module, "VALUES", False),
            whole_groups=getattr(module, "WHOLE_GROUPS", False),
            **hooks,
        )
    return Offline(name, module.KIND, module.encode, module.Objective, **hooks)


def get(name: str) -> Offline | Online:
    """The algorithm ``name`` (an ``algorithm:`` of a config)."""
    if name not in OFFLINE and name not in ONLINE:
        raise ConfigError(unknown("algorithm", name, [*OFFLINE, *ONLINE]))
    online = name in ONLINE
    return from_module(name, import_module((ONLINE if online else OFFLINE)[name]), online=online)
