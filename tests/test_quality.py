"""Contamination and dedup on hand-built texts, and MinHash LSH against brute force."""

import json
import random

import numpy as np
import pytest

from posttrain.data.quality import (
    contamination,
    contamination_report,
    dedup,
    dedup_files,
    lsh_bands,
    minhash_permutations,
    minhash_signature,
    ngram_overlap,
    row_text,
    shingle_hashes,
    units,
)
from posttrain.errors import DataError

QUESTION = (
    "A farmer has seventeen sheep and all but nine run away through a hole in the fence; "
    "how many sheep does the farmer have left at the end of the day?"
)
RIVER = (
    "The river that runs through the old town was once used to carry timber from the northern "
    "forests down to the harbour, where ships waited to take it across the sea to distant markets."
)
PARAPHRASE = (
    "Consider this puzzle. The river that runs through the old town was once used to carry timber "
    "from the northern forests, and the question is what happened to the harbour afterwards."
)
UNRELATED = "Photosynthesis converts light energy into chemical energy stored in glucose molecules inside plant cells."

TRAIN = [
    "Some unrelated training text about cooking pasta with garlic and olive oil for dinner tonight.",
    "Riddles for kids. " + QUESTION.upper() + " Answer: nine.",  # the eval question, verbatim up to case
    RIVER + " It is now a quiet place for walks.",
    "What is 12 + 7? 19",
]


def test_units_and_overlap():
    assert units("Hello, WORLD! It's  me.") == ["hello", "world", "it", "s", "me"]
    assert units("Ab  C\n", "char") == ["a", "b", " ", "c"]
    assert ngram_overlap("a b c d", "x a b c y", n=2) == pytest.approx(2 / 3)  # ab, bc of ab, bc, cd
    assert ngram_overlap("a b", "a b c", n=3) == 0.0  # shorter than n: no n-grams


def test_contamination_flags_copies_and_long_shared_spans_only():
    evals = [QUESTION, PARAPHRASE, UNRELATED, "What is 12 + 7?", ""]
    copied, paraphrase, unrelated, short, empty = contamination(TRAIN, evals)
    assert copied.flagged and copied.share == 1.0 and copied.train_index == 1
    assert copied.ngrams == copied.matched == len(units(QUESTION)) - 12
    # 31 words, 19 13-grams; the 18 shared words ("the river ... northern forests") give 6 of them.
    assert paraphrase.flagged and paraphrase.train_index == 2
    assert (paraphrase.matched, paraphrase.ngrams) == (6, 19)
    assert paraphrase.share == pytest.approx(6 / 19)
    assert not unrelated.flagged and unrelated.share == 0.0 and unrelated.train_index is None
    # Shorter than 13 words: checked as one whole-text n-gram, found inside training row 3.
    assert short.flagged and (short.ngrams, short.matched, short.train_index) == (1, 1, 3)
    assert not empty.flagged and empty.ngrams == 0
    # A share threshold (PaLM / Llama 2 style) keeps the partial overlap out.
    assert [r.flagged for r in contamination(TRAIN, evals, threshold=0.5)] == [
        True,
        False,
        False,
        True,
        False,
    ]


def test_contamination_char_level_for_tiny_tasks():
    train = ["3+4=7", "12+7=19", "5*6=30"]
    evals = ["12+7=19", "8+1=9"]
    hit, miss = contamination(train, evals, n=5, unit="char")
    assert hit.flagged and hit.share == 1.0 and hit.train_index == 1
    assert not miss.flagged


def test_contamination_names_the_train_row_sharing_most():
    evals = [RIVER]
    train = [RIVER[:120], "nothing here", RIVER + " Again.", RIVER]  # row 2 and 3 hold it all; 2 first
    [r] = contamination(train, evals)
    assert r.train_index == 2 and r.train_matched == r.ngrams


