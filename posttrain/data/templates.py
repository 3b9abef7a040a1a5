"""Chat templates to token ids and loss masks: the one place where loss masks are built.

Every training row ends up as an `Example`: token ids plus next-token targets, -100 where no loss is
taken. `encode_messages` is the only function that decides which tokens are assistant output; every
other encoder here goes through it or appends eos by hand.

Two pitfalls this module exists to catch loudly:
- a template without `{% generation %}` markers makes `return_assistant_tokens_mask` return all zeros,
  and a trainer built on it silently trains on nothing (or, if it falls back, on the prompt too). We
  locate assistant turns by rendering prefixes instead, and check the template is prefix-stable.
- a loss mask that stops before the end-of-turn token: the model never learns to stop. The token that
  closes an assistant turn is always a loss token.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import jinja2

from posttrain.errors import DataError

__all__ = [
    "Example",
    "Prompt",
    "encode_messages",
    "encode_prompt_completion",
    "encode_prompts",
    "encode_sft_row",
    "render_prompt",
    "to_example",
]

Prompt = str | list[dict]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("error", "drop", "truncate")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Tokens that close a turn in common template families, besides the tokenizer's eos.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (Qwen, many fine-tunes)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3 tool calls
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3, our tiny tokenizer
    "<|endoftext|>",
    "</s>",
)
_warned_no_end_token: set[str] = set()


@dataclass
class Example:
    """One tokenised training sequence.

    input_ids: [T] token ids.
    targets: [T] next-token targets: `targets[t] == input_ids[t + 1]` where position t + 1 is a loss token,
        else -100. The last entry is always -100 (nothing follows it).
    """

    input_ids: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def to_example(input_ids: list[int], loss_mask: list[bool]) -> Example:
    """Shift a per-token loss mask into next-token targets.

    `loss_mask[t]` says token t is one the model must learn to produce; it is predicted from position
    t - 1, so `targets[t - 1] = input_ids[t]`. `loss_mask[0]` has no effect (nothing predicts token 0).
    """
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and loss_mask ({len(loss_mask)}) differ in length")
    targets = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids[1:], loss_mask[1:])]
    return Example(input_ids=list(input_ids), targets=targets + [IGNORE_INDEX])


# --------------------------------------------------------------------------------------- chat messages


def encode_messages(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> tuple[list[int], list[bool]]:
    """Render `messages` with the tokenizer's chat template; return token ids and an assistant mask.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template.
        messages: [{"role": ..., "content": ...}, ...].
        add_generation_prompt: append the assistant header (for prompts that the model will complete).
        tools: JSON schemas of tools the template renders (agent demos: the episode's tools).

    Returns:
        (input_ids [T], is_assistant [T]): `is_assistant[t]` is True for tokens the assistant wrote,
        including the end-of-turn token that closes each assistant turn.

    Raises:
        DataError: no chat template; template not prefix-stable (only checked when it has no
        `{% generation %}` markers); assistant messages present but no token was marked as theirs.
    """
    template = _chat_template(tokenizer)
    if tools:  # every render below sees the same tools
        tokenizer = _WithTools(tokenizer, tools)
    if _GENERATION_TAG.search(template):
        ids, mask = _mask_from_generation_tags(tokenizer, messages, add_generation_prompt)
    else:
        ids, mask = _mask_from_prefix_renders(tokenizer, messages, add_generation_prompt)
    mask = _include_end_of_turn(tokenizer, ids, mask, template)

    n_assistant = sum(m.get("role") == "assistant" for m in messages)
    if n_assistant and not any(mask):
        raise DataError(
            f"the chat template marked 0 tokens as assistant output in a conversation with {n_assistant} "
            "assistant message(s); training on it would silently learn nothing. Check the template's "
            "{% generation %} markers, or remove them so assistant turns are located by prefix rendering."
        )
    return ids, mask


class _WithTools:
    """A tokenizer whose `apply_chat_template` always renders `tools` (everything else passes through)."""

    def __init__(self, tokenizer, tools: list[dict]):
        self._tokenizer, self._tools = tokenizer, tools

    def apply_chat_template(self, messages, **kwargs):
        return self._tokenizer.apply_chat_template(messages, tools=self._tools, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _chat_template(tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no chat template, so chat messages cannot be "
            "encoded; set one (tokenizer.chat_template) or use prompt/completion or text rows"
        )
    return tokenizer.get_chat_template()


def _apply_template(tokenizer, messages: list[dict], **kwargs):
    """tokenizer.apply_chat_template, with the template's own errors (e.g. "roles must alternate") as DataError."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template failed on this conversation: {e}") from e


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return _apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _mask_from_generation_tags(
    tokenizer, messages: list[dict], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    """The template marks assistant output itself with {% generation %} ... {% endgeneration %}."""
    enc = _apply_template(
        tokenizer,
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    return list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]


def _mask_from_prefix_renders(
    tokenizer, messages: list[dict], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    """Locate each assistant turn as the text between two renders, then map characters to tokens.

    Assistant turn i spans render(messages[:i], add_generation_prompt=True) up to
    render(messages[:i + 1]): its content plus whatever closes the turn. This holds only when every
    such render is a string prefix of the full render, which we check instead of assume (templates that
    rewrite earlier turns, e.g. dropping old reasoning, or that depend on the conversation length, fail).
    """
    full = _render(tokenizer, messages, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True)
        end_text = _render(tokenizer, messages[: i + 1], False)
        for prefix, what in (
            (start_text, f"the first {i} message(s) + generation prompt"),
            (end_text, f"the first {i + 1} message(s)"),
        ):
            if not full.startswith(prefix):
                raise DataError(
                    f"chat template is not prefix-stable: rendering {what} does not give a prefix of the "
                    "rendering of the whole conversation, so assistant turns cannot be located. Add "
                    "{% generation %} markers to the template or use a prefix-stable one.\n"
                    f"  partial render: ...{prefix[-60:]!r}\n  full render:    ...{full[: len(prefix)][-60:]!r}"
                )
        spans.append((len(start_text), len(end_text)))

    enc = _tokenize_with_offsets(tokenizer, full)
    ids = list(enc["input_ids"])
    # A token belongs to a span when it starts inside it; a token straddling the boundary (rare, BPE
    # merging header and content) starts in the prompt and stays a prompt token.
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return ids, mask


def _tokenize_with_offsets(tokenizer, text: str):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is a slow tokenizer: locating assistant tokens needs the offset "
            "mapping of a fast tokenizer (load it with use_fast=True)"
        )
    # add_special_tokens=False: chat templates write bos and other special tokens themselves.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


def _end_of_turn_ids(tokenizer) -> set[int]:
    # convert_tokens_to_ids, not get_vocab(): the latter builds a dict of the whole vocabulary per call.
    candidates = [tokenizer.eos_token_id, *map(tokenizer.convert_tokens_to_ids, _END_OF_TURN_TOKENS)]
    return {i for i in candidates if i is not None and i != tokenizer.unk_token_id}


def _assistant_spans(mask: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in `mask`."""
    spans, start = [], None
    for t, m in enumerate([*mask, False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _include_end_of_turn(tokenizer, ids: list[int], mask: list[bool], template: str) -> list[bool]:
    """Make each assistant span end exactly at the end-of-turn token that closes it.

    - `{% endgeneration %}` placed before the end token (the model would never learn to stop): extend
      the span by that token.
    - template glue after the end token (ChatML's newline after `<|im_end|>`, found by prefix
      rendering): drop it; generation stops at the end token, so the model never produces it.
    - no end token at all: warn once per template.
    """
    end_ids = _end_of_turn_ids(tokenizer)
    mask = list(mask)
    for a, b in _assistant_spans(mask):
        ends = [t for t in range(a, b) if ids[t] in end_ids]
        if ends:
            mask[ends[-1] + 1 : b] = [False] * (b - ends[-1] - 1)
        elif b < len(ids) and ids[b] in end_ids:
            mask[b] = True
        elif template not in _warned_no_end_token:
            _warned_no_end_token.add(template)
            log.warning(
                "an assistant turn ends without an end-of-turn token (eos or one of %s); the model may "
                "not learn to stop. Check the chat template.",
                ", ".join(_END_OF_TURN_TOKENS),
            )
    return mask


# ------------------------------------------------------------------------------------------- prompts


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text a policy continues for `prompt`. THE prompt rule, the same in every stage (SFT and DPO rows,
    reward-model scoring, rollouts, evaluation, generation):

    - a list of messages: the chat template, with the generation prompt;
    - a string, tokenizer with a chat template: one user turn holding it, the same way;
    - a string, tokenizer without a chat template: the string itself (`encode_prompts` puts bos before it).
    """
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    _chat_template(tokenizer)  # a clear error when there is none
    return _render(tokenizer, messages, True)


def encode_prompts(tokenizer, prompts: list[Prompt]) -> tuple[list[str], list[list[int]]]:
    """`render_prompt` of each prompt and its token ids (one batched tokenizer call): exactly the ids an
    SFT or DPO row with this prompt starts with (`encode_prompt_completion`)."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    if not texts:
        return [], []
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # templates write bos
    if not getattr(tokenizer, "chat_template", None):
        ids = [_bos(tokenizer) + x for x in ids]  # plain strings: bos as for a plain-text SFT row
    return texts, ids


# ---------------------------------------------------------------------------------- prompt/completion


def encode_prompt_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and its completion; `prompt_ids + completion_ids` is the full sequence.

    - strings, tokenizer without chat template: plain text; bos (if any) before the prompt, eos after
      the completion.
    - strings, tokenizer with chat template: [user: prompt] then [assistant: completion].
    - message lists (a string completion becomes one assistant message): the chat template.
    The prompt part is `encode_prompts`' (the rule of `render_prompt`), so sampling sees what training saw.
    With a chat template the completion ends at the token that closes the last assistant turn (what
    the template appends after it, e.g. ChatML's trailing newline, is never generated, so dropped).
    """
    prompt_ids, completion_ids, _ = _encode_prompt_completion(tokenizer, prompt, completion)
    return prompt_ids, completion_ids


def _encode_prompt_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int], list[bool]]:
    """As `encode_prompt_completion`, plus the loss mask over the completion tokens."""
    if (
        isinstance(prompt, str)
        and isinstance(completion, str)
        and not getattr(tokenizer, "chat_template", None)
    ):
        prompt_ids = _bos(tokenizer) + _plain_ids(tokenizer, prompt)
        completion_ids = _plain_ids(tokenizer, completion) + _eos(tokenizer)
        return prompt_ids, completion_ids, [True] * len(completion_ids)

    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion_msgs = (
        [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    )
    prompt_ids = encode_prompts(tokenizer, [prompt])[1][0]  # the one prompt rule
    full_ids, full_mask = encode_messages(tokenizer, prompt_msgs + completion_msgs)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the tokenised prompt (with generation prompt) is not a prefix of the tokenised prompt + "
            "completion, so the completion's tokens cannot be separated; the chat template or the "
            "tokenizer merges text across the prompt/completion boundary"
        )
    # Only assistant tokens of the completion part are trained; the prompt's own assistant turns are context.
    completion_mask = full_mask[len(prompt_ids) :]
    if not any(completion_mask):
        raise DataError("the completion has no assistant tokens (it needs at least one assistant message)")
    end = len(completion_mask) - completion_mask[::-1].index(True)
    return prompt_ids, full_ids[len(prompt_ids) : len(prompt_ids) + end], completion_mask[:end]


def _plain_ids(tokenizer, text: str) -> list[int]:
    # We place bos/eos ourselves, so no tokenizer adds them twice or in the middle of a sequence.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no eos token; a completion needs one to end"
        )
    return [tokenizer.eos_token_id]


