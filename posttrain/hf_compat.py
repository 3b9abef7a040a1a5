"""transformers calls whose names changed inside the range pyproject.toml allows (4.56 to 5.x).

transformers 5.2x renamed the KV-cache argument and output `past_key_values` -> `cache`, and
`gradient_checkpointing_enable` / `is_gradient_checkpointing` -> `activation_checkpointing_*`. The old names
still work there but warn on every call, and will go. posttrain uses the name the installed model takes, so
the newest release is quiet and the oldest one still runs. A leaf module: it imports nothing of posttrain.
"""

from __future__ import annotations

import functools
import inspect

import torch


def core_model(model):
    """The Hugging Face model under a DDP / torch.compile / PEFT wrapper: the one whose `forward` names
    the arguments (a PEFT model passes `**kwargs` through to it)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module) and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
            inner = None if inner is model else inner
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


@functools.cache
def _takes_cache(model_type: type) -> bool:
    params = inspect.signature(model_type.forward).parameters
    if "cache" in params:
        return True
    if "past_key_values" in params:
        return False
    return _library_takes_cache()  # a forward of **kwargs only: go by what the library's own models take


@functools.cache
def _library_takes_cache() -> bool:
    from transformers import LlamaForCausalLM

    return "cache" in inspect.signature(LlamaForCausalLM.forward).parameters


def cache_inputs(model, cache) -> dict:
    """`{name: cache}` for `model(**inputs, **cache_inputs(model, cache))`: `cache=` where the model takes
    it (transformers >= 5.2x), else `past_key_values=`."""
    return {"cache" if _takes_cache(type(core_model(model))) else "past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned (`out.cache`, or `out.past_key_values` before the rename)."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(keys, values), each [B, H, L, D], of every layer of a plain `DynamicCache` whose layers all attend
    to the whole past, else None: a sliding window, a linear-attention state, a quantized or static cache
    cannot be cut into rows and joined again (turn carry-over is then off for that model)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if type(cache) is not DynamicCache:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A `DynamicCache` holding these (keys, values) per layer (as `cache_layers` gives them)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache


def enable_activation_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant, by whichever name the model has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_activation_checkpointing(model) -> bool:
    """Whether activation checkpointing is on (a DDP wrapper's inner model is asked)."""
    net = getattr(model, "module", model)
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name, then old
        if hasattr(type(net), flag) or hasattr(net, flag):
            return bool(getattr(net, flag))
    return False


def output_layer(model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [V, H], bias [V] or None) of the causal LM's output layer when the logits are exactly
    `hidden @ weight.T + bias` of the last hidden states, else None (a LoRA-wrapped or otherwise custom
    head, logit soft-capping, a logit scale): callers then use the model's own logits."""
    net = core_model(model)
    head = net.get_output_embeddings() if callable(getattr(net, "get_output_embeddings", None)) else None
    if type(head) is not torch.nn.Linear:
        return None
    config = getattr(net, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text, name, None) not in (None, 1, 1.0):
            return None
    return head.weight, head.bias
