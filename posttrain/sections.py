"""Typed YAML sections: the base model of every config section, and reading / validating a YAML file
with errors that name the file and every wrong key (a suggestion for a misspelling).

A leaf module: config, eval suites, judge rubrics, gates, health rules, pipelines and generators all
read YAML through these, so none of them imports another feature to do it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from posttrain.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; ConfigError naming the file when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def validate(model: type[M], raw: Any, where: str, what: str = "file") -> M:
    """``model`` validated from ``raw``; ConfigError listing every wrong key of file ``where``
    (``what`` it is: "suite", "rubric", ...)."""
    if not isinstance(raw, dict):
        kind = "null" if raw is None else type(raw).__name__
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {kind}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: invalid {what}\n" + "\n".join(explain(e, model))) from None


def explain(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per error of ``err``: the key's dotted path (``rewards[0].name``) and what is wrong;
    an unknown key gets the closest known one or the list of valid keys at its place."""
    return [_explain_one(error, root) for error in err.errors()]


def _explain_one(error: dict, root: type[BaseModel]) -> str:
    loc = list(error["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        parent = key[: len(key) - len(str(loc[-1]))]
        hint = f"; did you mean '{parent}{close[0]}'?" if close else f"; valid keys here: {', '.join(known)}"
        return f"  unknown key '{key}'{hint}"
    if error["type"] == "missing":
        return f"  missing required key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own checks: the message says it all
        return f"  {key}: {message}"
    shown = repr(error.get("input"))
    return f"  {key}: {message} (got {shown if len(shown) < 80 else shown[:77] + '...'})"


def _fields_at(model: type[BaseModel], loc: list) -> list[str]:
    """Field names of the model reached by following ``loc`` (list indices skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        sub = _model_in(info.annotation) if info else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # Optional[X], list[X]
        found = _model_in(arg)
        if found is not None:
            return found
    return None
