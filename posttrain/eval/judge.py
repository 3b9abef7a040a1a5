"""Checks of an LLM judge (the judge itself is :mod:`posttrain.rewards.judge`): its agreement with
human labels (Cohen's kappa, :func:`agreement`) and the win rate of a pairwise report with a bootstrap
interval (:func:`pairwise_win_rate`). The judge's names are re-exported here.
"""

from __future__ import annotations

import math
from pathlib import Path

from posttrain.eval.metrics import WinRate, cohen_kappa, win_rate
from posttrain.rewards.judge import (
    Judge,
    JudgeRewardFn,
    PairwiseReport,
    PairwiseResult,
    PointwiseResult,
    judge,
    question_text,
)
from posttrain.rewards.rubric import (
    RUBRICS_DIR,
    Dimension,
    Rubric,
    bundled_rubrics,
    load_rubric,
    parse_scores,
    parse_verdict,
)

__all__ = [
    "RUBRICS_DIR",
    "Dimension",
    "Judge",
    "JudgeRewardFn",
    "PairwiseReport",
    "PairwiseResult",
    "PointwiseResult",
    "Rubric",
    "agreement",
    "bundled_rubrics",
    "judge",
    "load_rubric",
    "pairwise_win_rate",
    "parse_scores",
    "parse_verdict",
    "question_text",
    "read_labels",
]


def pairwise_win_rate(report: PairwiseReport) -> WinRate | None:
    """A's win rate over B among the pairs with a verdict, with a bootstrap interval; None when no pair has
    one. A verdict is coded as A's score against a constant 0.5: A 1, B 0, tie 0.5."""
    kept = [v for v in report.verdicts if v is not None]
    if not kept:
        return None
    return win_rate([{"A": 1.0, "B": 0.0, "tie": 0.5}[v] for v in kept], [0.5] * len(kept))


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
        out.update({k: v for k, v in report.summary().items() if k != "pairs"})
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
