"""Math reward: 1.0 when the completion's final answer equals the gold answer, else 0.0.

Two steps, kept apart so each can be tested and changed on its own:

1. :func:`extract_answer` finds the final answer in free text, by a fixed preference: the last
   ``\\boxed{...}``; else the text after the last "final answer: ", "answer is ", "answer: " or
   "#### " (GSM8K); else the last number (integer, decimal, ``a/b`` or ``\\frac{a}{b}``).
   Taking the LAST occurrence matters: models restate the question's numbers first.
2. :func:`math_equal` compares it with the gold answer through ``math-verify`` (Hugging Face's
   verifier, as used by open-r1 and TRL): both sides become SymPy objects, so ``1/2``, ``0.5``
   and ``\\frac{1}{2}`` are equal, ``x = 5`` matches ``5``, and ``3,000`` is ``3000``.

A reward must never take a training step down: every failure to extract, parse or compare (and
math-verify's own timeouts) scores 0.0. math-verify bounds parsing and comparison time with
``signal.alarm``, which only works in the main thread; elsewhere (a reward computed in a worker
thread) the timeouts are turned off, and the length cap below is what bounds the work.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Sequence

from posttrain.rewards.basic import _check_aligned, completion_text

MAX_ANSWER_CHARS = 1000
"""Longer extracted answers score 0: no real final answer is that long, and SymPy on a huge
expression can take minutes."""

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANCHOR = re.compile(r"(?:\banswer\s*(?:is\b|:)|####)[ \t]*:?[ \t]*(.+)", re.IGNORECASE)  # "final answer" too
# A number not glued to a word or another number ("x2", "5-3" yield no "2" or "-3"); thousands
# separators only in groups of three, so "1,2" is two numbers.
_NUMBER = re.compile(
    r"(?<![\w.])(?:-?\\d?frac\{-?\d+\}\{\d+\}|-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?)(?![\w])"
)

# math-verify logs a warning per unparsable input; a policy early in training produces thousands.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces) or ``\\boxed x``; None if none."""
    for match in reversed(list(_BOXED.finditer(text))[-8:]):  # the last few: no quadratic scan
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[start + 1 : i]
            continue  # unbalanced (cut off): try an earlier one
        token = re.match(r"[^\s$]+", text[start:])
        if token:
            return token.group(0)
    return None


def _clean(answer: str) -> str:
    """Trim what surrounds an anchored answer: markdown bold, $...$, a sentence after it."""
    answer = re.split(r"\.\s", answer, maxsplit=1)[0]  # "42. Let me check" -> "42"; "3.5" stays
    trimmed = None
    while trimmed != answer:  # "**$\frac{3}{4}$.**" -> "\frac{3}{4}", whatever the nesting
        trimmed, answer = answer, answer.strip(" \t*$").removesuffix(".")
    # "47 pens", "42, which is what we wanted" -> the number (LaTeX after a number is kept).
    number_then_words = re.fullmatch(r"(-?[\d,]*\d(?:\.\d+)?(?:/\d+)?)[,;]?\s+[A-Za-z]{2,}.*", answer)
    return number_then_words.group(1) if number_then_words else answer


def extract_answer(text: str) -> str | None:
    """The final answer in ``text`` (see the module docstring for the order); None if none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    anchored = list(_ANCHOR.finditer(text))
    if anchored:
        inner = _last_boxed(anchored[-1].group(1))
        answer = inner if inner is not None else _clean(anchored[-1].group(1))
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _timeout() -> int | None:
    # signal.alarm exists only in the main thread; math-verify raises elsewhere unless told None.
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    """SymPy forms of an answer string (empty if none). Cached: in GRPO every gold answer is
    parsed once per group member otherwise."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # As LaTeX first ($...$ makes math-verify read the whole string); plain expressions next.
    for text, config in ((f"${answer}$", LatexExtractionConfig()), (answer, ExprExtractionConfig())):
        parsed = parse(text, extraction_config=[config], parsing_timeout=_timeout())
        if parsed:
            return tuple(parsed)
    return ()


def _gold_text(answer: str) -> str | None:
    """The gold answer to compare: rows store "47", "\\frac{1}{2}", "$0.5$", or a whole worked
    solution ending in "#### 47" or a \\boxed answer (then that answer is used)."""
    answer = answer.strip()
    if "\\boxed" in answer or "\\fbox" in answer or "####" in answer:
        return extract_answer(answer)
    return answer.strip("$").strip() or None


def math_equal(prediction: str, gold: str) -> bool:
    """Whether two answer strings are mathematically equal (math-verify: numbers, fractions,
    LaTeX, symbolic expressions, sets, intervals). False on anything unparsable."""
    from math_verify import verify

    if len(prediction) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    try:
        gold_parsed, pred_parsed = _parse(gold), _parse(prediction)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_timeout()))
    except Exception:  # any parser/SymPy failure, math-verify's TimeoutException included
        return False


def math_answer(prompts: Sequence, completions: Sequence, answer: Sequence, **_row_fields) -> list[float]:
    """1.0 for each completion whose final answer (:func:`extract_answer`) equals the row's gold
    ``answer`` (:func:`math_equal`), else 0.0. Empty or answerless completions score 0.0.

    Args:
        prompts: ignored.
        completions: model outputs (strings or assistant message lists).
        answer: gold answers, one per completion: plain ("47"), LaTeX ("\\frac{1}{2}"), or a
            solution ending in "#### 47" / a \\boxed answer.
    """
    _check_aligned("answer", answer, completions)
    scores = []
    for completion, gold in zip(completions, answer):
        try:
            predicted = extract_answer(completion_text(completion))
            gold_text = None if gold is None else _gold_text(str(gold))
            scores.append(float(bool(predicted and gold_text and math_equal(predicted, gold_text))))
        except Exception:
            scores.append(0.0)
    return scores
