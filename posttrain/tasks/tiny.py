"""A character-level tokenizer with a chat template, and tiny random-init causal LMs.

The quickstart, the tests and the benchmarks need a model that exists without a
download and trains in seconds on a laptop CPU. This module builds one from scratch:

- :func:`build_tokenizer`: one token per printable ASCII character (plus newline), nine
  special tokens, and a ChatML-like chat template whose assistant turns are wrapped in
  ``{% generation %}`` markers, so that ``return_assistant_tokens_mask`` works and
  assistant-only loss is never silently off. The template has a ``tool`` role (tool results
  in agent episodes, never inside the generation markers) and renders a ``tools=`` list as
  one compact system line (``tools: calc(expr) answer(value)``).
- :func:`build_model`: a Llama (or Qwen2) of a named size with random weights.
- :func:`build_tiny`: both, saved with ``save_pretrained`` so that everything downstream
  loads them by path with ``AutoTokenizer`` / ``AutoModelForCausalLM``, exactly like a
  hub model. Nothing in posttrain treats the tiny model specially.

Example::

    path = build_tiny("runs/tiny-base")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
"""Special tokens, in id order (``<pad>`` is id 0). ``<|end|>`` closes every turn and is the
eos token, so a model that learned the chat format stops by itself. ``</s>`` is kept for
compatibility with code that expects it, but nothing here emits it."""

TOOL_TOKEN = "<|tool|>"
"""Opens a tool-result turn (agent episodes). It comes after the characters in the vocabulary (id 104),
not among :data:`SPECIAL_TOKENS`, so that every id the tokenizer had before it was added is unchanged:
models built and trained before it read text exactly as they did."""

# Roles are single special tokens and turns end with <|end|>: "<|user|>12+35<|end|>". The
# assistant's content AND its closing <|end|> sit inside {% generation %}, so the assistant
# mask (and therefore the SFT loss) covers the end token: the model learns when to stop.
# The role token "<|assistant|>" stays outside: it is part of the prompt the model is given.
# Tool results ("<|tool|>...<|end|>") are context, outside the markers too. A tools= list becomes one
# short system line of signatures: a char-level model pays one token per character of a JSON schema.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:"
    "{% for t in tools %}{% set f = t['function'] if t['function'] is defined else t %}"
    " {{ f['name'] }}({{ f['parameters']['properties'] | join(',') }})"
    "{% endfor %}<|end|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Printable ASCII without the awkward whitespace (\t \r \x0b \x0c), plus newline. Anything else
# maps to <unk>, so text outside this alphabet does not round-trip: the bundled tasks use none.
CHARACTERS = list(string.printable[:95]) + ["\n"]

SIZES: dict[str, dict] = {
    # ~1.07M parameters: the reference model, learns 2-digit addition on 2 CPU cores in minutes.
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512},
    # ~25M parameters: big enough that compute (not Python overhead) dominates, for benchmarks.
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
    },
}

ARCHS: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def build_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer with the chat template.

    Args:
        model_max_length: recorded on the tokenizer; match the model's
            ``max_position_embeddings``. 1024 leaves room for agent episodes of a few tool turns
            (the rotary position embedding has no weights, so the length changes no parameter).

    Returns:
        A transformers fast tokenizer: bos ``<s>``, eos ``<|end|>``, pad ``<pad>``,
        unk ``<unk>``, left padding (what batched generation needs; training code that
        wants right padding says so per call). It adds no special tokens on its own:
        ``tok("12+35")`` is five ids, and the chat template does not emit ``<s>``.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab.setdefault(char, len(vocab))
    vocab[TOOL_TOKEN] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # WordLevel looks up whole pre-tokens; splitting into single characters makes it char-level.
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()  # join tokens back without inserting spaces
    # Registering the specials makes "<|user|>" in raw text one token (ids are reused from the vocab),
    # so chat-formatted pretraining text tokenizes exactly like the chat template's output.
    specials = [*SPECIAL_TOKENS, TOOL_TOKEN]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
        model_max_length=model_max_length,
        padding_side="left",
        # The default clean-up would turn "a ." into "a." on decode and break the round trip.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def padded_vocab_size(tokenizer, multiple: int = 64) -> int:
    """``len(tokenizer)`` rounded up to a multiple of ``multiple`` (aligned matmuls; spare rows
    also leave room to add tokens later without resizing)."""
    return -(-len(tokenizer) // multiple) * multiple


def build_config(
    tokenizer,
    size: str = "tiny",
    *,
    arch: str = "llama",
    max_position_embeddings: int = 1024,
    **overrides,
) -> PretrainedConfig:
    """The model config :func:`build_model` uses, without allocating weights.

    Args:
        tokenizer: supplies the vocabulary size and the bos/eos/pad ids.
        size: a key of :data:`SIZES`.
        arch: ``"llama"`` or ``"qwen2"`` (same shapes; Qwen2 adds q/k/v biases).
        max_position_embeddings: longest sequence the model accepts.
        **overrides: any config field, applied last (e.g. ``num_hidden_layers=2``).

    Raises:
        ValueError: on an unknown size or arch.
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    fields = dict(SIZES[size])
    # Full multi-head attention: grouped-query attention saves nothing worth having at this size.
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    fields.update(
        vocab_size=padded_vocab_size(tokenizer),
        max_position_embeddings=max_position_embeddings,
        # Tied input/output embeddings: at 1M parameters an untied head would be 1.5% extra for nothing.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    return ARCHS[arch](**fields)


def build_model(
    tokenizer,
    size: str = "tiny",
    *,
    arch: str = "llama",
    max_position_embeddings: int = 1024,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM for ``tokenizer`` (arguments as :func:`build_config`).

    The same ``seed`` gives the same weights. The global torch RNG is left as it was, so
    building a model in the middle of a run does not change that run's random stream.
    """
    config = build_config(
        tokenizer, size, arch=arch, max_position_embeddings=max_position_embeddings, **overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def num_parameters(config: PretrainedConfig) -> int:
    """Parameter count of the model ``config`` describes (tied weights counted once),
    computed on the meta device, so no memory is allocated even for big configs."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.num_parameters()


def build_tiny(out_dir: str | Path, size: str = "tiny", arch: str = "llama", seed: int = 0) -> Path:
    """Build the tokenizer and a random model and save both into ``out_dir``.

    The folder then loads like any hub model: ``AutoTokenizer.from_pretrained(out_dir)``
    and ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(
        tokenizer, size, arch=arch, max_position_embeddings=tokenizer.model_max_length, seed=seed
    )
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
