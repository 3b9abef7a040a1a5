"""Tool-call formats: how a call is written in an assistant turn, and how a turn is read back.

A :class:`ToolFormat` is a small strategy with three jobs: :meth:`~ToolFormat.render` calls (scripted
demos, SFT data), :meth:`~ToolFormat.parse` a sampled turn into typed :class:`~posttrain.agents.env.ToolCall`
outcomes, and the ``stop`` strings that end generation. Every delimited call in a turn comes back,
in order, with a :class:`~posttrain.agents.env.ParseStatus`: several calls in one turn parse (trl #4708
dropped parallel calls silently), a broken one never hides its neighbours, and nothing is dropped.

Two formats ship:

- ``tiny``: ``<call>name(arguments)</call>``, compact enough for a character-level model. A tool with one
  parameter takes the raw text between the parentheses (``<call>calc(1234+5678)</call>``,
  ``<call>sql(SELECT price FROM items)</call>``), or one Python literal (``answer("12")``); several
  parameters are Python literals, positional or by keyword (``replace("a.py", "x < 1", "x <= 1")``),
  read with ``ast.literal_eval``, never evaluated.
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format Qwen-style chat
  models (and vLLM's ``hermes`` parser) use.

By default generation runs to the end-of-turn token, so a turn can hold several calls;
``stop_after_call=True`` stops at the first closing tag instead (one call per turn, fewer tokens).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import ClassVar

from posttrain.agents.env import ParseStatus, ToolCall, validate_args
from posttrain.errors import ConfigError


class ToolFormat:
    """Base class; subclasses set the delimiters and write :meth:`_read` and :meth:`_write`."""

    name: ClassVar[str] = ""
    open: ClassVar[str] = ""
    close: ClassVar[str] = ""
    forge_markers: ClassVar[tuple[str, ...]] = ()
    """Observation wrappers the policy must never write itself (the runner adds the chat template's
    own tool-turn header to these)."""

    def __init__(self, *, stop_after_call: bool = False, tool_role: str = "tool"):
        self.stop_after_call = stop_after_call
        self.tool_role = tool_role

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings for generation (besides the end-of-turn token)."""
        return (self.close,) if self.stop_after_call else ()

    def render(self, calls: Sequence[tuple[str, dict]], tools: Sequence[dict]) -> str:
        """The text of ``calls`` ((name, args) pairs), one after the other, as this format writes them."""
        by_name = {t["function"]["name"]: t for t in tools}
        return "".join(
            f"{self.open}{self._write(name, args, by_name.get(name))}{self.close}" for name, args in calls
        )

    def parse(self, text: str, tools: Sequence[dict]) -> tuple[ToolCall, ...]:
        """Every call in ``text`` in order, each with its status and character span."""
        by_name = {t["function"]["name"]: t for t in tools}
        calls, pos = [], 0
        while (start := text.find(self.open, pos)) != -1:
            body = start + len(self.open)
            end, reopen = text.find(self.close, body), text.find(self.open, body)
            if end == -1 or (reopen != -1 and reopen < end):
                stop = reopen if reopen != -1 else len(text)
                detail = f"{self.open} without {self.close}"
                calls.append(
                    ToolCall(None, None, text[start:stop], ParseStatus.UNCLOSED, detail, (start, stop))
                )
                pos = stop
                continue
            stop = end + len(self.close)
            name, args, status, detail = self._read(text[body:end], by_name)
            if status == ParseStatus.OK:
                args, detail = validate_args(by_name[name], args)
                status = ParseStatus.OK if args is not None else ParseStatus.INVALID_ARGS
            calls.append(ToolCall(name, args, text[start:stop], status, detail, (start, stop)))
            pos = stop
        return tuple(calls)

    def _known(self, name: str, by_name: dict) -> str:
        return "" if name in by_name else f"unknown tool {name!r}; tools: {', '.join(by_name) or 'none'}"

    def _read(self, inner: str, by_name: dict) -> tuple[str | None, dict | None, ParseStatus, str]:
        raise NotImplementedError

    def _write(self, name: str, args: dict, schema: dict | None) -> str:
        raise NotImplementedError


_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.DOTALL)


