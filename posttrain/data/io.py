"""Read dataset rows from disk, each with the place it came from.

Every reader returns ``(Location, row)`` pairs, so that any later error can say
"data/train.jsonl:17" rather than "row 16 of something". Readers only parse: whether a row
has the right fields is ``posttrain.data.schemas``'s business.

Supported: ``.jsonl``/``.ndjson``, ``.json``, ``.parquet``, ``.csv``, and a directory written
by ``datasets.Dataset.save_to_disk``. Parsing is left to the standard libraries (json, csv,
pyarrow, datasets); the only thing done by hand is splitting JSON Lines into lines, which is
what gives exact line numbers.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

Row = dict[str, Any]

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")

# How many problems one DataError lists before "... and N more".
MAX_ERRORS = 20


@dataclass(frozen=True)
class Location:
    """Where a row came from.

    Args:
        path: the file (or dataset directory) as the user gave it.
        index: 0-based position of the row in the dataset.
        line: 1-based line where the row starts, for text formats; None for columnar ones.
    """

    path: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        # Columnar rows are named by index, 0-based, because that is how a person finds them
        # again: `ds[16]`, `df.iloc[16]`.
        if self.line is not None:
            return f"{self.path}:{self.line}"
        return f"{self.path} row {self.index}"


def read_rows(path: str | os.PathLike) -> list[tuple[Location, Row]]:
    """Read every row of a dataset file or saved-dataset directory.

    Returns:
        ``(Location, row)`` pairs in file order; each row is a dict.

    Raises:
        DataError: the path is missing, its format is unknown, it cannot be parsed (naming
            the line), a row is not an object, or it holds no rows at all.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"data file not found: {name}")
    if os.path.isdir(name):
        rows = _read_saved_dataset(name)
    else:
        suffix = Path(name).suffix.lower()
        reader = _READERS.get(suffix)
        if reader is None:
            raise DataError(
                f"{name}: unsupported data format {suffix or '(no suffix)'!r}; supported: "
                f"{', '.join(SUFFIXES)}, or a directory saved with datasets' save_to_disk"
            )
        rows = reader(name)
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def type_name(value: Any) -> str:
    """A short name for a value's type in error messages ("str", "list", "null")."""
    return "null" if value is None else type(value).__name__


def raise_if_errors(header: str, errors: list[str], max_errors: int = MAX_ERRORS) -> None:
    """Raise one DataError listing up to ``max_errors`` problems, or do nothing if none.

    A single problem is raised as is; several get ``header`` on top so the reader sees the
    count before the list.
    """
    if not errors:
        return
    if len(errors) == 1:
        raise DataError(errors[0])
    shown = errors[:max_errors]
    lines = [header, *(f"  {e}" for e in shown)]
    if len(errors) > len(shown):
        lines.append(f"  ... and {len(errors) - len(shown)} more")
    raise DataError("\n".join(lines))


# --- JSON Lines ------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[tuple[Location, Row]]:
    """One JSON object per line. Blank lines are skipped but still counted, so line numbers
    match what an editor shows. Every bad line is reported, not just the first."""
    rows: list[tuple[Location, Row]] = []
    errors: list[str] = []
    # Binary mode: split on b"\n" only. Text mode would also split on U+2028 and friends,
    # which JSON allows raw inside strings.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(
                    f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                )
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # byte-order mark written by some editors
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{path}:{line_no}: expected a JSON object (got {type_name(obj)})")
                continue
            rows.append((Location(path, len(rows), line_no), obj))
    raise_if_errors(f"{path}: {len(errors)} unreadable lines:", errors)
    return rows


# --- JSON ------------------------------------------------------------------------------------

# Field names of a single row: a top-level object keyed by one of these is a row, not a wrapper.
_ROW_FIELDS = {"messages", "prompt", "completion", "chosen", "rejected", "text"}


