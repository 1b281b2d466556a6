"""Hostile data files, generated (hypothesis): each one is read, or refused with a located
error (the file, and the line, row or record, and the field where there is one); never a
traceback of another kind, never a hang.

What is generated: JSON Lines and JSON files whose records hold numbers, objects, lists, null,
booleans, empty or blank strings where text is expected, or deeply nested values; raw lines of
random bytes (invalid UTF-8, NUL bytes); a byte-order mark; CRLF line ends; CSV files with
ragged rows and NUL bytes; Parquet files whose columns have the wrong types; chat and ShareGPT
records with unknown roles, empty turns, turns that are not objects. Fixed cases: a 10 MB
line, JSON nested 100,000 deep. The in-process readers get many examples; a handful go
through the command lines (``python -m ftlab``'s and ``ftlab.eval``'s ``main``).
``FTLAB_FUZZ_STRESS=1`` runs many more examples (docs/robustness.md).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ftlab import cli
from ftlab.errors import DataError

from .helpers import datamodule

STRESS = os.environ.get("FTLAB_FUZZ_STRESS") == "1"
FAST = settings(max_examples=1000 if STRESS else 60, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=100 if STRESS else 4, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
LOCATED = re.compile(r"(line|row|record) \d+")

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=20), st.sampled_from(["", " ", "\n", "\x00", "\ufeff"]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=8), inner,
                                                                             max_size=3)),
                          max_leaves=8)
FIELDS = {"instruction": ["instruction", "input", "output"], "text": ["text"],
          "classification": ["text", "label"]}
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot", "", " user ", "USER"])


def record_for(fmt: str):
    if fmt in ("chat", "sharegpt"):
        key, role, content = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
        turn = st.one_of(st.fixed_dictionaries({role: ROLES, content: st.one_of(st.text(max_size=10), json_value)}),
                         json_value)
        return st.one_of(st.fixed_dictionaries({key: st.one_of(st.lists(turn, max_size=4), json_value)}), json_value)
    good = st.text(min_size=1, max_size=10).filter(str.strip)
    return st.one_of(st.fixed_dictionaries({f: st.one_of(good, good, json_value) for f in FIELDS[fmt]}),
                     json_value)


def line_for(fmt: str):
    """One line of a JSON Lines file: a record, or bytes that are not one."""
    as_json = record_for(fmt).map(lambda r: json.dumps(r, ensure_ascii=False).encode())
    return st.one_of(as_json, as_json, as_json, st.binary(max_size=30),
                     st.sampled_from([b"", b"\x00", b"\xff\xfe", b"{", b"\xc3\x28", b"null", b"[]", b'"text"']))


@st.composite
def jsonl_file(draw, fmt: str) -> bytes:
    lines = draw(st.lists(line_for(fmt), min_size=0, max_size=6))
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = end.join(lines)
    if draw(st.booleans()):
        data = "\ufeff".encode() + data
    return data


def assert_located(err: DataError, path: Path) -> None:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg
    whole_file = ("is empty", "at least two labels", "expected a JSON list", "too few to hold out")
    assert LOCATED.search(msg) or any(w in msg for w in whole_file), msg


def read(path: Path, fmt: str) -> None:
    """The data module's reading and validation; a DataError must say where."""
    try:
        dm = datamodule(path, format=fmt, val_fraction=0.5 if fmt != "text" else 0.1)
    except DataError as err:
        assert_located(err, path)
        return
    for record in dm.train_records + dm.val_records:  # read: every text field is a string
        assert all(isinstance(v, (str, list)) for v in record.values()), record


@pytest.mark.parametrize("fmt,suffix", [("instruction", ".jsonl"), ("instruction", ".json"), ("chat", ".jsonl"),
                                        ("sharegpt", ".jsonl"), ("text", ".jsonl"),
                                        ("classification", ".jsonl")])