# ------------------------------------------------------------------------------------------- SFT rows


def encode_sft_row(
    row: dict[str, Any], tokenizer, *, max_length: int, truncation: str = "error", where: str = ""
) -> Example | None:
    """Encode one normalised SFT row into an `Example`, applying the truncation policy.

    Args:
        row: {"messages": [...]} (loss on assistant tokens) | {"prompt": ..., "completion": ...} (loss on
            the completion) | {"text": str} (loss on every token; bos before, eos after).
        tokenizer: Hugging Face tokenizer.
        max_length: the longest sequence allowed, in tokens.
        truncation: "error" raises, "drop" returns None (the caller counts and reports drops),
            "truncate" keeps the first max_length tokens.
        where: location for error messages, e.g. "data/train.jsonl:17".

    Raises:
        DataError (naming `where`): unknown row shape, template problems, too long with
        truncation="error", or no loss token left.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    try:
        input_ids, loss_mask = _ids_and_loss_mask(row, tokenizer)
    except DataError as e:
        raise DataError(f"{_at(where)}{e}") from e

    truncated = len(input_ids) > max_length
    if truncated:
        if truncation == "error":
            raise DataError(
                f"{_at(where)}sequence has {len(input_ids)} tokens, more than max_length={max_length} "
                "(set data.truncation to 'drop' or 'truncate')"
            )
        if truncation == "drop":
            return None
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]

    example = to_example(input_ids, loss_mask)
    if example.num_loss_tokens == 0:
        cut = f" left after truncation to max_length={max_length}" if truncated else ""
        raise DataError(f"{_at(where)}row has no loss token{cut}; nothing to learn from it")
    return example


def _ids_and_loss_mask(row: dict[str, Any], tokenizer) -> tuple[list[int], list[bool]]:
    if "messages" in row:
        return encode_messages(tokenizer, row["messages"], tools=row.get("tools"))
    if "prompt" in row and "completion" in row:
        prompt_ids, completion_ids, completion_mask = _encode_prompt_completion(
            tokenizer, row["prompt"], row["completion"]
        )
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + completion_mask
    if "text" in row:
        ids = _bos(tokenizer) + _plain_ids(tokenizer, row["text"]) + _eos(tokenizer)
        return ids, [True] * len(ids)
    raise DataError(
        f"SFT row has keys {sorted(row)}; expected 'messages', 'prompt' + 'completion', or 'text'"
    )


def _at(where: str) -> str:
    return f"{where}: " if where else ""