def _read_json(path: str) -> list[tuple[Location, Row]]:
    """A top-level list of objects, or an object whose one list-valued key holds them
    (``{"data": [...]}``, ``{"rows": [...], "version": 2}``)."""
    text = _read_text(path).removeprefix("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # `datasets.Dataset.to_json("x.json")` writes JSON Lines under a .json name, and
        # `load_dataset("json")` reads both, so users expect it to work: read it as such.
        if e.msg == "Extra data":
            return _read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None

    if isinstance(data, list):
        items, lines = data, _list_item_lines(text)
    elif isinstance(data, dict):
        items = _unwrap_rows(path, data)
        lines = [None] * len(items)  # finding lines inside a wrapper is not worth a parser
    else:
        raise DataError(f"{path}: expected a list of row objects (got {type_name(data)})")

    rows: list[tuple[Location, Row]] = []
    errors: list[str] = []
    for index, (item, line) in enumerate(zip(items, lines)):
        loc = Location(path, index, line)
        if isinstance(item, dict):
            rows.append((loc, item))
        else:
            errors.append(f"{loc}: expected a JSON object (got {type_name(item)})")
    raise_if_errors(f"{path}: {len(errors)} rows are not objects:", errors)
    return rows


def _unwrap_rows(path: str, data: dict) -> list:
    """The rows inside ``{"<key>": [...], ...}``: the value of the one list-valued key."""
    list_keys = [key for key, value in data.items() if isinstance(value, list)]
    if len(list_keys) == 1 and list_keys[0] not in _ROW_FIELDS:
        return data[list_keys[0]]
    if set(data) & _ROW_FIELDS:
        raise DataError(f"{path}: holds a single row object; put rows in a list, or use .jsonl")
    found = ", ".join(data) or "none"
    raise DataError(
        f"{path}: expected a list of rows, or an object with exactly one list of rows (keys: {found})"
    )


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _list_item_lines(text: str) -> list[int]:
    """1-based line where each element of a top-level JSON list starts.

    Called only on text that ``json.loads`` already accepted as a list, so it cannot meet a
    syntax error: it walks the list with the standard decoder's ``raw_decode`` and counts
    newlines up to each element's first character.
    """
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    lines: list[int] = []
    line, counted_to = 1, 0
    while text[pos] != "]":
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
    return lines


def _read_text(path: str) -> str:
    """The whole file as UTF-8 text, or a DataError saying which line is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None


# --- CSV -------------------------------------------------------------------------------------


def _read_csv(path: str) -> list[tuple[Location, Row]]:
    """A header line, then one row per record (a quoted cell may span lines).

    Uses ``csv.reader`` rather than ``csv.DictReader``: DictReader skips blank lines inside
    its own loop, which hides where a row starts, and it silently pads short rows with None
    and files surplus cells under a None key. Here a wrong cell count is an error naming
    the line. Cells holding a JSON list or object (a ``messages`` column) are decoded.
    """
    rows: list[tuple[Location, Row]] = []
    errors: list[str] = []
    # utf-8-sig drops the byte-order mark Excel writes; newline="" is what csv requires.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1  # line where the next record starts
        header: list[str] | None = None
        try:
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not cells:  # a blank line
                    continue
                if header is None:
                    header = _check_header(path, line, cells)
                elif len(cells) != len(header):
                    errors.append(
                        f"{path}:{line}: {len(cells)} cells, but the header has {len(header)} columns"
                    )
                else:
                    row = {name: _decode_cell(cell) for name, cell in zip(header, cells)}
                    rows.append((Location(path, len(rows), line), row))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}:{reader.line_num + 1}: not UTF-8 text") from None
    raise_if_errors(f"{path}: {len(errors)} malformed rows:", errors)
    return rows


def _check_header(path: str, line: int, names: list[str]) -> list[str]:
    """The column names; a repeated name would silently lose a column, so it is an error."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{path}:{line}: repeated column name(s) in header: {', '.join(repeated)}")
    return names


def _decode_cell(cell: str) -> Any:
    """A cell that holds a JSON list or object becomes that value; any other cell stays a string.

    A cell that only looks like JSON ("[INST] hi") but does not parse stays a string too:
    the schema check then reports the field with its expected type.
    """
    stripped = cell.strip()
    if (stripped.startswith("[") and stripped.endswith("]")) or (
        stripped.startswith("{") and stripped.endswith("}")
    ):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return cell


# --- Columnar: parquet and saved datasets ----------------------------------------------------


def _read_parquet(path: str) -> list[tuple[Location, Row]]:
    """Every row of a parquet file, through pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as parquet ({e})") from None
    return [(Location(path, index), row) for index, row in enumerate(table.to_pylist())]


def _read_saved_dataset(path: str) -> list[tuple[Location, Row]]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets  # slow to import, so only when a directory is given

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(
            f"{path}: is a directory, but not one written by datasets' save_to_disk; "
            f"give a {', '.join(SUFFIXES)} file or such a directory"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = _pick_split(path, dataset)
    return [(Location(path, index), row) for index, row in enumerate(dataset.to_list())]


def _pick_split(path: str, splits: Any) -> Any:
    """The only split of a DatasetDict, else its "train" split; guessing further would be silent."""
    if len(splits) == 1:
        return next(iter(splits.values()))
    if "train" in splits:
        return splits["train"]
    raise DataError(
        f"{path}: holds splits {', '.join(splits)} and none is 'train'; "
        "save the split to use on its own, or name it 'train'"
    )


_READERS: dict[str, Callable[[str], list[tuple[Location, Row]]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows as JSON Lines (the format every reader here accepts); returns the path."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
