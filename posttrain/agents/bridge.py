"""Bridge tokens: the chat template's tokens between one sampled turn and the next, and the check that
the stitched ids are what the template would have rendered.

The runner never re-tokenises what the policy sampled (decode → encode is not the identity: a BPE
tokenizer has many tokenizations of one string, and the policy sampled one of them). The ids it trains
on are ``prompt + sampled_1 + bridge_1 + sampled_2 + ...``, where a bridge is the template's text
after an assistant turn's content: the end of the turn, the observation messages and the next
generation prompt. It is the delta of two renders of a dummy conversation (TRL's
``_get_tool_suffix_ids``, verifiers' ``get_prompt_ids``, SkyRL's ``get_obs_ids_from_obs``):

    render([user, assistant(DUMMY), *observation], generation prompt)[after DUMMY:]

computed once per tokenizer and template for the turn's closing text, and per observation for its
content. When the policy already sampled the end-of-turn token (the usual stop), the bridge starts
after it; when a stop string ended the turn, the bridge closes the turn itself.

At the end of every episode :meth:`TemplateBridge.verify` renders the whole conversation with the
template and compares its text with the decoded ids. Equal text with different ids is the expected
case (the sampled tokenization is not the canonical one: ``retokenized`` counts the ids a naive
re-render would have got wrong); different text is drift (a template that is not append-only, e.g.
one that drops earlier turns' reasoning) and is labelled ``tokenization.drift``.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.errors import ConfigError

DUMMY = "DUMMYCONTENT"
_PROBE = "PROBERESULT"


@dataclass(frozen=True)
class Verification:
    text_equal: bool  # the template's render and the decoded ids are the same text
    retokenized: int  # positions where re-encoding the render would differ from the ids (0: none)
    expected: str  # the render (for the report when they differ)


class TemplateBridge:
    """Bridges and checks for one tokenizer's chat template.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        tool_role: the role of tool-result messages (``tool``; ``user`` for templates without one).

    Raises:
        ConfigError: the template cannot render a tool turn after an assistant turn, or renders the
            assistant's content in a way no bridge can follow (the message names the template's error).
    """

    def __init__(self, tokenizer, *, tool_role: str = "tool"):
        self.tokenizer = tokenizer
        self.tool_role = tool_role
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("agent episodes need a tokenizer with a chat template; this one has none")
        base = self._base()
        try:
            closed = self.render(base)
            probe = self.render([*base, {"role": tool_role, "content": _PROBE}], generation=True)
        except Exception as e:  # a Jinja TemplateError or the template's own raise_exception
            raise ConfigError(
                f"the chat template cannot render a {tool_role!r} message after an assistant turn ({e}); "
                "give the tokenizer a template with that role, or use tool_role='user'"
            ) from e
        if DUMMY not in closed:
            raise ConfigError("the chat template does not render an assistant message's content verbatim")
        self.content_end = closed.rindex(DUMMY) + len(DUMMY)
        self.close_text = closed[self.content_end :]  # what the template writes after the content
        if probe[: self.content_end] != closed[: self.content_end] or _PROBE not in probe:
            raise ConfigError("the chat template renders earlier turns differently once a tool turn follows")
        after = probe[self.content_end :]
        # The observation header the policy must never write itself, e.g. "<|im_start|>tool".
        header = after[: after.index(_PROBE)]
        header = header[len(self.close_text) :] if header.startswith(self.close_text) else header
        self.header = header.strip()
        self.eos_texts = {self._token_text(i) for i in self._eos_ids()}

    def _base(self) -> list[dict]:
        return [{"role": "user", "content": "U"}, {"role": "assistant", "content": DUMMY}]

    def _eos_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, generation: bool = False
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=generation
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """The opening messages with the generation prompt (how every online stage encodes prompts)."""
        return self.encode(self.render(messages, tools=tools, generation=True))

    def observation(self, observation: list[dict], last_token: int | None) -> tuple[str, list[int]]:
        """Bridge text and ids after an assistant turn whose last sampled token was ``last_token``."""
        text = self.render([*self._base(), *observation], generation=True)[self.content_end :]
        sampled = self._token_text(last_token) if last_token is not None else ""
        if sampled and sampled in self.eos_texts and text.startswith(sampled):
            text = text[len(sampled) :]  # the policy closed its turn itself
        return text, self.encode(text)

    def verify(
        self, messages: list[dict], tools: list[dict] | None, ids: list[int], *, open_turn: bool
    ) -> Verification:
        """Compare ``ids`` (prompt + everything appended) with the template's render of ``messages``.

        Args:
            open_turn: True when the ids end with a bridge (a generation prompt), False when they end
                with a sampled turn, which is then compared up to its content (and its end-of-turn token
                if it sampled one).
        """
        if open_turn:
            expected = self.render(messages, tools=tools, generation=True)
        else:
            full = self.render(messages, tools=tools)
            expected = full[: len(full) - len(self.close_text)] if full.endswith(self.close_text) else full
            if ids and ids[-1] in self._eos_ids():
                expected += self._token_text(ids[-1])
        canonical = self.encode(expected)
        decode = lambda x: self.tokenizer.decode(x, skip_special_tokens=False)  # noqa: E731
        text_equal = decode(ids) == decode(canonical)
        retokenized = sum(a != b for a, b in zip(ids, canonical)) + abs(len(ids) - len(canonical))
        return Verification(text_equal, retokenized, expected)


TRUNCATION_MARKER = "[...]"


def truncate_tokens(tokenizer, text: str, limit: int, *, keep: str = "tail") -> tuple[str, bool, int, int]:
    """Cut ``text`` to at most ``limit`` tokens (counted alone, ``add_special_tokens=False``).

    The rule, the same at every boundary: a text of ``limit`` tokens or fewer is kept as it is (an exact
    fit is never cut, verl PR #6309); a longer one keeps its tail (``keep="tail"``, where tracebacks and
    test summaries put what matters; verl PR #6313 kept the head by mistake) or its head, with
    :data:`TRUNCATION_MARKER` on the cut side, and the result, re-encoded, has at most ``limit`` tokens.

    Returns:
        (text, truncated, tokens before, tokens after).
    """
    if keep not in ("tail", "head"):
        raise ValueError(f"keep must be 'tail' or 'head', got {keep!r}")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = encode(text)
    if len(ids) <= limit:
        return text, False, len(ids), len(ids)
    room = limit - len(encode(TRUNCATION_MARKER))
    while room > 0:
        part = tokenizer.decode(ids[-room:] if keep == "tail" else ids[:room], skip_special_tokens=False)
        out = TRUNCATION_MARKER + part if keep == "tail" else part + TRUNCATION_MARKER
        n = len(encode(out))
        if n <= limit:  # re-encoding can merge across the cut; give back tokens until it fits
            return out, True, len(ids), n
        room -= 1
    raise ValueError(f"max_tool_tokens={limit} leaves no room beside the truncation marker")