# --------------------------------------------------------------------------------------- row_text


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"text": "plain"}, "plain"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "hi\nyo"),
        ({"prompt": "p", "completion": "c", "id": 3}, "p\nc"),
        ({"prompt": [{"role": "user", "content": "p"}], "completion": "c"}, "p\nc"),
        ({"prompt": "p", "chosen": "good", "rejected": "bad"}, "p\ngood\nbad"),
        ({"prompt": "p", "answer": "4"}, "p"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "part"}]}]}, "part"),
    ],
)
def test_row_text(row, expected):
    assert row_text(row) == expected


def test_row_text_field_and_errors():
    row = {"prompt": "question", "completion": "answer"}
    assert row_text(row, "prompt") == "question"
    with pytest.raises(DataError, match="no field 'question'"):
        row_text(row, "question")
    with pytest.raises(DataError, match="no text to compare"):
        row_text({"id": 1, "label": True})
    with pytest.raises(DataError, match="expected text"):
        row_text({"text": 3})


# --------------------------------------------------------------------------------------- dedup

PARAGRAPH = (
    "Gradient accumulation lets a small machine train with a large batch by summing the gradients "
    "of several micro batches before each optimiser step. The loss of each micro batch must be "
    "divided by the number of units in the whole batch rather than in the micro batch, otherwise "
    "the average is wrong whenever micro batches differ in size, which happens with packing and "
    "with padding-free batches of variable length sequences."
)


def test_dedup_exact_and_near():
    one_word = PARAGRAPH.replace("optimiser", "optimizer")
    texts = [
        PARAGRAPH,  # 0
        RIVER,  # 1
        "hello world",  # 2
        PARAGRAPH.upper().replace(".", " ."),  # 3: exact after normalisation
        one_word,  # 4: near
        "Hello, World!",  # 5: exact
        UNRELATED,  # 6
        "What is 3 + 4?",  # 7
        "What is 3 + 5?",  # 8: one word apart, but a different problem: kept
    ]
    result = dedup(texts)
    assert result.groups == [[0, 3, 4], [2, 5]]
    assert result.kept == [0, 1, 2, 6, 7, 8]
    assert result.removed == [3, 4, 5]
    exact_only = dedup(texts, near=False)
    assert exact_only.groups == [[0, 3], [2, 5]]


def test_near_duplicate_threshold_arithmetic():
    # One changed word in a text of m 5-word shingles: J = (m - 5) / (m + 5).
    a, b = shingle_hashes(PARAGRAPH), shingle_hashes(PARAGRAPH.replace("optimiser", "optimizer"))
    m = len(units(PARAGRAPH)) - 4
    inter = len(np.intersect1d(a, b))
    assert inter / (len(a) + len(b) - inter) == pytest.approx((m - 5) / (m + 5))
    assert dedup([PARAGRAPH, PARAGRAPH.replace("optimiser", "optimizer")], threshold=0.9).groups == []


def test_dedup_rows_use_row_text():
    rows = [{"prompt": "Q1", "completion": "A"}, {"text": "q1 a"}, {"prompt": "Q2", "completion": "A"}]
    assert dedup(rows).groups == [[0, 1]]
    assert dedup([rows[0], rows[2]], field="completion").groups == [[0, 1]]


