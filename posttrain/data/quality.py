"""Data quality: eval contamination by n-gram overlap, and exact + near-duplicate removal.

Contamination. An eval item whose text also appears in the training data measures memory,
not skill. The standard test is long n-gram overlap on normalised words: GPT-3 (Brown et al.
2020, app. C) flags an eval item sharing any 13-gram with the training set; PaLM and Llama 2
report the share of the item's n-grams (tokens) found in training data. :func:`contamination`
gives both: for each eval row the number and share of its n-grams seen in training, and the
training row that shares the most. Rows shorter than n are checked as one whole-text n-gram
(the row appearing verbatim inside a training row). ``unit="char"`` compares character
n-grams instead, for tiny synthetic tasks whose rows are a few words long.

Deduplication. Exact duplicates are found by hashing the normalised text (case, Unicode
form, punctuation and whitespace ignored). Near duplicates by MinHash (Broder 1997) with LSH
banding (Leskovec et al., "Mining of Massive Datasets", ch. 3) over word shingles:

- each text becomes the set S of its ``shingle``-word n-grams (Jaccard J(A, B) = |A∩B| / |A∪B|);
- a signature holds, for each of ``num_perm`` hash functions h_i(x) = (a_i x + b_i) mod p
  (p = 2^32 - 5, the largest 32-bit prime; x the shingle's CRC-32 mod p; a_i, b_i random
  below p), min_{x in S} h_i(x); two texts' signatures agree at a position with probability ~J;
- signatures are cut into b bands of r rows; texts agreeing on a whole band become candidate
  pairs, which happens with probability 1 - (1 - J^r)^b. r and b are picked so that a pair at
  the threshold is a candidate with probability >= 0.99;
- candidates are verified with their exact Jaccard (on the shingle hashes), so nothing below
  the threshold is ever merged; duplicates are grouped transitively (union-find) and the
  first row of each group is kept.

What a one-word edit does to J: with m shingles of k words, J = (m - k) / (m + k), so at
threshold t an edit is caught once m >= k (1 + t) / (1 - t): 45 shingles (~50 words) for the
defaults k = 5, t = 0.8. Shorter rows differing by a word are not merged, which is usually
right: "What is 3 + 4?" and "What is 3 + 5?" are different problems.

Everything is deterministic (seeded hash functions, no Python ``hash``) and pure Python +
numpy. Cost is linear in the data: about a second per 10^4 short rows on one core.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from posttrain.data.io import Location, Row, raise_if_errors, read_rows, write_jsonl
from posttrain.errors import DataError

Unit = Literal["word", "char"]

TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")
"""Fields joined (in this order) into a row's text when it has neither ``text`` nor ``messages``."""

_PRIME = np.uint64(4294967291)  # 2^32 - 5: a x + b < p^2 + p < 2^64, no uint64 overflow
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------- text


