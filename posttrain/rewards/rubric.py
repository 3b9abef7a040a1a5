"""Judge rubrics: dimensions on an integer scale, the judge's prompts, and parsing its output.

A rubric (YAML; ``default`` is bundled in ``posttrain/rewards/rubrics/``) lists dimensions, each scored
on one integer scale (1-5 by default), and may replace the two prompt templates::

    name: default
    scale: [1, 5]
    dimensions:
      - {name: factuality, description: "Claims are true; nothing is made up."}
      - {name: safety, description: "...", weight: 1.0}

A judge's output is parsed by :func:`parse_scores` (a JSON object, or ``dimension: N`` lines) and
:func:`parse_verdict` (``[[A]]``, ``[[B]]`` or ``[[tie]]``); an output that is missing a dimension, out of
range, ambiguous or garbage is a counted *failure* (an error string), never an exception.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from posttrain.errors import ConfigError
from posttrain.sections import Section, read_yaml, validate

RUBRICS_DIR = Path(__file__).parent / "rubrics"
"""Bundled rubrics: ``<name>.yaml``."""

POINTWISE_PROMPT = """\
You are grading an AI assistant's answer to a user's request. Score the answer on each dimension \
below with a whole number from {min} (worst) to {max} (best).

{dimensions}

[Request]
{question}

[Answer]
{answer}

Reply with one line per dimension and nothing else, in this form:
{format}"""

PAIRWISE_PROMPT = """\
You are comparing two AI assistants' answers to the same user request. Judge them on these \
dimensions:

{dimensions}

Do not let the order of the answers, their length or the assistants' names sway you.

[Request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain your reasoning in a few sentences, then give your verdict on the last line: "[[A]]" if \
answer A is better, "[[B]]" if answer B is better, "[[tie]]" if they are equally good."""


class Dimension(Section):
    """One thing the judge scores."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="e.g. instruction_following.")
    description: str = Field(min_length=1, description="What a high score means (shown to the judge).")
    weight: float = Field(1.0, gt=0, description="Weight in the overall (weighted mean) score.")


class Rubric(Section):
    """Dimensions, their scale, and optionally the prompt templates (see the module docstring)."""

    name: str = "rubric"
    description: str = ""
    scale: tuple[int, int] = Field((1, 5), description="Lowest and highest score.")
    dimensions: list[Dimension] = Field(min_length=1)
    pointwise_prompt: str = Field(
        POINTWISE_PROMPT,
        description="Placeholders: {question} {answer} {dimensions} {format} {min} {max}.",
    )
    pairwise_prompt: str = Field(
        PAIRWISE_PROMPT, description="Placeholders: {question} {answer_a} {answer_b} {dimensions}."
    )

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: tuple[int, int]) -> tuple[int, int]:
        if scale[0] >= scale[1]:
            raise ValueError(f"scale must be [lowest, highest] with lowest < highest (got {list(scale)})")
        return scale

    @model_validator(mode="after")
    def _unique(self) -> Rubric:
        names = [d.name.lower() for d in self.dimensions]
        if len(set(names)) != len(names):
            raise ValueError(f"dimension names must be unique (got {names})")
        return self

    def _fill(self, template: str, **values: str) -> str:
        # str.replace, not str.format: a rubric's own braces (a JSON example) must survive
        low, high = self.scale
        values = {
            "dimensions": "\n".join(f"- {d.name}: {d.description}" for d in self.dimensions),
            "format": "\n".join(f"{d.name}: <score {low}-{high}>" for d in self.dimensions),
            "min": str(low),
            "max": str(high),
            **values,
        }
        for key, value in values.items():
            template = template.replace("{" + key + "}", value)
        return template

    def pointwise_text(self, question: str, answer: str) -> str:
        return self._fill(self.pointwise_prompt, question=question, answer=answer)

    def pairwise_text(self, question: str, answer_a: str, answer_b: str) -> str:
        return self._fill(self.pairwise_prompt, question=question, answer_a=answer_a, answer_b=answer_b)

    def overall(self, scores: dict[str, int]) -> float:
        """Weighted mean of the dimension scores, on the rubric's scale."""
        total = sum(d.weight for d in self.dimensions)
        return sum(d.weight * scores[d.name] for d in self.dimensions) / total

    def normalise(self, overall: float) -> float:
        """The overall score mapped linearly to [0, 1]."""
        low, high = self.scale
        return (overall - low) / (high - low)


def bundled_rubrics() -> list[str]:
    return sorted(p.stem for p in RUBRICS_DIR.glob("*.yaml"))


def load_rubric(source: str | Path | dict | Rubric = "default") -> Rubric:
    """A rubric from a YAML file, a bundled rubric's name, or a dict.

    Raises:
        ConfigError: missing file, bad YAML, unknown or wrong keys (each named).
    """
    if isinstance(source, Rubric):
        return source
    if isinstance(source, dict):
        return validate(Rubric, source, "rubric", "rubric")
    path = Path(source)
    if not path.exists() and str(source) in bundled_rubrics():
        path = RUBRICS_DIR / f"{source}.yaml"
    elif not path.exists():
        raise ConfigError(f"rubric not found: {source} (a YAML file, or one of {bundled_rubrics()})")
    return validate(Rubric, read_yaml(path), str(path), "rubric")


