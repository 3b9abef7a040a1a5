"""What a row of each kind of training data looks like, and checks that say exactly what is wrong.

Kinds and their accepted shapes (extra keys such as ``id`` or ``source`` are always allowed
and kept untouched):

- ``sft``: ``{"messages": [...]}`` with at least one assistant message; or
  ``{"prompt", "completion"}``, both strings or both message lists (completion messages are
  assistant turns); or ``{"text"}`` for plain language modelling (loss on every token).
- ``preference``: ``{"prompt", "chosen", "rejected"}``, all strings, or all message lists
  (chosen/rejected as assistant turns). chosen and rejected must differ.
- ``feedback`` (unpaired, KTO): ``{"prompt", "completion", "label"}``; label is a bool,
  also accepted as 1/0 or "true"/"false" (as csv gives it) and normalised to bool.
- ``prompt`` (online RL): ``{"prompt"}``, a string or messages; other fields (``answer``,
  ``tests``) ride along for the reward functions.

Pydantic checks types field by field; this module picks the shape by which keys a row has
(rather than letting a pydantic Union try each shape and report every failure) and turns
pydantic's errors into one line each: ``path:line: field 'messages[2].role': ...``.
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from posttrain.data.io import MAX_ERRORS, Location, Row, raise_if_errors, read_rows, type_name
from posttrain.errors import DataError

KINDS = ("sft", "preference", "feedback", "prompt")
ROLES = ("system", "user", "assistant", "tool")


# --- Field types -----------------------------------------------------------------------------


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


# Text the model is trained to produce, or must answer: an empty one is always a data bug.
Target = Annotated[StrictStr, AfterValidator(_not_blank)]

_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def _to_bool(value: Any) -> Any:
    """Accept true/false, 1/0 and their strings (csv has no booleans); reject the rest.

    Pydantic's own bool parsing would also take "yes", "on", "t"..., too loose for a label.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true/false or 1/0 (got {value!r})")


Label = Annotated[bool, BeforeValidator(_to_bool)]


