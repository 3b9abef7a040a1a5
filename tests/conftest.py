import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


# A ChatML template with a tool role (Qwen-style), for a BPE tokenizer trained inside the tests: agent
# episodes must be token-exact with a tokenizer whose re-tokenisation is NOT the identity.
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_chat_tokenizer(template: str = CHATML_TOOLS):
    """A byte-level BPE (vocabulary ~600) trained here on chat-like text, with ChatML specials."""
    import pytest

    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    words = (
        "the result of the query is rows final line total price stock item red blue lamp mug select from "
        "items where name color answer calc tool call guess higher lower correct tests passed solution"
    )
    corpus = [f"{w} {i} {w}s {i * 7}+{i * 13} = {i * 20}" for i, w in enumerate(words.split() * 8)]
    corpus += ['<tool_call>{"name": "calc", "arguments": {"expr": "12+35"}}</tool_call>'] * 20
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template
    return tok


@__import__("pytest").fixture(scope="session")
def bpe_chat():
    return build_bpe_chat_tokenizer()
