"""A byte-level BPE tokenizer trained here (no download) with a ChatML-style chat template: what real chat
models (Qwen, many fine-tunes) look like, where the char-level tiny tokenizer hides re-tokenisation bugs
(merges across the template's newlines, a token straddling a turn boundary, ids that a re-render changes).
One tokenizer for every test that needs it: templates and prompts, agent episodes, tool calls."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# Qwen2.5's layout: a turn is <|im_start|>role\ncontent<|im_end|>\n, tool results a `tool` turn, and the
# tools (when given) a system line of their names.
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    words = (
        "the result of the query is rows final line total price stock item red blue lamp mug select from "
        "items where name color answer calc tool call guess higher lower correct tests passed solution "
        "what how many apples does she have left sum of and plus minus times"
    ).split()
    lines = [f"{w} {i} {w}s {i * 7}+{i * 13} = {i * 20}" for i, w in enumerate(words * 8)]
    lines += ['<tool_call>{"name": "calc", "arguments": {"expr": "12+35"}}</tool_call>'] * 20
    for a in range(0, 100, 3):
        for b in range(1, 60, 7):
            lines.append(
                f"What is {a} + {b}? {words[(a + b) % len(words)]} {a + b}\nThe answer is {a + b}.\n"
            )
    return lines


@functools.cache
def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def chatml_tokenizer(template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """BPE + a ChatML template; no bos (as Qwen), eos = <|im_end|>, pad = <pad>."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_trained(),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template
    return tok


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same BPE without a chat template, bos and eos = <|endoftext|> (a base model's tokenizer)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained(),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
