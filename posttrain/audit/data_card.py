"""DATA_CARD.md beside a dataset: its rows and sha256, its sources, the labelling protocol, and every filter
with the rows it removed (generated data, collect exports, the log flywheel)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from posttrain.audit.model_card import (
    _cell,
    _table,
    count_rows,
)
from posttrain.errors import ConfigError

PROTOCOLS = {
    "human": (
        "Labelled by people. Labels carry the annotators' agreement level, instructions and biases; see the "
        "sources for who labelled and how."
    ),
    "judge": (
        "Labelled by an LLM judge. Judges prefer longer answers and the answer in a fixed position, and favour "
        "text in their own style; the labels are as good as the judge's measured agreement with people "
        "(`posttrain eval judge`)."
    ),
    "verifier": (
        "Labelled by a programmatic verifier (exact match, unit tests, a math checker). Labels are exact for "
        "what the verifier checks and blind to everything else (style, reasoning, safety); a verifier with a "
        "bug labels systematically wrong."
    ),
}


def data_card(
    path: str | Path,
    *,
    sources: Sequence[str | Mapping],
    filters: Sequence[tuple[str, int] | Mapping] = (),
    protocol: str,
    out: str | Path | None = None,
    title: str | None = None,
    description: str = "",
    generator: str | Mapping | None = None,
    judge: str | Mapping | None = None,
    license: str | None = None,
    intended_use: str | None = None,
    limitations: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write DATA_CARD.md for a generated dataset and return its path.

    Args:
        path: the dataset file (jsonl, json, parquet, csv) or saved HF dataset directory.
        sources: where its rows came from: paths (hashed and counted when they are files) or mappings
            with any of ``name, path, sha256, rows, license, url, description``.
        filters: ``(name, rows removed)`` in the order applied, or mappings ``{name, removed, description}``;
            rows before each filter are derived from the final count.
        protocol: how rows were labelled: ``"human"``, ``"judge"`` or ``"verifier"``.
        out: the file to write; default DATA_CARD.md beside the dataset (inside it for a directory).
        generator: the model (and settings) that generated completions, if any.
        judge: the judge model / rubric (protocol "judge"), or the verifier's name.
        extra: more facts for the card (e.g. sampling settings), shown as a table.

    Raises:
        ConfigError: an unknown protocol, a missing dataset, a malformed filter.
    """
    from posttrain.audit.hashes import hash_inputs
    from posttrain.data.io import read_rows
    from posttrain.data.schemas import detect_kind

    if protocol not in PROTOCOLS:
        raise ConfigError(f"data card: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data card: dataset not found: {path}")
    rows = [row for _, row in read_rows(str(path))]
    steps = [_filter_step(f) for f in filters]
    fields = Counter(k for row in rows for k in row if not str(k).startswith("_"))
    kinds = Counter(detect_kind(row) or "unknown" for row in rows)

    lines = [f"# Data card: {title or path.name}", ""]
    if description:
        lines += [description, ""]
    hashes = hash_inputs([path])
    lines += _table(["file", "sha256"], hashes.items()) + [""]
    lines.append(f"- **rows**: {len(rows)}")
    lines.append("- **row kinds**: " + ", ".join(f"{k} ({n})" for k, n in kinds.most_common()))
    lines.append("- **fields**: " + ", ".join(f"{k} ({n})" for k, n in fields.most_common()))
    if license:
        lines.append(f"- **license**: {license}")
    lines.append(f"- **created**: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    if intended_use:
        lines += ["", "## Intended use", "", intended_use]

    lines += ["", "## Sources", ""]
    lines += (
        _table(["source", "sha256", "rows", "notes"], [_source_row(s) for s in sources])
        if sources
        else ["None given."]
    )

    lines += ["", "## Labelling protocol", "", f"**{protocol}**. {PROTOCOLS[protocol]}"]
    for label, value in (("generator", generator), ("judge" if protocol == "judge" else "labeller", judge)):
        if value:
            lines.append(f"- {label}: {_cell(value)}")

    lines += ["", "## Filters", ""]
    if steps:
        count = len(rows) + sum(removed for _, removed, _ in steps)
        table = []
        for name, removed, note in steps:
            share = removed / count if count else 0.0
            table.append((name, count, removed, f"{share:.1%}", count - removed, note))
            count -= removed
        lines += _table(["filter", "rows in", "removed", "share", "rows out", "notes"], table)
    else:
        lines.append("No filter was applied.")
    if extra:
        lines += ["", "## Details", ""] + _table(["key", "value"], extra.items())

    lines += ["", "## Known limitations", ""]
    defaults = [
        "Generated data inherits the errors and biases of the model that generated it and of its labeller.",
        "Rows were checked by the filters above only; nothing else guarantees their quality.",
    ]
    lines += [f"- {x}" for x in [*defaults, *limitations]]
    card = Path(out) if out else (path if path.is_dir() else path.parent) / "DATA_CARD.md"
    card.write_text("\n".join(lines) + "\n")
    return card


def _filter_step(item) -> tuple[str, int, str]:
    if isinstance(item, Mapping):
        name, removed, note = item.get("name"), item.get("removed"), item.get("description", "")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        (name, removed), note = item, ""
    else:
        raise ConfigError(f"data card: a filter is (name, rows removed) or {{name, removed}}, got {item!r}")
    if not isinstance(removed, int) or isinstance(removed, bool) or removed < 0:
        raise ConfigError(
            f"data card: filter {name!r}: rows removed must be a whole number >= 0, got {removed!r}"
        )
    return str(name), removed, str(note or "")


def _source_row(source) -> tuple:
    from posttrain.audit.hashes import sha256_file

    if isinstance(source, Mapping):
        name = source.get("name") or source.get("path") or source.get("url") or "?"
        digest, rows = source.get("sha256"), source.get("rows")
        path = Path(str(source["path"])) if source.get("path") else None
        notes = "; ".join(str(source[k]) for k in ("description", "url", "license") if source.get(k))
    else:
        name, digest, rows, path, notes = str(source), None, None, Path(str(source)), ""
    if path is not None and path.is_file():
        digest = digest or sha256_file(path)
        rows = rows if rows is not None else count_rows(path)
    return (name, digest or "-", "-" if rows is None else rows, notes)
