"""Reading dataset files and validating rows: every error names the file, the line and the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.io import Location, read_rows
from posttrain.data.schemas import KINDS, detect_kind, load_rows, validate_rows
from posttrain.errors import DataError, PosttrainError


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


ROWS = [
    {"id": "a", "messages": chat(("user", "What is 2+2?"), ("assistant", "4"))},
    {"id": "b", "messages": chat(("system", "Be brief."), ("user", "Hi"), ("assistant", 'Hello, "friend".'))},
    {"id": "c", "messages": chat(("user", "Line one\nline two, with comma"), ("assistant", "ok"))},
]


# --- Writers: the same rows in every format ------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    # One object per line inside the list, so the expected line numbers are 2, 3, 4.
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = {
    # name: (file name, writer, expected line of each row or None for columnar formats)
    "jsonl": ("train.jsonl", write_jsonl, [1, 2, 3]),
    "json": ("train.json", write_json, [2, 3, 4]),
    "csv": ("train.csv", write_csv, [2, 3, 4]),
    "parquet": ("train.parquet", write_parquet, [None, None, None]),
    "saved_dataset": ("train_ds", write_saved_dataset, [None, None, None]),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    name, write, lines = FORMATS[fmt]
    path = write(tmp_path / name, ROWS)
    got = read_rows(path)
    assert [row for _, row in got] == ROWS
    assert [loc.index for loc, _ in got] == [0, 1, 2]
    assert [loc.line for loc, _ in got] == lines
    assert all(loc.path == str(path) for loc, _ in got)
    # ...and they validate to the same normalised rows, kind detected from the first row.
    assert [row for _, row in load_rows(path)] == ROWS


def test_location_str():
    assert str(Location("data/train.jsonl", 16, 17)) == "data/train.jsonl:17"
    assert str(Location("data/train.parquet", 16, None)) == "data/train.parquet row 16"


# --- Line numbers ---------------------------------------------------------------------------------


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('\n{"text": "a"}\n\n   \n{"text": "b"}\n\n', encoding="utf-8")
    got = read_rows(path)
    assert [(loc.index, loc.line, row["text"]) for loc, row in got] == [(0, 2, "a"), (1, 5, "b")]


def test_csv_line_is_where_the_row_starts(tmp_path):
    path = tmp_path / "train.csv"
    # Line 1 header; 2 blank; 3-4 one record with a quoted newline; 5 blank; 6 a record.
    path.write_text('prompt,completion\n\n"two\nlines",x\n\nq,y\n', encoding="utf-8")
    got = read_rows(path)
    assert [(loc.line, row["prompt"]) for loc, row in got] == [(3, "two\nlines"), (6, "q")]


def test_json_lines_saved_under_a_json_name_are_read(tmp_path):
    # datasets' to_json("x.json") writes JSON Lines; accept it with true line numbers.
    path = write_jsonl(tmp_path / "train.json", ROWS)
    got = read_rows(path)
    assert [row for _, row in got] == ROWS
    assert [loc.line for loc, _ in got] == [1, 2, 3]


def test_json_object_wrapping_one_list_of_rows(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS}), encoding="utf-8")
    assert [row for _, row in read_rows(path)] == ROWS


# --- Malformed files ------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b" "x": 1}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value) == f"{path}:3: invalid JSON (Expecting ',' delimiter at column 14)"


def test_jsonl_reports_every_bad_line_at_once(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n{oops\n"just a string"\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_rows(path)
    msg = str(err.value)
    assert "3 unreadable lines" in msg
    assert f"{path}:2: expected a JSON object (got list)" in msg
    assert f"{path}:3: invalid JSON" in msg
    assert f"{path}:4: expected a JSON object (got str)" in msg


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json:3: invalid JSON \(Expecting property name"):
        read_rows(path)


def test_json_element_that_is_not_an_object_names_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n\n  "b"\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json:4: expected a JSON object \(got str\)"):
        read_rows(path)


def test_json_single_row_object_is_an_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS[0]), encoding="utf-8")
    with pytest.raises(DataError, match="single row object"):
        read_rows(path)


def test_csv_wrong_cell_count_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv:3: 3 cells, but the header has 2 columns"):
        read_rows(path)


def test_csv_repeated_column_is_an_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,prompt\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv:1: repeated column name\(s\) in header: prompt"):
        read_rows(path)


def test_csv_cell_that_only_looks_like_json_stays_a_string(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,tests\n[INST] hi,"[""assert f(1) == 2""]"\n', encoding="utf-8")
    [(_, row)] = read_rows(path)
    assert row == {"prompt": "[INST] hi", "tests": ["assert f(1) == 2"]}


def test_missing_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {path}"):
        read_rows(path)
    assert issubclass(DataError, PosttrainError)


def test_unknown_suffix_lists_supported_formats(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as err:
        read_rows(path)
    msg = str(err.value)
    assert str(path) in msg and "'.txt'" in msg
    for suffix in (".jsonl", ".json", ".parquet", ".csv", "save_to_disk"):
        assert suffix in msg


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", "[]"),
        ("wrapped.json", '{"data": []}'),
        ("header_only.csv", "prompt,completion\n"),
        ("empty.csv", ""),
    ],
)
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{path}: no rows$"):
        read_rows(path)


def test_empty_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=f"^{path}: no rows$"):
        read_rows(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"train\.parquet: cannot read as parquet"):
        read_rows(path)


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read_rows(tmp_path)


def test_dataset_dict_splits(tmp_path):
    import datasets

    one = datasets.Dataset.from_list([{"text": "a"}])
    two = datasets.Dataset.from_list([{"text": "b"}])
    datasets.DatasetDict({"only": one}).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": one, "test": two}).save_to_disk(str(tmp_path / "with_train"))
    datasets.DatasetDict({"a": one, "b": two}).save_to_disk(str(tmp_path / "ambiguous"))
    assert [row for _, row in read_rows(tmp_path / "single")] == [{"text": "a"}]
    assert [row for _, row in read_rows(tmp_path / "with_train")] == [{"text": "a"}]
    with pytest.raises(DataError, match="holds splits a, b and none is 'train'"):
        read_rows(tmp_path / "ambiguous")


# --- Kinds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, kind",
    [
        ({"messages": chat(("user", "q"), ("assistant", "a"))}, "sft"),
        ({"text": "once upon a time"}, "sft"),
        ({"prompt": "q", "completion": "a"}, "sft"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        # UltraFeedback-style rows also carry the chosen conversation as `messages`.
        ({"prompt": "q", "chosen": "a", "rejected": "b", "messages": []}, "preference"),
        ({"prompt": "q", "completion": "a", "label": True}, "feedback"),
        ({"prompt": "q", "answer": "4"}, "prompt"),
        ({"prompt": "q", "completion": None}, "prompt"),  # a null column counts as absent
        ({"question": "q"}, None),
        ([1, 2], None),
    ],
)
def test_detect_kind(row, kind):
    assert detect_kind(row) == kind


def test_kinds():
    assert KINDS == ("sft", "preference", "feedback", "prompt")


def rows_at(path: str, *rows: dict) -> list[tuple[Location, dict]]:
    """Rows as if read from a jsonl file, one per line."""
    return [(Location(path, i, i + 1), row) for i, row in enumerate(rows)]


def test_wrong_role_names_file_line_and_field_path(tmp_path):
    good = {"messages": chat(("user", "q"), ("assistant", "a"))}
    bad = {"messages": chat(("system", "s"), ("user", "q"), ("asistant", "a"))}
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(DataError) as err:
        load_rows(path, "sft")
    assert str(err.value) == (
        f"{path}:2: field 'messages[2].role': must be one of system, user, assistant, tool (got 'asistant')"
    )


def test_errors_of_all_rows_come_in_one_error():
    rows = rows_at(
        "train.jsonl",
        {"messages": chat(("user", "q"), ("assistant", 5))},  # wrong type
        {"messages": chat(("user", "q"), ("assistant", "a"))},  # fine
        {"messages": chat(("user", "q"))},  # nothing to learn
        {"text": ""},  # empty
    )
    with pytest.raises(DataError) as err:
        validate_rows(rows, "sft")
    lines = str(err.value).splitlines()
    assert lines[0] == "train.jsonl: 3 problems in 3 of 4 rows (checked as sft data):"
    assert lines[1:] == [
        "  train.jsonl:1: field 'messages[1].content': expected a string (got int)",
        "  train.jsonl:3: field 'messages': needs at least one assistant message (roles: user)",
        "  train.jsonl:4: field 'text': must not be empty",
    ]


def test_error_list_is_truncated_with_a_count():
    rows = rows_at("train.jsonl", *[{"text": 1}] * 7)
    with pytest.raises(DataError) as err:
        validate_rows(rows, "sft", max_errors=3)
    lines = str(err.value).splitlines()
    assert lines[1] == "  train.jsonl:1: field 'text': expected a string (got int)"
    assert len(lines) == 1 + 3 + 1
    assert lines[-1] == "  ... and 4 more"


def test_did_you_mean_for_a_misspelt_field():
    rows = rows_at("train.jsonl", {"mesages": [], "id": 1})
    with pytest.raises(DataError) as err:
        validate_rows(rows, "sft")
    assert str(err.value) == (
        "train.jsonl:1: no 'messages', 'prompt'/'completion' or 'text' field "
        "(found: mesages, id); did you mean 'messages'?"
    )


def test_typo_hint_for_a_missing_field():
    rows = rows_at("train.jsonl", {"prompt": "q", "choosen": "a", "rejected": "b"})
    with pytest.raises(
        DataError, match=r"train\.jsonl:1: field 'chosen': missing \(found 'choosen'; a typo\?\)"
    ):
        validate_rows(rows, "preference")


def test_load_rows_says_when_the_kind_cannot_be_told(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "response": "a"}])
    with pytest.raises(
        DataError, match=rf"{path}:1: cannot tell the kind of data .*found: question, response"
    ):
        load_rows(path)


def test_unknown_kind():
    with pytest.raises(DataError, match="unknown data kind 'sfft'.*did you mean 'sft'"):
        validate_rows(rows_at("x.jsonl", {"text": "a"}), "sfft")


def test_sft_shapes_and_their_errors():
    ok = rows_at(
        "t.jsonl",
        {"prompt": "q", "completion": "a", "source": "web"},
        {"prompt": chat(("user", "q")), "completion": chat(("assistant", "a"))},
        {"text": "plain text"},
    )
    assert [row for _, row in validate_rows(ok, "sft")] == [row for _, row in ok]
    bad = rows_at(
        "t.jsonl",
        {"prompt": chat(("user", "q")), "completion": chat(("user", "a"))},
        {"prompt": "q", "completion": chat(("assistant", "a"))},
        {"messages": chat(("user", "q"), ("assistant", "  "))},
    )
    with pytest.raises(DataError) as err:
        validate_rows(bad, "sft")
    msg = str(err.value)
    assert "t.jsonl:1: field 'completion[0].role': must be assistant (got 'user')" in msg
    assert "t.jsonl:2: prompt is a string but completion is a list" in msg
    assert "t.jsonl:3: field 'messages[1].content': must not be empty (assistant message)" in msg


def test_normalised_rows_keep_extra_keys_and_order():
    row = {
        "id": 7,
        "messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a"}],
    }
    [(_, got)] = validate_rows(rows_at("t.jsonl", row), "sft")
    assert got == row and list(got) == ["id", "messages"]


def test_chosen_equal_to_rejected_is_an_error():
    same = chat(("assistant", "a"))
    rows = rows_at(
        "prefs.jsonl",
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"prompt": chat(("user", "q")), "chosen": same, "rejected": list(same)},
    )
    with pytest.raises(DataError) as err:
        validate_rows(rows, "preference")
    msg = str(err.value)
    assert "prefs.jsonl:2: chosen and rejected are identical" in msg
    assert "prefs.jsonl:3: chosen and rejected are identical" in msg
    assert "prefs.jsonl:1" not in msg


def test_feedback_labels_from_csv_become_bools(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nq,a,True\nq,b,false\nq,c,1\nq,d,0\n", encoding="utf-8")
    assert [row["label"] for _, row in load_rows(path)] == [True, False, True, False]


def test_feedback_bad_label_names_line_and_field(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nq,a,true\nq,b,yes\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(path, "feedback")
    assert str(err.value) == f"{path}:3: field 'label': expected true/false or 1/0 (got 'yes')"


def test_conversational_rows_from_csv_cells(tmp_path):
    rows = [{"prompt": chat(("user", "q")), "completion": chat(("assistant", "a")), "label": "0"}]
    path = write_csv(tmp_path / "kto.csv", rows)
    [(_, row)] = load_rows(path, "feedback")
    assert row == {**rows[0], "label": False}


def test_prompt_rows_keep_reward_fields():
    rows = rows_at(
        "rl.jsonl", {"prompt": "2+2?", "answer": "4"}, {"prompt": chat(("user", "f?")), "tests": ["assert 1"]}
    )
    assert [row for _, row in validate_rows(rows, "prompt")] == [row for _, row in rows]
    with pytest.raises(DataError, match=r"rl\.jsonl:1: field 'prompt': expected a string \(got int\)"):
        validate_rows(rows_at("rl.jsonl", {"prompt": 3, "answer": "4"}), "prompt")


def test_columnar_nulls_count_as_absent(tmp_path):
    # One parquet file mixing sft shapes: each row has the other shapes' columns as null.
    rows = [
        {"messages": chat(("user", "q"), ("assistant", "a")), "prompt": None, "completion": None},
        {"messages": None, "prompt": "q", "completion": "a"},
    ]
    path = write_parquet(tmp_path / "mixed.parquet", rows)
    assert [row for _, row in load_rows(path, "sft")] == rows
    with pytest.raises(
        DataError, match=r"mixed\.parquet row 1: field 'completion': expected a string \(got null\)"
    ):
        validate_rows([(Location(str(path), 1), {"prompt": "q", "completion": None})], "sft")