def test_hostile_json_lines_are_read_or_refused_with_a_location(fmt, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"

        @FAST
        @given(data=jsonl_file(fmt))
        def check(data: bytes) -> None:
            path.write_bytes(data)
            read(path, fmt)

        check()


@FAST
@given(records=st.lists(record_for("instruction"), max_size=5), indent=st.sampled_from([None, 1]))
def test_hostile_json_lists_are_read_or_refused_with_a_location(records, indent):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_text(json.dumps(records, indent=indent))
        read(path, "instruction")


cell = st.one_of(st.text(max_size=8), st.sampled_from(["", "\x00", '"', "a,b", "\r\n", "3"]))


@SLOW
@given(header=st.sampled_from([["instruction", "output"], ["instruction", "input", "output"], ["instruction"]]),
       rows=st.lists(st.lists(cell, min_size=0, max_size=4), max_size=4))
def test_ragged_csv_is_read_or_refused_with_a_location(header, rows):
    import csv
    import io

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        path.write_text(out.getvalue())
        read(path, "instruction")


column = st.one_of(st.lists(st.integers(-5, 5), min_size=3, max_size=3),
                   st.lists(st.one_of(st.none(), st.text(max_size=5)), min_size=3, max_size=3),
                   st.lists(st.floats(allow_nan=False), min_size=3, max_size=3),
                   st.lists(st.booleans(), min_size=3, max_size=3),
                   st.lists(st.lists(st.integers(-5, 5), max_size=2), min_size=3, max_size=3),
                   st.lists(st.fixed_dictionaries({"a": st.integers(-5, 5)}), min_size=3, max_size=3))


@SLOW
@given(instruction=column, output=column)
def test_parquet_with_wrong_column_types_is_refused_with_a_location(instruction, output):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        pq.write_table(pa.table({"instruction": instruction, "output": output}), path)
        read(path, "instruction")


def test_a_10mb_line_and_json_nested_100000_deep(tmp_path):
    big = tmp_path / "big.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    big.write_text(good + "\n" + json.dumps({"instruction": "x" * 10_000_000, "output": "y"}) + "\n" + good)
    started = time.perf_counter()
    dm = datamodule(big, val_fraction=0.34)
    assert len(dm.train_records) + len(dm.val_records) == 3
    assert time.perf_counter() - started < 30
    for suffix, text in ((".jsonl", '{"instruction": "a", "output": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
                         (".json", '[{"instruction": "a", "output": ' + "[" * 100_000 + "]" * 100_000 + "}]")):
        deep = tmp_path / f"deep{suffix}"
        deep.write_text(good + "\n" + text if suffix == ".jsonl" else text)
        with pytest.raises(DataError) as exc:
            datamodule(deep)
        assert_located(exc.value, deep)
        assert "nested too deeply" in str(exc.value)


HOSTILE_FILES = {
    "invalid UTF-8": (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n',
                      "line 2: not valid UTF-8"),
    "NUL byte": (b'{"instruction": "a", "output": "b"}\n\x00\n', "line 2: not valid JSON"),
    "null where text is expected": (b'{"instruction": "a", "output": null}\r\n',
                                    "line 1, field 'output': missing"),
    "deeply nested": (b'{"instruction": ' + b"[" * 50_000 + b"]" * 50_000 + b', "output": "b"}\n',
                      "line 1: not valid JSON (nested too deeply"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_files_through_the_command_line(case, tmp_path, capsys):
    content, needle = HOSTILE_FILES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        cli.main(["model=tiny-llama", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{path}, {needle}" in lines[0], lines[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tiny_runs import train_run

    run_dir = tmp_path_factory.mktemp("run")
    train_run(run_dir, "trainer.max_steps=1", "eval.generate=false", "eval.max_examples=2")
    return run_dir


@pytest.mark.parametrize("case", ["invalid UTF-8", "deeply nested"])
def test_hostile_files_through_eval(case, finished_run, tmp_path, capsys):
    from ftlab import eval as ftlab_eval

    content, needle = HOSTILE_FILES[case]
    path = tmp_path / "test.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        ftlab_eval.main([str(finished_run), "--data", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{path}, {needle}" in lines[0], lines[0]
