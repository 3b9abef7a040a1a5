"""Loss masks: which tokens are trained, for every row shape and template style."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from posttrain.data.templates import (
    IGNORE_INDEX,
    encode_messages,
    encode_prompt_completion,
    encode_sft_row,
    to_example,
)
from posttrain.errors import DataError
from posttrain.tasks.tiny import build_tokenizer

# Templates for the bundled tokenizer's special tokens: with {% generation %} markers, and without.
MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLAIN = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# {% endgeneration %} before the end token: the mask must still include <|end|>.
MARKED_END_OUTSIDE = MARKED.replace("<|end|>{% endgeneration %}", "{% endgeneration %}<|end|>")
# ChatML-like newline after each end token: template glue, not something the model generates.
PLAIN_NEWLINE = PLAIN.replace("<|end|>", "<|end|>\n")
# Depends on the conversation length: renders of a prefix are not prefixes of the full render.
UNSTABLE = "[{{ messages | length }}]" + PLAIN

CHAT_1 = [{"role": "user", "content": "12+35"}, {"role": "assistant", "content": "47"}]
CHAT_2 = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "12+35"},
    {"role": "assistant", "content": "47"},
    {"role": "user", "content": "1+1"},
    {"role": "assistant", "content": "2"},
]


def make_tokenizer(template: str | None = MARKED) -> PreTrainedTokenizerFast:
    """The bundled char-level tokenizer (roles are single special tokens) with `template`."""
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


def masked_text(tok, ids: list[int], mask: list[bool]) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def target_text(tok, example) -> str:
    return tok.decode([t for t in example.targets if t != IGNORE_INDEX])


# ------------------------------------------------------------------------------------ encode_messages


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["markers", "no-markers"])
def test_one_turn_mask_is_answer_plus_end_token(template):
    tok = make_tokenizer(template)
    ids, mask = encode_messages(tok, CHAT_1)
    assert tok.decode(ids) == "<|user|>12+35<|end|><|assistant|>47<|end|>"
    assert masked_text(tok, ids, mask) == "47<|end|>"


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["markers", "no-markers"])
def test_two_turn_mask_covers_both_answers_only(template):
    tok = make_tokenizer(template)
    ids, mask = encode_messages(tok, CHAT_2)
    assert masked_text(tok, ids, mask) == "47<|end|>2<|end|>"
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert (
        unmasked
        == "<|system|>be brief<|end|><|user|>12+35<|end|><|assistant|><|user|>1+1<|end|><|assistant|>"
    )


def test_end_token_outside_generation_markers_becomes_a_loss_token():
    tok = make_tokenizer(MARKED_END_OUTSIDE)
    ids, mask = encode_messages(tok, CHAT_2)
    assert masked_text(tok, ids, mask) == "47<|end|>2<|end|>"


def test_template_glue_after_end_token_is_not_a_loss_token():
    tok = make_tokenizer(PLAIN_NEWLINE)
    ids, mask = encode_messages(tok, CHAT_2)
    assert tok.decode(ids).count("\n") == 5
    assert masked_text(tok, ids, mask) == "47<|end|>2<|end|>"


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["markers", "no-markers"])
def test_generation_prompt_without_assistant_turns(template):
    tok = make_tokenizer(template)
    ids, mask = encode_messages(tok, CHAT_1[:1], add_generation_prompt=True)
    assert tok.decode(ids) == "<|user|>12+35<|end|><|assistant|>"
    assert not any(mask)


def test_zero_assistant_tokens_is_an_error():
    # Markers around nothing: the classic silently-empty assistant mask.
    broken = MARKED.replace(
        "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}",
        "{% generation %}{% endgeneration %}{{ message['content'] }}",
    )
    with pytest.raises(DataError, match="0 tokens as assistant output"):
        encode_messages(make_tokenizer(broken), CHAT_1)


def test_template_that_is_not_prefix_stable_is_an_error():
    with pytest.raises(DataError, match="not prefix-stable"):
        encode_messages(make_tokenizer(UNSTABLE), CHAT_1)


def test_template_exception_becomes_data_error():
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
        + PLAIN
    )
    with pytest.raises(DataError, match="must start with user"):
        encode_messages(make_tokenizer(strict), CHAT_2)


def test_messages_without_chat_template_is_an_error():
    with pytest.raises(DataError, match="no chat template"):
        encode_messages(make_tokenizer(None), CHAT_1)


# --------------------------------------------------------------------------- prompt / completion


@pytest.mark.parametrize("template", [MARKED, PLAIN_NEWLINE], ids=["markers", "no-markers"])
def test_prompt_completion_strings_with_chat_template(template):
    tok = make_tokenizer(template)
    prompt_ids, completion_ids = encode_prompt_completion(tok, "1+2", "3")
    assert (
        tok.decode(prompt_ids) == "<|user|>1+2<|end|>" + ("\n" if "\n" in template else "") + "<|assistant|>"
    )
    assert tok.decode(completion_ids) == "3<|end|>"  # no trailing template newline


def test_prompt_completion_strings_without_chat_template():
    tok = make_tokenizer(None)
    prompt_ids, completion_ids = encode_prompt_completion(tok, "1+2", "3")
    assert tok.decode(prompt_ids) == "<s>1+2"
    assert tok.decode(completion_ids) == "3<|end|>"


def test_prompt_completion_message_lists():
    tok = make_tokenizer(PLAIN)
    prompt_ids, completion_ids = encode_prompt_completion(
        tok, CHAT_2[:4], [{"role": "assistant", "content": "2"}]
    )
    assert tok.decode(prompt_ids + completion_ids) == tok.apply_chat_template(CHAT_2, tokenize=False)
    assert tok.decode(completion_ids) == "2<|end|>"


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["markers", "no-markers"])
def test_prompt_completion_row_trains_only_the_completion(template):
    # The prompt's own assistant turn ("47") is context here, unlike in a messages row.
    tok = make_tokenizer(template)
    ex = encode_sft_row({"prompt": CHAT_2[:4], "completion": "2"}, tok, max_length=256)
    assert target_text(tok, ex) == "2<|end|>"
    ex = encode_sft_row({"messages": CHAT_2}, tok, max_length=256)
    assert target_text(tok, ex) == "47<|end|>2<|end|>"


def test_text_row_trains_every_token_with_bos_and_eos():
    tok = make_tokenizer(MARKED)
    ex = encode_sft_row({"text": "hello"}, tok, max_length=256)
    assert tok.decode(ex.input_ids) == "<s>hello<|end|>"
    assert ex.targets == ex.input_ids[1:] + [IGNORE_INDEX]


# ------------------------------------------------------------------------------ targets, truncation


def test_to_example_shifts_the_mask():
    ex = to_example([10, 11, 12, 13, 14], [False, False, True, True, False])
    assert ex.input_ids == [10, 11, 12, 13, 14]
    assert ex.targets == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["markers", "no-markers"])
def test_targets_are_next_tokens_exactly_on_loss_positions(template):
    tok = make_tokenizer(template)
    ids, mask = encode_messages(tok, CHAT_2)
    ex = encode_sft_row({"messages": CHAT_2}, tok, max_length=256)
    assert ex.input_ids == ids and ex.targets[-1] == IGNORE_INDEX
    for t in range(len(ids) - 1):
        assert ex.targets[t] == (ids[t + 1] if mask[t + 1] else IGNORE_INDEX)


def test_too_long_row_errors_with_location_and_lengths():
    tok = make_tokenizer(MARKED)
    n = len(encode_messages(tok, CHAT_2)[0])
    with pytest.raises(DataError) as err:
        encode_sft_row({"messages": CHAT_2}, tok, max_length=10, where="data/train.jsonl:17")
    msg = str(err.value)
    assert msg.startswith("data/train.jsonl:17: ")
    assert f"{n} tokens" in msg and "max_length=10" in msg and "'drop' or 'truncate'" in msg


def test_drop_returns_none_and_truncate_keeps_the_start():
    tok = make_tokenizer(MARKED)
    full = encode_sft_row({"messages": CHAT_2}, tok, max_length=256)
    assert encode_sft_row({"messages": CHAT_2}, tok, max_length=25, truncation="drop") is None
    cut = encode_sft_row({"messages": CHAT_2}, tok, max_length=25, truncation="truncate")
    assert len(full.input_ids) == 29 and cut.input_ids == full.input_ids[:25]
    assert cut.targets == full.targets[:24] + [IGNORE_INDEX]
    assert target_text(tok, cut) == "47<|end|>"  # the second answer was cut off


def test_truncation_that_removes_every_loss_token_is_an_error():
    tok = make_tokenizer(MARKED)
    with pytest.raises(DataError, match=r"^x.jsonl:3: row has no loss token left after truncation"):
        encode_sft_row({"messages": CHAT_2}, tok, max_length=15, truncation="truncate", where="x.jsonl:3")


def test_row_without_loss_tokens_is_an_error():
    tok = make_tokenizer(PLAIN)
    with pytest.raises(DataError, match=r"^x.jsonl:4: row has no loss token;"):
        encode_sft_row({"messages": CHAT_1[:1]}, tok, max_length=256, where="x.jsonl:4")


def test_template_errors_name_the_row():
    with pytest.raises(DataError, match=r"^x.jsonl:5: chat template is not prefix-stable"):
        encode_sft_row({"messages": CHAT_1}, make_tokenizer(UNSTABLE), max_length=256, where="x.jsonl:5")
    with pytest.raises(DataError, match=r"^x.jsonl:6: SFT row has keys \['question'\]"):
        encode_sft_row({"question": "?"}, make_tokenizer(), max_length=256, where="x.jsonl:6")
