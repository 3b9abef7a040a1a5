"""LLM-as-judge: a local model grades completions against a rubric, pointwise or pairwise.

A rubric (YAML; ``default`` is bundled in ``posttrain/eval/suites/rubrics/``) lists dimensions,
each scored on one integer scale (1-5 by default), and may replace the two prompt templates::

    name: default
    scale: [1, 5]
    dimensions:
      - {name: factuality, description: "Claims are true; nothing is made up."}
      - {name: safety, description: "...", weight: 1.0}

- **Pointwise**: the judge scores one completion on every dimension; the overall score is the
  weighted mean, and :func:`judge` maps it to [0, 1] as a reward fn for suites and RL.
- **Pairwise**: the judge sees two completions and names the better one: ``[[A]]``, ``[[B]]`` or
  ``[[tie]]``. LLM judges favour one position whatever the answers (Zheng et al. 2023, "Judging
  LLM-as-a-Judge with MT-Bench and Chatbot Arena", position bias), so each pair is judged in both
  orders; a pair whose verdict flips with the order is *inconsistent* and becomes a tie or is
  dropped (``inconsistent="tie"|"drop"``). The consistent / inconsistent counts are reported:
  a judge inconsistent on most pairs is measuring position, not quality.

The judge generates greedily through the rollout engine (:class:`~posttrain.rollout.engine.HFEngine`),
so any local causal LM can judge. Its output is parsed by :func:`parse_scores` (a JSON object, or
``dimension: N`` lines) and :func:`parse_verdict`; an output that is missing a dimension, out of
range, ambiguous or garbage is a counted *failure*, never an exception: a judge's failure rate is
one of its numbers. :func:`agreement` measures a judge against human labels with Cohen's kappa.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from posttrain.config import Section
from posttrain.errors import ConfigError
from posttrain.eval.metrics import WinRate, cohen_kappa, win_rate
from posttrain.eval.suite import SUITES_DIR, read_yaml, validate

RUBRICS_DIR = SUITES_DIR / "rubrics"

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


# --------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class PointwiseResult:
    """One pointwise judgment. ``scores`` is None when the output could not be parsed."""

    scores: dict[str, int] | None
    overall: float | None  # weighted mean on the rubric's scale
    normalised: float | None  # overall mapped to [0, 1]
    error: str | None
    raw: str


@dataclass(frozen=True)
class PairwiseResult:
    """One pair, judged in both orders. Verdicts name the original labels: "A" = completion_a."""

    first: str | None  # verdict with A shown first
    swapped: str | None  # verdict with B shown first, mapped back to the original labels
    verdict: str | None  # final: "A", "B", "tie"; None when failed or dropped
    consistent: bool | None  # None without swapping, or when a judgment failed
    error: str | None
    raw: tuple[str, ...]


@dataclass(frozen=True)
class PairwiseReport:
    """Pairwise judgments with the position-swap counts and A's win rate over B."""

    results: list[PairwiseResult]
    consistent: int
    inconsistent: int
    failures: int  # pairs with an unparseable judgment (in either order)
    dropped: int  # inconsistent pairs dropped (inconsistent="drop")
    win_rate: WinRate | None  # over the pairs with a verdict; None when there are none

    @property
    def verdicts(self) -> list[str | None]:
        return [r.verdict for r in self.results]

    def summary(self) -> dict:
        wr = self.win_rate
        return {
            "pairs": len(self.results),
            "consistent": self.consistent,
            "inconsistent": self.inconsistent,
            "failures": self.failures,
            "dropped": self.dropped,
            "win_rate": None if wr is None else {"rate": wr.rate, "low": wr.low, "high": wr.high},
        }


_SWAP = {"A": "B", "B": "A", "tie": "tie"}


