"""Load tokenizers and causal LMs (local path or hub name), optionally with a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import ConfigError
from posttrain.hf_compat import enable_activation_checkpointing, output_layer
from posttrain.logprobs import HiddenHead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _check_source(name: str, what: str) -> None:
    """A name that looks like a path must exist; offline, a hub name cannot be fetched.

    transformers would raise a long OSError about the hub for a mistyped local path; a user
    deserves to hear that the directory is not there.
    """
    # Hub names are "name" or "org/name"; anything else is a path.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise ConfigError(f"{what} not found: {name} (no such directory)")


# Any one of these makes a directory a tokenizer's (fast, sentencepiece, BPE vocab, or a config naming one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.path
    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    _check_source(name, "tokenizer path" if cfg.tokenizer else "model path")
    local = Path(name).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "there (tokenizer.save_pretrained), or set model.tokenizer to the directory or hub name that has it"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: files there that no installed backend can read
        raise ConfigError(f"{key}: cannot load the tokenizer in {name!r}: {e}") from None
    if tok.pad_token is None:
        # Padding positions are masked everywhere, so any id will do; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, trainable: bool = True):
    """The causal LM, with LoRA and gradient checkpointing applied as configured."""
    from transformers import AutoModelForCausalLM

    _check_source(cfg.path, "model path")
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load model {cfg.path!r}: {e}") from None
    model.config.use_cache = False  # training: a KV cache only costs memory (and disables packed masks)
    if cfg.gradient_checkpointing and trainable:
        enable_activation_checkpointing(model)
        if cfg.lora is not None:
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    if not trainable:
        model.requires_grad_(False).eval()
    return model


def freeze(model, patterns: list[str]) -> None:
    """Stop training the parameters whose names match any glob pattern (e.g. "*embed_tokens*")."""
    import fnmatch

    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatch(n, pattern) for n in names):
            raise ConfigError(f"model.freeze: {pattern!r} matches no parameter (e.g. {names[0]!r})")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            param.requires_grad_(False)


def add_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_final(model, tokenizer, out: Path) -> dict[str, str]:
    """Write a model that plain transformers loads. For LoRA, the adapter goes to
    out/adapter (loadable with peft) and the merged full model to out itself."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"final": str(out)}
    if is_peft(model):
        model.save_pretrained(out / "adapter")
        written["adapter"] = str(out / "adapter")
        model = model.merge_and_unload()
    model.config.use_cache = True  # for generation by whoever loads it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return written


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits [R, L, V] of a collated batch, padded or packed.

    Packed batches carry no attention_mask: transformers then reads sequence boundaries from
    the restarting position_ids. use_cache=False matters: a KV cache disables that detection.
    """
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    return model(**kwargs).logits


def forward_head(model, batch: dict):
    """`HiddenHead` (last hidden states [R, L, H] and the output layer) of a collated batch where the model's
    logits are a plain linear layer of them, else its logits [R, L, V] (`forward_logits`). Either goes to
    `logprobs.token_stats`; the first never builds the [R, L, V] logits (the model is asked to keep the
    logits of no position)."""
    layer = output_layer(model)
    if layer is None:
        return forward_logits(model, batch)
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    none = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    try:
        out = model(**kwargs, logits_to_keep=none, output_hidden_states=True)
    except TypeError as e:  # a model without logits_to_keep
        if "logits_to_keep" not in str(e):
            raise
        return forward_logits(model, batch)
    return HiddenHead(out.hidden_states[-1], *layer)
