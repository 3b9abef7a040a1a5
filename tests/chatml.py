"""A byte-level BPE tokenizer trained here (no download) with a ChatML-style chat template: what real chat
models (Qwen, many fine-tunes) look like, where the char-level tiny tokenizer hides re-tokenisation bugs
(merges across the template's newlines, a token straddling a turn boundary)."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's layout: a turn is <|im_start|>role\ncontent<|im_end|>\n; tool results as a `tool` turn.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _corpus() -> list[str]:
    words = "the answer is what how many apples does she have left total sum of and plus minus times".split()
    lines = []
    for a in range(0, 100, 3):
        for b in range(1, 60, 7):
            w = words[(a + b) % len(words)]
            lines.append(f"What is {a} + {b}? {w} {a + b}\nassistant\nThe answer is {a + b}.\n")
    return lines


@functools.cache
def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """BPE + ChatML template; no bos (as Qwen), eos = <|im_end|>, pad = <|endoftext|>."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_trained(), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same BPE without a chat template, bos and eos = <|endoftext|> (a base model's tokenizer)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained(),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
