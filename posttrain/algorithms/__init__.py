"""One small module per algorithm family. An offline algorithm module provides:

KIND                      the row schema it reads ("sft", "preference", "feedback")
encode(row, tok, cfg, where) -> example or None (dropped by the truncation policy)
Objective(cfg)            .weight(batch) and .loss(model, batch), see engine/loop.py

An online one (reads "prompt" rows; see posttrain/rollout/source.py) provides:

forward(model, batch, temperature) -> (logits / temperature, values or None)
annotate(source, model, buffer)    per-token tensors of a fresh rollout (old / reference log-probs, values)
advantages(cfg, buffer)            the advantages of a rollout
Objective(cfg)                     as above, over rollout micro-batches
"""

from importlib import import_module

from posttrain.errors import ConfigError

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
}


def get(name: str):
    modules = {**OFFLINE, **ONLINE}
    if name not in modules:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(modules)}")
    return import_module(modules[name])