class Message(BaseModel):
    """One chat turn. Extra keys (``name``, ``tool_calls``...) are kept for the chat template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr

    @field_validator("content")
    @classmethod
    def _assistant_content_not_blank(cls, content: str, info: ValidationInfo) -> str:
        # An empty assistant turn trains the model to say nothing; other roles may be empty.
        if info.data.get("role") == "assistant" and not content.strip():
            raise ValueError("must not be empty (assistant message)")
        return content


class AssistantMessage(Message):
    """A turn the model is trained to produce."""

    role: Literal["assistant"]


Messages = Annotated[list[Message], Field(min_length=1)]
AssistantMessages = Annotated[list[AssistantMessage], Field(min_length=1)]


# --- Row shapes ------------------------------------------------------------------------------


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")  # extra keys are kept untouched


class SFTMessages(_Row):
    messages: Messages

    @field_validator("messages")
    @classmethod
    def _has_assistant_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in messages):
            roles = ", ".join(m.role for m in messages)
            raise ValueError(f"needs at least one assistant message (roles: {roles})")
        return messages


class SFTText(_Row):
    text: Target


class SFTPromptCompletion(_Row):
    prompt: StrictStr
    completion: Target


class SFTPromptCompletionChat(_Row):
    prompt: Messages
    completion: AssistantMessages


class _Pair(_Row):
    @model_validator(mode="after")
    def _chosen_differs(self) -> _Pair:
        # Identical pairs give zero preference gradient and usually mean a broken export.
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are identical")
        return self


class PreferenceText(_Pair):
    prompt: StrictStr
    chosen: Target
    rejected: Target


class PreferenceChat(_Pair):
    prompt: Messages
    chosen: AssistantMessages
    rejected: AssistantMessages


class FeedbackText(_Row):
    prompt: StrictStr
    completion: Target
    label: Label


class FeedbackChat(_Row):
    prompt: Messages
    completion: AssistantMessages
    label: Label


class PromptText(_Row):
    prompt: Target


class PromptChat(_Row):
    prompt: Messages


# kind -> (fields that mark the kind, (string shape, conversational shape)); sft is special-cased.
_SHAPES: dict[str, tuple[tuple[str, ...], tuple[type[_Row], type[_Row]]]] = {
    "sft": (("prompt", "completion"), (SFTPromptCompletion, SFTPromptCompletionChat)),
    "preference": (("prompt", "chosen", "rejected"), (PreferenceText, PreferenceChat)),
    "feedback": (("prompt", "completion", "label"), (FeedbackText, FeedbackChat)),
    "prompt": (("prompt",), (PromptText, PromptChat)),
}

# What a row of each kind needs, as said in "no ... field" messages.
_EXPECTED = {
    "sft": "'messages', 'prompt'/'completion' or 'text'",
    "preference": "'prompt', 'chosen' or 'rejected'",
    "feedback": "'prompt', 'completion' or 'label'",
    "prompt": "'prompt'",
}
_FIELDS = {
    "sft": ("messages", "prompt", "completion", "text"),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}


# --- Public API ------------------------------------------------------------------------------


def detect_kind(row: dict) -> str | None:
    """Guess a row's kind from its keys; None when nothing fits.

    Order matters where real datasets carry several: preference sets often also hold the
    chosen conversation as ``messages`` (UltraFeedback), and KTO sets have ``prompt`` and
    ``completion`` beside ``label``, so those are tested before the sft keys.
    """
    if not isinstance(row, dict):
        return None
    keys = _present(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"completion", "label"} <= keys:
        return "feedback"
    if keys & {"messages", "text"} or {"prompt", "completion"} <= keys:
        return "sft"
    if "prompt" in keys:
        return "prompt"
    return None


def validate_rows(
    rows: list[tuple[Location, Row]], kind: str, *, max_errors: int = MAX_ERRORS
) -> list[tuple[Location, Row]]:
    """Check every row against ``kind``'s schema and return the normalised rows.

    Normalised: the schema's fields in canonical form (messages as plain ``{"role",
    "content", ...}`` dicts, labels as bool), every other key untouched, key order kept.

    Raises:
        DataError: listing the problems of all rows (up to ``max_errors`` of them, then
            "... and N more"), each as ``path:line: field 'x': what is wrong``. Nothing is
            returned unless every row is valid.
    """
    _check_kind(kind)
    if not rows:
        raise DataError("no rows to validate")
    normalised: list[tuple[Location, Row]] = []
    errors: list[str] = []
    bad_rows = 0
    for loc, row in rows:
        clean, problems = _validate_row(row, kind)
        if problems:
            bad_rows += 1
            errors.extend(f"{loc}: {problem}" for problem in problems)
        else:
            normalised.append((loc, clean))
    paths = ", ".join(sorted({loc.path for loc, _ in rows}))
    header = f"{paths}: {len(errors)} problems in {bad_rows} of {len(rows)} rows (checked as {kind} data):"
    raise_if_errors(header, errors, max_errors)
    return normalised


def load_rows(path: str | os.PathLike, kind: str | None = None) -> list[tuple[Location, Row]]:
    """Read a dataset and validate it as ``kind``, or as the kind its first row looks like."""
    if kind is not None:
        _check_kind(kind)  # before reading: a typo in the kind should not wait for a big file
    rows = read_rows(path)
    if kind is None:
        loc, first = rows[0]
        kind = detect_kind(first)
        if kind is None:
            fields = sorted({f for fs in _FIELDS.values() for f in fs} | {"label"})
            raise DataError(
                f"{loc}: cannot tell the kind of data from its fields (found: {_found(first)}); "
                "expected 'messages', 'text' or 'prompt'+'completion' (sft), 'chosen'+'rejected' "
                f"(preference), 'completion'+'label' (feedback) or 'prompt' (prompt)"
                f"{_did_you_mean(first, fields)}"
            )
    return validate_rows(rows, kind)


# --- One row ---------------------------------------------------------------------------------


def _validate_row(row: Any, kind: str) -> tuple[Row, list[str]]:
    """The normalised row and no problems, or the row's problems as one phrase each."""
    if not isinstance(row, dict):
        return row, [f"expected an object (got {type_name(row)})"]
    shape = _pick_shape(row, kind)
    if isinstance(shape, str):
        return row, [shape]
    try:
        model = shape.model_validate(row)
    except ValidationError as e:
        return row, [_describe(error) for error in e.errors()]
    fields = model.model_dump(include=set(type(model).model_fields))
    return {**row, **fields}, []