def test_lsh_bands_and_minhash_estimate():
    bands, rows = lsh_bands(0.8, 128)
    assert (bands, rows) == (21, 6)  # P(candidate | J = 0.8) = 1 - (1 - 0.8^6)^21 = 0.998
    assert 1 - (1 - 0.8 ** (rows + 1)) ** (128 // (rows + 1)) < 0.99  # one more row would miss more
    # Matching signature positions estimate the Jaccard similarity.
    words = [f"w{i}" for i in range(400)]
    x, y = " ".join(words[:300]), " ".join(words[100:])  # unigram sets: J = 200 / 400
    a, b = minhash_permutations(512, seed=1)
    sx = minhash_signature(shingle_hashes(x, shingle=1), a, b)
    sy = minhash_signature(shingle_hashes(y, shingle=1), a, b)
    assert (sx == sy).mean() == pytest.approx(0.5, abs=0.07)


def brute_force_groups(texts, threshold, shingle=5):
    """Transitive groups of every pair with exact shingle Jaccard >= threshold (or equal text)."""
    sets = [set(shingle_hashes(t, shingle=shingle).tolist()) for t in texts]
    parent = list(range(len(texts)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            same = " ".join(units(texts[i])) == " ".join(units(texts[j]))
            if same or len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold:
                parent[max(find(i), find(j))] = min(find(i), find(j))
    groups = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def test_dedup_matches_brute_force_on_planted_duplicates():
    rng = random.Random(0)
    vocab = [f"tok{i}" for i in range(3000)]
    texts = []
    for _ in range(60):
        base = rng.choices(vocab, k=120)
        texts.append(" ".join(base))
        for _ in range(rng.randrange(3)):  # 0-2 copies with one or two words changed (J >= 0.85)
            copy = list(base)
            for _ in range(rng.choice([1, 2])):
                copy[rng.randrange(len(copy))] = rng.choice(vocab)
            texts.append(" ".join(copy))
    rng.shuffle(texts)
    result = dedup(texts)
    assert result.groups == brute_force_groups(texts, 0.8)
    assert len(result.groups) > 20  # the planted copies are there to be found
    assert dedup(texts, seed=1).groups == result.groups


# --------------------------------------------------------------------------------------- files


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_contamination_report_from_files(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN])
    evals = write(
        tmp_path / "eval.jsonl",
        [{"prompt": UNRELATED, "answer": "x"}, {"prompt": QUESTION, "answer": "8"}],
    )
    report = contamination_report(train, evals, eval_field="prompt")
    assert (report["train_rows"], report["eval_rows"], report["flagged"]) == (4, 2, 1)
    assert report["flagged_share"] == 0.5
    [row] = report["rows"]
    assert row["eval"] == f"{evals}:2" and row["train"] == f"{train}:2" and row["share"] == 1.0
    json.dumps(report)  # JSON-ready for the CLI


def test_dedup_files_across_files_and_writes_kept_rows(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"text": PARAGRAPH}, {"text": "hello world"}])
    b = write(tmp_path / "b.jsonl", [{"text": "Hello, World!"}, {"text": RIVER}])
    out = tmp_path / "dedup.jsonl"
    report = dedup_files([a, b], out=out)
    assert (report["rows"], report["kept"], report["removed"]) == (4, 3, 1)
    assert report["groups"] == [[f"{a}:2", f"{b}:1"]]
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert kept == [PARAGRAPH, "hello world", RIVER]


def test_file_rows_without_text_are_listed(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"text": "ok"}, {"id": 1}, {"id": 2}])
    with pytest.raises(DataError, match=r"2 rows have no text") as e:
        dedup_files(bad)
    assert f"{bad}:2" in str(e.value) and f"{bad}:3" in str(e.value)


def test_cli_contamination_and_dedup(tmp_path, capsys):
    import json

    from posttrain.cli import main
    from posttrain.data.io import write_jsonl

    leaked = "the quick brown fox jumps over the lazy dog near the old river bank at dawn today"
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": leaked}, {"text": "something else entirely"}] * 2)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": leaked}, {"text": "an unrelated question"}])
    out = tmp_path / "report.json"
    assert (
        main(["data", "contamination", str(train), "--against", str(evals), "--out", str(out), "--fail"]) == 1
    )
    report = json.loads(out.read_text())
    assert [r["eval"] for r in report["rows"]] == [f"{evals}:1"]
    kept = tmp_path / "kept.jsonl"
    assert main(["data", "dedup", str(train), "--out", str(kept)]) == 0
    assert len(kept.read_text().splitlines()) == 2
    assert "4 rows: 2 kept, 2 duplicates removed" in capsys.readouterr().out