def question_text(prompt) -> str:
    """The request as the judge reads it: a string as is; messages as their text (a single user
    turn bare, a conversation as "role: content" lines)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def _answer_text(completion) -> str:
    from posttrain.rewards.basic import completion_text

    return completion_text(completion)


class Judge:
    """A judge: a text generator (prompt texts in, outputs out) and a rubric.

    Args:
        generate: ``fn(list[str]) -> list[str]``, one judge output per judge prompt. Build it from
            a model with :meth:`from_pretrained` or :meth:`from_engine`; tests pass a stub.
        rubric: a :class:`Rubric`, a bundled rubric's name or a YAML path.
    """

    def __init__(self, generate: Callable[[list[str]], list[str]], rubric: Rubric | str | Path = "default"):
        self.generate = generate
        self.rubric = load_rubric(rubric)

    @classmethod
    def from_engine(cls, engine, tokenizer, rubric: Rubric | str | Path = "default", *, max_new_tokens=256):
        """A judge generating greedily with ``engine``; each judge prompt is one user turn
        rendered with the tokenizer's chat template (raw text when it has none)."""
        from posttrain.data.templates import encode_prompts
        from posttrain.rollout.engine import Sampling

        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)

        def generate(texts: list[str]) -> list[str]:
            _, ids = encode_prompts(tokenizer, texts)  # the one prompt rule (data/templates.py)
            return [group[0].text for group in engine.generate(ids, 1, sampling)]

        return cls(generate, rubric)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        rubric: Rubric | str | Path = "default",
        *,
        max_new_tokens: int = 256,
        batch_size: int | None = None,
    ) -> Judge:
        """A judge from a model directory or hub name (on the GPU when there is one)."""
        from posttrain.eval.suite import load_engine

        engine, tokenizer = load_engine(path, batch_size=batch_size)
        return cls.from_engine(engine, tokenizer, rubric, max_new_tokens=max_new_tokens)

    def _outputs(self, texts: list[str]) -> list[str]:
        outputs = list(self.generate(texts)) if texts else []
        if len(outputs) != len(texts):
            raise RuntimeError(f"the judge returned {len(outputs)} outputs for {len(texts)} prompts")
        return outputs

    def pointwise(self, prompts: Sequence, completions: Sequence) -> list[PointwiseResult]:
        """Score each completion on every dimension of the rubric (one judge call each)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        texts = [
            self.rubric.pointwise_text(question_text(p), _answer_text(c))
            for p, c in zip(prompts, completions)
        ]
        results = []
        for raw in self._outputs(texts):
            scores, error = parse_scores(raw, self.rubric)
            overall = None if scores is None else self.rubric.overall(scores)
            normalised = None if overall is None else self.rubric.normalise(overall)
            results.append(PointwiseResult(scores, overall, normalised, error, raw))
        return results

    def pairwise(
        self,
        prompts: Sequence,
        completions_a: Sequence,
        completions_b: Sequence,
        *,
        swap: bool = True,
        inconsistent: str = "tie",
    ) -> PairwiseReport:
        """Which of each pair is better: A (``completions_a``), B, or a tie.

        Args:
            swap: also judge every pair with B shown first, and compare (position-swap
                consistency). Without it, position bias goes unmeasured.
            inconsistent: what a pair whose verdict changes with the order becomes: "tie"
                (default: the judge could not tell them apart) or "drop" (left out of the win rate).
        """
        if inconsistent not in ("tie", "drop"):
            raise ValueError(f"inconsistent must be 'tie' or 'drop' (got {inconsistent!r})")
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError(
                f"pairwise needs aligned inputs (got {len(prompts)} prompts, {len(completions_a)} A, "
                f"{len(completions_b)} B)"
            )
        questions = [question_text(p) for p in prompts]
        a = [_answer_text(c) for c in completions_a]
        b = [_answer_text(c) for c in completions_b]
        texts = [self.rubric.pairwise_text(q, x, y) for q, x, y in zip(questions, a, b)]
        if swap:
            texts += [self.rubric.pairwise_text(q, y, x) for q, x, y in zip(questions, a, b)]
        outputs = self._outputs(texts)
        n = len(questions)
        results, counts = [], {"consistent": 0, "inconsistent": 0, "failures": 0, "dropped": 0}
        for i in range(n):
            first, error = parse_verdict(outputs[i])
            errors = [f"A first: {error}"] if error else []
            raw: tuple[str, ...] = (outputs[i],)
            swapped, consistent = None, None
            if swap:
                raw += (outputs[n + i],)
                v2, error2 = parse_verdict(outputs[n + i])
                swapped = None if v2 is None else _SWAP[v2]
                errors += [f"B first: {error2}"] if error2 else []
            verdict = first
            if errors:
                verdict = None
                counts["failures"] += 1
            elif swap:
                consistent = first == swapped
                counts["consistent" if consistent else "inconsistent"] += 1
                if not consistent:
                    verdict = "tie" if inconsistent == "tie" else None
                    counts["dropped"] += inconsistent == "drop"
            error = "; ".join(errors) or None
            results.append(PairwiseResult(first, swapped, verdict, consistent, error, raw))
        kept = [r.verdict for r in results if r.verdict is not None]
        wr = None
        if kept:  # a verdict coded as A's score against a constant 0.5: 1 wins, 0 loses, 0.5 ties
            wr = win_rate([{"A": 1.0, "B": 0.0, "tie": 0.5}[v] for v in kept], [0.5] * len(kept))
        return PairwiseReport(results=results, win_rate=wr, **counts)


# --------------------------------------------------------------------------------------- reward fn


class JudgeRewardFn:
    """``fn(prompts, completions, **row_fields) -> list[float]``: the judge's pointwise overall
    score mapped to [0, 1]; an unparseable judgment scores ``on_failure``.

    Build it with :func:`judge`. ``calls`` and ``failures`` count judgments over the fn's life,
    ``last_failures`` those of the latest call (suites report it as a failure rate).
    """

    __name__ = "judge"

    def __init__(self, source, *, rubric="default", on_failure: float = 0.0, **load_options):
        self.source, self.on_failure = source, float(on_failure)
        self.rubric = source.rubric if isinstance(source, Judge) else load_rubric(rubric)
        self.load_options = load_options
        self._judge = source if isinstance(source, Judge) else None
        self._lock = threading.Lock()
        self.calls = self.failures = self.last_failures = 0

    @property
    def judge(self) -> Judge:
        with self._lock:  # loaded on the first call, once, like reward_model
            if self._judge is None:
                self._judge = Judge.from_pretrained(str(self.source), self.rubric, **self.load_options)
        return self._judge

    def __call__(self, prompts: Sequence, completions: Sequence, **_row_fields) -> list[float]:
        results = self.judge.pointwise(prompts, completions)
        self.last_failures = sum(r.normalised is None for r in results)
        self.calls += len(results)
        self.failures += self.last_failures
        return [self.on_failure if r.normalised is None else r.normalised for r in results]

    def __repr__(self) -> str:
        return f"judge({self.source!r}, rubric={self.rubric.name!r})"


def judge(
    model_path: str,
    *,
    rubric: str | Path | dict | Rubric = "default",
    max_new_tokens: int = 256,
    batch_size: int | None = None,
    on_failure: float = 0.0,
) -> JudgeRewardFn:
    """A RewardFn: a local model judges each completion against ``rubric`` (pointwise, greedy);
    the weighted mean of its dimension scores, mapped from the rubric's scale to [0, 1], is the
    reward. The model loads on the first call; the rubric and the path are checked now.

    Args:
        model_path: the judge model: a directory or hub name.
        rubric: a bundled rubric's name (``default``), a YAML path, a dict or a :class:`Rubric`.
        max_new_tokens: the judge's budget; a judge cut off before its scores is a failure.
        batch_size: sequences per generation forward; default all at once.
        on_failure: the reward of a completion whose judgment could not be parsed. 0.0 by
            default; in RL, a policy can learn to confuse the judge if failures pay better.
    """
    path = str(model_path)
    if (path.startswith((".", "/", "~")) or path.count("/") > 1) and not Path(path).expanduser().exists():
        raise ValueError(f"judge model path not found: {path} (no such directory)")
    if not math.isfinite(on_failure):
        raise ValueError(f"judge on_failure must be finite (got {on_failure})")
    return JudgeRewardFn(
        path, rubric=rubric, on_failure=on_failure, max_new_tokens=max_new_tokens, batch_size=batch_size
    )


# --------------------------------------------------------------------------------------- agreement


_PAIR_LABELS = {"a": "A", "b": "B", "tie": "tie"}


def read_labels(path: str | Path, rubric: Rubric) -> tuple[bool, list[dict], list]:
    """A human-labelled file for :func:`agreement`: (pairwise?, rows, labels), every row checked.

    Raises:
        DataError: naming file, line and field for each row of the wrong shape.
    """
    from posttrain.data.io import raise_if_errors, read_rows

    rows = read_rows(path)
    pairwise = "completion_a" in rows[0][1]
    fields = (
        ("prompt", "completion_a", "completion_b", "label") if pairwise else ("prompt", "completion", "label")
    )
    low, high = rubric.scale
    errors, labels = [], []
    for loc, row in rows:
        missing = [f for f in fields if f not in row]
        if missing:
            errors.append(
                f"{loc}: missing field(s) {missing} (a {'pairwise' if pairwise else 'pointwise'} file)"
            )
            continue
        label = row["label"]
        if pairwise:
            label = _PAIR_LABELS.get(label.strip().lower()) if isinstance(label, str) else None
            if label is None:
                errors.append(f"{loc}: field 'label': expected 'A', 'B' or 'tie' (got {row['label']!r})")
                continue
        elif isinstance(label, bool) or not isinstance(label, int) or not low <= label <= high:
            errors.append(f"{loc}: field 'label': expected a whole number in [{low}, {high}] (got {label!r})")
            continue
        labels.append(label)
    raise_if_errors(f"{path}: {len(errors)} problems in the labelled rows:", errors)
    return pairwise, [row for _, row in rows], labels


def agreement(judge: Judge, path: str | Path, *, swap: bool = True, inconsistent: str = "tie") -> dict:
    """The judge's agreement with human labels in a jsonl / json / csv / parquet file.

    Rows are pairwise, ``{"prompt", "completion_a", "completion_b", "label": "A" | "B" | "tie"}``,
    or pointwise, ``{"prompt", "completion", "label": <score on the rubric's scale>}`` (the
    judge's overall score is rounded to the scale). Judgments that failed (or pairs dropped as
    inconsistent) are left out of kappa and counted.

    Returns:
        ``{"mode", "rows", "compared", "failures", "agreement" (raw share equal), "kappa"}``;
        pointwise adds ``kappa_quadratic`` (ordinal: a 4 for a 5 is closer than a 1), pairwise
        the position-swap counts.

    Raises:
        DataError: naming file, line and field for rows of the wrong shape.
    """
    pairwise, rows, labels = read_labels(path, judge.rubric)
    prompts = [row["prompt"] for row in rows]
    out: dict = {"mode": "pairwise" if pairwise else "pointwise", "rows": len(rows)}
    if pairwise:
        report = judge.pairwise(
            prompts,
            [row["completion_a"] for row in rows],
            [row["completion_b"] for row in rows],
            swap=swap,
            inconsistent=inconsistent,
        )
        judged = report.verdicts
        out.update({k: v for k, v in report.summary().items() if k not in ("pairs", "win_rate")})
        categories: list = ["A", "B", "tie"]
    else:
        results = judge.pointwise(prompts, [row["completion"] for row in rows])
        judged = [None if r.overall is None else int(math.floor(r.overall + 0.5)) for r in results]
        out["failures"] = sum(j is None for j in judged)
        categories = list(range(judge.rubric.scale[0], judge.rubric.scale[1] + 1))
    pairs = [(j, h) for j, h in zip(judged, labels) if j is not None]
    out["compared"] = len(pairs)
    judge_labels, human_labels = [j for j, _ in pairs], [h for _, h in pairs]
    out["agreement"] = sum(j == h for j, h in pairs) / len(pairs) if pairs else math.nan
    out["kappa"] = cohen_kappa(judge_labels, human_labels, categories=categories)
    if not pairwise:
        out["kappa_quadratic"] = cohen_kappa(
            judge_labels, human_labels, weights="quadratic", categories=categories
        )
    return out