def _pick_shape(row: Row, kind: str) -> type[_Row] | str:
    """The model for this row's shape, or a message saying why no shape fits."""
    keys = _present(row)
    if kind == "sft":
        if "messages" in keys:
            return SFTMessages
        if "text" in keys and not keys & {"prompt", "completion"}:
            return SFTText
    fields, (text_shape, chat_shape) = _SHAPES[kind]
    if not keys & set(_FIELDS[kind]):
        return f"no {_EXPECTED[kind]} field (found: {_found(row)}){_did_you_mean(row, _FIELDS[kind])}"
    # String or conversational: decided by the fields themselves, and they must agree, or
    # the pydantic error would blame whichever field happened to disagree with the first.
    texts = [f for f in fields if f != "label"]
    lists = [f for f in texts if isinstance(row.get(f), list)]
    strings = [f for f in texts if isinstance(row.get(f), str)]
    if lists and strings:
        return (
            f"{', '.join(strings)} {'is a string' if len(strings) == 1 else 'are strings'} but "
            f"{', '.join(lists)} {'is a list' if len(lists) == 1 else 'are lists'}; "
            "use all strings or all lists of messages"
        )
    return chat_shape if lists else text_shape


def _present(row: Row) -> set[str]:
    """Keys with a value. Columnar files (parquet, datasets) fill a column a row lacks with
    null, so a null counts as absent when choosing a kind or shape."""
    return {key for key, value in row.items() if value is not None}


# --- Messages --------------------------------------------------------------------------------


def _describe(error: dict) -> str:
    """One pydantic error as ``field 'messages[2].role': <short phrase>``."""
    loc = error["loc"]
    value = error.get("input")
    phrase = _phrase(error["type"], value, error.get("ctx") or {}, error["msg"])
    if error["type"] == "missing" and isinstance(value, dict):
        phrase += _typo_hint(str(loc[-1]), value)
    return f"field '{_field_path(loc)}': {phrase}" if loc else phrase


def _phrase(kind: str, value: Any, ctx: dict, default: str) -> str:
    """Pydantic's error type turned into a short phrase that shows the offending value's type."""
    got = type_name(value)
    if kind == "missing":
        return "missing"
    if kind == "string_type":
        return f"expected a string (got {got})"
    if kind == "list_type":
        if isinstance(value, str) and value.lstrip().startswith("["):
            got = "a string that looks like JSON but does not parse"
        return f"expected a list of messages (got {got})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a message object with 'role' and 'content' (got {got})"
    if kind == "literal_error":
        options = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        prefix = "must be one of" if "," in options else "must be"
        return f"{prefix} {options} (got {value!r})"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return default[:1].lower() + default[1:]


def _field_path(loc: tuple) -> str:
    """('messages', 2, 'role') -> 'messages[2].role'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _typo_hint(missing: str, found: dict) -> str:
    """' (found 'choosen'; a typo?)' when the object has a key close to the missing one."""
    close = difflib.get_close_matches(missing, [str(k) for k in found], n=1)
    return f" (found '{close[0]}'; a typo?)" if close else ""


def _did_you_mean(row: Row, fields: tuple[str, ...] | list[str]) -> str:
    """'; did you mean 'messages'?' for row keys that look like misspelt field names."""
    guesses = []
    for key in row:
        if key in fields:
            continue
        close = difflib.get_close_matches(str(key), fields, n=1)
        if close:
            guesses.append((key, close[0]))
    if not guesses:
        return ""
    if len(guesses) == 1:
        return f"; did you mean '{guesses[0][1]}'?"
    return "; did you mean " + ", ".join(f"'{right}' for '{wrong}'" for wrong, right in guesses) + "?"


def _found(row: Row) -> str:
    """The row's keys for a message, nulls marked (they count as absent)."""
    names = [f"{key} (null)" if value is None else str(key) for key, value in row.items()]
    return ", ".join(names) or "no fields"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}{hint}")