def _render(value: Any, where: str) -> str:
    """A field as text: a string as is; chat messages (or content parts) joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for item in value:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and "content" in item:
                parts.append(_render(item["content"], where))
            elif isinstance(item, dict) and isinstance(
                item.get("text"), str
            ):  # {"type": "text", "text": ...}
                parts.append(item["text"])
        return "\n".join(parts)
    raise DataError(f"{where}: expected text or a list of messages (got {type(value).__name__})")


def row_text(row: Row, field: str | None = None) -> str:
    """The text of a row that quality checks compare.

    With ``field``, that field (a string or a list of messages). Otherwise: ``text``; else the
    contents of ``messages`` joined by newlines; else whichever of prompt, completion, chosen,
    rejected the row has, joined by newlines (a preference row's text covers both answers).

    Raises:
        DataError: the field is missing, or the row has none of the fields above.
    """
    if field is not None:
        if field not in row:
            raise DataError(f"no field {field!r} in the row (fields: {', '.join(map(str, row)) or 'none'})")
        return _render(row[field], f"field {field!r}")
    if "text" in row:
        return _render(row["text"], "field 'text'")
    if "messages" in row:
        return _render(row["messages"], "field 'messages'")
    present = [f for f in TEXT_FIELDS if f in row]
    if not present:
        raise DataError(
            f"row has no text to compare: expected 'text', 'messages' or any of {', '.join(TEXT_FIELDS)} "
            f"(fields: {', '.join(map(str, row)) or 'none'}); name one with field="
        )
    return "\n".join(_render(row[f], f"field {f!r}") for f in present)


def units(text: str, unit: Unit = "word") -> list[str]:
    """Normalised words (Unicode NFKC, case-folded, punctuation dropped) or characters
    (NFKC, case-folded, runs of whitespace as one space)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if unit == "word":
        return _WORD.findall(text)
    if unit == "char":
        return list(_SPACE.sub(" ", text).strip())
    raise ValueError(f"unit must be 'word' or 'char' (got {unit!r})")


def ngrams(seq: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The distinct n-grams of a sequence (empty if it is shorter than n)."""
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}


def ngram_overlap(text: str, reference: str, *, n: int = 13, unit: Unit = "word") -> float:
    """Share of ``text``'s n-grams that also occur in ``reference`` (0 for a text shorter than n)."""
    grams = ngrams(units(text, unit), n)
    if not grams:
        return 0.0
    return len(grams & ngrams(units(reference, unit), n)) / len(grams)


# --------------------------------------------------------------------------------------- contamination


@dataclass(frozen=True)
class Overlap:
    """How much of one eval row is in the training data.

    index: the eval row. ngrams: its distinct n-grams (one, the whole row, if shorter than n;
    none if empty). matched: how many occur in some training row; share = matched / ngrams.
    train_index: the training row sharing the most of them (the first such), None if none;
    train_matched: how many it shares. flagged: share > the threshold asked for.
    """

    index: int
    ngrams: int
    matched: int
    share: float
    train_index: int | None
    train_matched: int
    flagged: bool


def contamination(
    train_texts: Iterable[str],
    eval_texts: Sequence[str],
    *,
    n: int = 13,
    unit: Unit = "word",
    threshold: float = 0.0,
) -> list[Overlap]:
    """Per eval row: the share of its n-grams found in the training texts (see module doc).

    The eval n-grams are indexed (eval sets are small) and the training texts streamed past
    the index once, so memory does not grow with the training set.

    Text shared by design (an instruction template repeated in every row, a benchmark's
    standard preamble) matches everywhere: compare the field that holds the content, or
    raise n, before reading a high flagged share as leakage.

    Args:
        n: n-gram length in ``unit``s; 13 words after GPT-3. For character n-grams use ~50.
        threshold: a row is flagged when its share exceeds this; 0 flags any shared n-gram.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    # index[L][gram] -> eval rows with that L-gram; L = n except for rows shorter than n.
    index: dict[int, dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
    totals = []
    for e, text in enumerate(eval_texts):
        seq = units(text, unit)
        grams = ngrams(seq, min(n, len(seq))) if seq else set()
        totals.append(len(grams))
        for g in grams:
            index[len(g)][g].append(e)
    matched: list[set] = [set() for _ in totals]
    best: list[tuple[int | None, int]] = [(None, 0)] * len(totals)  # eval row -> (train row, shared)
    for t, text in enumerate(train_texts):
        seq = units(text, unit)
        shared: dict[int, int] = defaultdict(int)  # eval row -> n-grams it shares with row t
        for length, grams in index.items():
            for g in ngrams(seq, length):
                for e in grams.get(g, ()):
                    matched[e].add(g)
                    shared[e] += 1
        for e, count in shared.items():
            if count > best[e][1]:
                best[e] = (t, count)
    report = []
    for e, total in enumerate(totals):
        share = len(matched[e]) / total if total else 0.0
        report.append(Overlap(e, total, len(matched[e]), share, best[e][0], best[e][1], share > threshold))
    return report


# --------------------------------------------------------------------------------------- dedup


@dataclass(frozen=True)
class DedupResult:
    """kept: indices of the rows to keep, ascending. groups: every set of duplicates (exact or
    near), each ascending; its first row is the one kept."""

    kept: list[int]
    groups: list[list[int]]

    @property
    def removed(self) -> list[int]:
        return sorted(i for g in self.groups for i in g[1:])


class _UnionFind:
    """Disjoint sets whose root is always the smallest member (so the first row is kept)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def shingle_hashes(text: str, *, shingle: int = 5, unit: Unit = "word") -> np.ndarray:
    """Sorted distinct hashes (CRC-32 mod p) of a text's shingles ([S], uint64). A text shorter
    than one shingle is one shingle; an empty text has none."""
    seq = units(text, unit)
    grams = ngrams(seq, min(shingle, len(seq))) if seq else set()
    sep = " " if unit == "word" else ""
    return np.unique(np.array([zlib.crc32(sep.join(g).encode()) for g in grams], dtype=np.uint64) % _PRIME)


def minhash_permutations(num_perm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (a, b) of h_i(x) = (a_i x + b_i) mod p, each [num_perm], 1 <= a < p, 0 <= b < p.

    a must range over the whole field: with a, x < 2^32 but a 61-bit modulus, a x + b would
    rarely wrap, every h_i would order the shingles alike, and the minima would agree far
    more often than J."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_PRIME), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_PRIME), size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[num_perm] minimum of each hash function over the shingle hashes ([S], S >= 1)."""
    return ((a[:, None] * hashes[None, :] + b[:, None]) % _PRIME).min(axis=1)


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest spurious candidates) with which a pair at
    Jaccard ``threshold`` still becomes a candidate with probability >= ``recall``."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


def dedup(
    items: Sequence[str | Row],
    *,
    field: str | None = None,
    near: bool = True,
    threshold: float = 0.8,
    shingle: int = 5,
    unit: Unit = "word",
    num_perm: int = 128,
    seed: int = 0,
) -> DedupResult:
    """Find exact and near-duplicate texts (or rows, through :func:`row_text`).

    Args:
        items: texts, or rows (dicts) whose text is ``row_text(row, field)``.
        near: also merge near duplicates (MinHash + exact Jaccard >= ``threshold``); else
            exact (normalised) duplicates only.
        threshold: Jaccard similarity of the shingle sets at which two texts are duplicates.
        shingle: shingle length in ``unit``s (5 words, as in most web-scale dedup pipelines).
        num_perm: MinHash functions; more gives fewer missed pairs near the threshold.
        seed: of the hash functions; the result is a function of the texts and the seed.

    Returns:
        :class:`DedupResult`: the first row of each duplicate group is kept.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1] (got {threshold})")
    texts = [it if isinstance(it, str) else row_text(it, field) for it in items]
    sets = _UnionFind(len(texts))
    first_of: dict[bytes, int] = {}
    for i, text in enumerate(texts):
        key = hashlib.blake2b(" ".join(units(text, unit)).encode(), digest_size=16).digest()
        sets.union(first_of.setdefault(key, i), i)
    if near:
        _merge_near(texts, sorted(first_of.values()), sets, threshold, shingle, unit, num_perm, seed)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(texts)):
        groups[sets.find(i)].append(i)
    return DedupResult(kept=sorted(groups), groups=[g for _, g in sorted(groups.items()) if len(g) > 1])


def _merge_near(texts, candidates, sets, threshold, shingle, unit, num_perm, seed) -> None:
    """Union every pair among ``candidates`` (one row per exact-duplicate group) whose shingle
    sets have Jaccard >= threshold, found through MinHash LSH buckets."""
    a, b = minhash_permutations(num_perm, seed)
    bands, rows = lsh_bands(threshold, num_perm)
    shingles: dict[int, np.ndarray] = {}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for i in candidates:
        hashes = shingle_hashes(texts[i], shingle=shingle, unit=unit)
        if len(hashes) == 0:  # empty text: exact dedup already grouped these
            continue
        shingles[i] = hashes
        signature = minhash_signature(hashes, a, b)
        for band in range(bands):
            buckets[band, signature[band * rows : (band + 1) * rows].tobytes()].append(i)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if (i, j) in checked or sets.find(i) == sets.find(j):
                    continue
                checked.add((i, j))
                if _jaccard(shingles[i], shingles[j]) >= threshold:
                    sets.union(i, j)


# --------------------------------------------------------------------------------------- files


def read_texts(
    paths: str | os.PathLike | Sequence[str | os.PathLike], field: str | None = None
) -> list[tuple[Location, Row, str]]:
    """(location, row, text) for every row of one or more data files, in order.

    Raises:
        DataError: a file cannot be read, or rows lack the text (every such row is listed).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out, errors = [], []
    for path in paths:
        for loc, row in read_rows(path):
            try:
                out.append((loc, row, row_text(row, field)))
            except DataError as e:
                errors.append(f"{loc}: {e}")
    raise_if_errors(f"{len(errors)} rows have no text to compare:", errors)
    return out


def contamination_report(
    train_paths: str | os.PathLike | Sequence[str | os.PathLike],
    eval_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    field: str | None = None,
    eval_field: str | None = None,
    n: int = 13,
    unit: Unit = "word",
    threshold: float = 0.0,
) -> dict:
    """:func:`contamination` over files: a JSON-ready summary with every flagged eval row named
    by its location and the training row that overlaps it most.

    ``field`` selects the text of training rows, ``eval_field`` that of eval rows (default:
    ``field``); e.g. ``eval_field="prompt"`` checks eval questions against whole training rows.
    """
    train = read_texts(train_paths, field)
    evals = read_texts(eval_paths, eval_field if eval_field is not None else field)
    rows = contamination([t for *_, t in train], [t for *_, t in evals], n=n, unit=unit, threshold=threshold)
    flagged = [r for r in rows if r.flagged]
    return {
        "n": n,
        "unit": unit,
        "threshold": threshold,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "flagged": len(flagged),
        "flagged_share": len(flagged) / len(rows) if rows else 0.0,
        "rows": [
            {**asdict(r), "eval": str(evals[r.index][0]), "train": str(train[r.train_index][0])}
            for r in flagged
        ],
    }


def dedup_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    field: str | None = None,
    **options,
) -> dict:
    """:func:`dedup` over the rows of one or more files (duplicates across files included);
    writes the kept rows to ``out`` (JSON Lines) when given. Returns a JSON-ready summary with
    every duplicate group named by the rows' locations (the kept row first)."""
    rows = read_texts(paths, field)
    result = dedup([t for *_, t in rows], **options)
    if out is not None:
        write_jsonl(out, [rows[i][1] for i in result.kept])
    return {
        "rows": len(rows),
        "kept": len(result.kept),
        "removed": len(rows) - len(result.kept),
        "groups": [[str(rows[i][0]) for i in g] for g in result.groups],
        "out": None if out is None else os.fspath(out),
    }