def _as_call(raw: str) -> ast.Call:
    """``f(raw)`` parsed as one call; raises SyntaxError when the parentheses close early and the text
    reads as something else (``1)<(2`` makes ``f(1)<(2)``, a comparison: a sampled turn did this)."""
    body = ast.parse(f"f({raw})", mode="eval").body
    if not isinstance(body, ast.Call):
        raise SyntaxError("unbalanced parentheses")
    return body


class TinyFormat(ToolFormat):
    """``<call>name(arguments)</call>`` (module docstring)."""

    name = "tiny"
    open, close = "<call>", "</call>"
    forge_markers = ("<|tool|>",)

    def _read(self, inner, by_name):
        m = _CALL.fullmatch(inner)
        if not m:
            return None, None, ParseStatus.MALFORMED, "expected name(arguments)"
        name, raw = m.group(1), m.group(2)
        if unknown := self._known(name, by_name):
            return name, None, ParseStatus.UNKNOWN_TOOL, unknown
        params = list(by_name[name]["function"]["parameters"].get("properties", {}))
        if len(params) == 1:
            return name, self._one(raw, params[0]), ParseStatus.OK, ""
        if not raw.strip():
            return name, {}, ParseStatus.OK, ""
        try:
            call = _as_call(raw)
            values = [ast.literal_eval(a) for a in call.args]
            named = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError, TypeError) as e:
            return name, None, ParseStatus.INVALID_ARGS, f"arguments must be Python literals ({e})"
        if len(values) > len(params):
            return (
                name,
                None,
                ParseStatus.INVALID_ARGS,
                f"{len(values)} arguments for {len(params)} parameters",
            )
        if None in named:  # f(**x)
            return name, None, ParseStatus.INVALID_ARGS, "arguments must be Python literals"
        return name, {**dict(zip(params, values)), **named}, ParseStatus.OK, ""

    @staticmethod
    def _one(raw: str, param: str) -> dict:
        """One parameter: a single literal (positional or by name) if the text is one, else the raw text."""
        if not raw.strip():
            return {}
        try:
            call = _as_call(raw)
            if len(call.args) == 1 and not call.keywords:
                return {param: ast.literal_eval(call.args[0])}
            if not call.args and len(call.keywords) == 1 and call.keywords[0].arg == param:
                return {param: ast.literal_eval(call.keywords[0].value)}
        except (SyntaxError, ValueError, TypeError):
            pass
        return {param: raw.strip()}

    def _write(self, name, args, schema):
        params = list(schema["function"]["parameters"].get("properties", {})) if schema else list(args)
        if len(params) == 1 and params[0] in args:
            value = args[params[0]]
            plain = str(value)
            # raw text where it reads back as the same value, else a literal
            back = self._one(plain, params[0])
            if schema is not None:
                back = validate_args(schema, back)[0]
            if back == {params[0]: value}:
                return f"{name}({plain})"
            return f"{name}({value!r})"
        return f"{name}({', '.join(repr(args[p]) for p in params if p in args)})"


class HermesFormat(ToolFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen 2.5 / 3, Hermes)."""

    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"
    forge_markers = ("<tool_response>",)

    def render(self, calls, tools):
        return "\n".join(ToolFormat.render(self, [c], tools) for c in calls)

    def _read(self, inner, by_name):
        try:
            obj = json.loads(inner)
        except json.JSONDecodeError as e:
            return None, None, ParseStatus.INVALID_JSON, str(e)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None, None, ParseStatus.MALFORMED, 'expected {"name": ..., "arguments": {...}}'
        name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                return name, None, ParseStatus.INVALID_JSON, f"arguments: {e}"
        if unknown := self._known(name, by_name):
            return name, None, ParseStatus.UNKNOWN_TOOL, unknown
        if not isinstance(args, dict):
            return name, None, ParseStatus.INVALID_ARGS, "arguments must be an object"
        return name, args, ParseStatus.OK, ""

    def _write(self, name, args, schema):
        return "\n" + json.dumps({"name": name, "arguments": args}) + "\n"


FORMATS: dict[str, type[ToolFormat]] = {"tiny": TinyFormat, "hermes": HermesFormat}


def get_format(spec: str | ToolFormat, **options) -> ToolFormat:
    """A format by name (``tiny``, ``hermes``) or an instance (returned as is)."""
    if isinstance(spec, ToolFormat):
        return spec
    if spec not in FORMATS:
        raise ConfigError(f"unknown tool format {spec!r}; known: {', '.join(FORMATS)}")
    return FORMATS[spec](**options)
