"""One small module per algorithm family. An offline algorithm module provides:

KIND                      the row schema it reads ("sft", "preference", "feedback")
encode(row, tok, cfg, where) -> example or None (dropped by the truncation policy)
Objective(cfg)            .weight(batch) and .loss(model, batch), see engine/loop.py
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


def get(name: str):
    if name not in OFFLINE:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(OFFLINE)}")
    return import_module(OFFLINE[name])