# --------------------------------------------------------------------------------------- parsing

_NUMBER = r"(-?\d+(?:\.\d+)?)"


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _as_score(value, low: int, high: int) -> int | str:
    """An integer score in [low, high], or the reason it is not one."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*" + _NUMBER + r"\s*(?:/\s*\d+)?\s*", value)
        if not match:
            return f"not a number ({value!r})"
        value = float(match.group(1))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"not a number ({value!r})"
    if value != int(value):
        return f"not a whole number ({value})"
    if not low <= value <= high:
        return f"out of range [{low}, {high}] ({int(value)})"
    return int(value)


def _json_objects(text: str):
    """Every JSON object embedded in ``text``, in order (judges wrap them in prose and code fences)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _json_scores(text: str, names: set[str]) -> dict | None:
    """The first JSON object in ``text`` that holds any dimension (top level or under "scores")."""
    for obj in _json_objects(text):
        if isinstance(obj.get("scores"), dict):
            obj = obj["scores"]
        found = {_key(str(k)): v for k, v in obj.items()}
        if names & set(found):
            return found
    return None


def _line_scores(text: str, rubric: Rubric) -> dict:
    """``dimension: N`` anywhere on a line (markdown bold, bullets, "(1-5)", "N/5" tolerated);
    the last mention of a dimension wins, as judges restate their final scores at the end."""
    found = {}
    for d in rubric.dimensions:
        name = r"[ \t_\-]+".join(re.escape(part) for part in re.split(r"[_\s]+", d.name))
        gap = r"[ \t*]*"  # spaces and markdown bold
        pattern = rf"(?im)^[^\w\n]*{name}{gap}(?:score)?{gap}(?:\([^)\n]*\))?{gap}[:=]{gap}{_NUMBER}"
        matches = re.findall(pattern, text)
        if matches:
            found[_key(d.name)] = matches[-1]
    return found


def parse_scores(text: str, rubric: Rubric) -> tuple[dict[str, int] | None, str | None]:
    """A pointwise judgment: ``({dimension: score}, None)``, or ``(None, reason)`` on failure.

    Accepted: a JSON object with the dimensions as keys (or under ``"scores"``), else one
    ``dimension: N`` per line; with a single-dimension rubric also a bare ``[[N]]`` (MT-Bench's
    rating format). Each score must be a whole number within the rubric's scale. Any dimension
    missing or invalid makes the whole judgment a failure (a partial score would silently
    reweight the rubric).
    """
    if not isinstance(text, str) or not text.strip():
        return None, "empty output"
    names = {_key(d.name) for d in rubric.dimensions}
    found = _json_scores(text, names)
    if found is None:
        found = _line_scores(text, rubric)
    if not found and len(rubric.dimensions) == 1:
        rating = re.findall(r"\[\[\s*" + _NUMBER + r"\s*\]\]", text)
        if rating:
            found = {_key(rubric.dimensions[0].name): rating[-1]}
    if not found:
        return None, "no scores found"
    low, high = rubric.scale
    scores, problems = {}, []
    for d in rubric.dimensions:
        key = _key(d.name)
        if key not in found:
            problems.append(f"{d.name}: missing")
            continue
        value = _as_score(found[key], low, high)
        if isinstance(value, str):
            problems.append(f"{d.name}: {value}")
        else:
            scores[d.name] = value
    if problems:
        return None, "; ".join(problems)
    return scores, None


_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_VERDICT_NAMES = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}  # [[C]] is MT-Bench's tie


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """A pairwise judgment: ``("A" | "B" | "tie", None)``, or ``(None, reason)`` on failure.

    Accepted: ``[[A]]``, ``[[B]]``, ``[[tie]]`` (or ``[[C]]``), case and inner spaces ignored,
    else a JSON object ``{"verdict" | "winner": "A" | "B" | "tie"}``. Two different verdicts in
    one output (a judge that echoes the instructions) are ambiguous: a failure.
    """
    if not isinstance(text, str) or not text.strip():
        return None, "empty output"
    found = {_VERDICT_NAMES[v.lower()] for v in _VERDICT.findall(text)}
    if not found:
        for obj in _json_objects(text):
            value = obj.get("verdict", obj.get("winner"))
            if isinstance(value, str) and value.strip().lower() in _VERDICT_NAMES:
                found = {_VERDICT_NAMES[value.strip().lower()]}
                break
    if len(found) > 1:
        return None, f"conflicting verdicts {sorted(found)}"
    if not found:
        return None, "no verdict ([[A]], [[B]] or [[tie]]) found"
    return found.pop(), None
