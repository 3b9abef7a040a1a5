"""Filters over generated (or any) rows before they become a dataset: dedup, length bounds, a score floor,
eval contamination; each reports what it removed, for the data card (``posttrain generate filter`` and
every generator's ``--dedup``/``--min-chars``/... options)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from posttrain.data import quality
from posttrain.data.io import read_rows
from posttrain.errors import ConfigError, DataError


def _answers(row: dict) -> list[str]:
    return [quality.row_text(row, f) for f in ("completion", "chosen", "rejected") if f in row]


def filter_rows(
    rows: list[dict],
    *,
    dedup: str = "near",
    min_chars: int | None = None,
    max_chars: int | None = None,
    min_score: float | None = None,
    against: Sequence[str | Path] = (),
    contamination_n: int = 13,
    contamination_unit: str = "word",
) -> tuple[list[dict], list[dict]]:
    """Apply the filters in order; return the kept rows and ``[{name, removed, description}]``
    for the data card (one entry per filter asked for, even when it removed nothing).

    Args:
        dedup: "near" (exact + MinHash near duplicates of the whole row), "exact" or "none".
        min_chars, max_chars: bounds on every answer's length (completion; chosen and rejected).
        min_score: drop rows whose ``provenance.score`` (verifier / judge score of the kept
            answer) is below this; rows without a score are an error, not silently kept.
        against: eval files; a row whose prompt shares a ``contamination_n``-gram with any eval
            prompt (or appears inside one, when shorter) is dropped.
    """
    steps = []

    def keep(name: str, description: str, ok: Callable[[int, dict], bool]) -> None:
        nonlocal rows
        kept = [row for i, row in enumerate(rows) if ok(i, row)]
        steps.append({"name": name, "removed": len(rows) - len(kept), "description": description})
        rows = kept

    if dedup not in ("near", "exact", "none"):
        raise ConfigError(f"dedup must be 'near', 'exact' or 'none' (got {dedup!r})")
    if dedup != "none" and rows:
        view = [{k: v for k, v in r.items() if k in quality.TEXT_FIELDS} for r in rows]
        kept = set(quality.dedup(view, near=dedup == "near").kept)
        keep(
            f"dedup ({dedup})",
            "normalised text of prompt and answers; first of each group kept",
            lambda i, _: i in kept,
        )
    if min_chars is not None or max_chars is not None:
        low, high = min_chars or 0, max_chars if max_chars is not None else float("inf")
        keep(
            "length",
            f"every answer {low}..{high} characters",
            lambda _, r: all(low <= len(t) <= high for t in _answers(r)),
        )
    if min_score is not None:
        unscored = [i for i, r in enumerate(rows) if "score" not in (r.get("provenance") or {})]
        if unscored:
            raise DataError(
                f"min_score: {len(unscored)} rows have no provenance.score (first: row {unscored[0]})"
            )
        keep(
            "score floor",
            f"verifier / judge score >= {min_score}",
            lambda _, r: r["provenance"]["score"] >= min_score,
        )
    if against:
        eval_texts = [quality.row_text(row, "prompt") for path in against for _, row in read_rows(path)]
        overlaps = quality.contamination(
            eval_texts,
            [quality.row_text(r, "prompt") for r in rows],
            n=contamination_n,
            unit=contamination_unit,
        )  # generated prompts as the checked side: each is flagged on its own
        flagged = {o.index for o in overlaps if o.flagged}
        names = ", ".join(Path(p).name for p in against)
        keep(
            "contamination",
            f"prompt shares a {contamination_n}-{contamination_unit} n-gram with {names}",
            lambda i, _: i not in flagged,
        )
    return rows, steps
