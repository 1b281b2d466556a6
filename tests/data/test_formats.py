"""Reading every supported source into validated records, and the seeded split."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ftlab.config import DataSettings
from ftlab.data import DataModule, read_rows
from ftlab.errors import ConfigError, DataError

from .helpers import datamodule, settings, write_jsonl

RECORDS = [{"instruction": "Add.", "input": "1 + 2", "output": "3"},
           {"instruction": "Say hi.", "input": "", "output": "42"},
           {"instruction": "Name a colour.", "input": "", "output": "red"}]


def _write(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, RECORDS)
    elif suffix == ".json":
        path.write_text(json.dumps(RECORDS, indent=2))
    elif suffix in (".csv", ".tsv"):
        pd.DataFrame(RECORDS).to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    else:
        pd.DataFrame(RECORDS).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_instruction_records_from_every_file_type(tmp_path, suffix):
    dm = datamodule(_write(tmp_path, suffix), val_path=str(_write(tmp_path, suffix)))
    # CSV cells stay strings ("42" is not turned into an integer); a blank input is "".
    assert dm.train_records == RECORDS


def test_remapped_field_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "Say hi.", "a": "hi"}])
    dm = datamodule(path, val_path=str(path), fields={"instruction": "q", "output": "a"})
    assert dm.train_records == [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    with pytest.raises(ConfigError, match="data.fields.question is not a field of data.format=instruction"):
        settings(path, fields={"question": "q"})


def test_builtin_split_is_seeded_and_disjoint():
    s = DataSettings(name="tasks", path="builtin:tasks.jsonl", val_fraction=0.1, seed=0)
    a, b = DataModule(s), DataModule(s)
    a.check_files(), b.check_files()
    # val_fraction of the file's records, rounded: 0.1 x 396 lines = 39.6 -> 40.
    assert len(a.val_records) == round(0.1 * _lines("tasks.jsonl")) == 40
    assert len(a.train_records) == _lines("tasks.jsonl") - 40
    assert a.val_records == b.val_records
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert not {key(r) for r in a.val_records} & {key(r) for r in a.train_records}
    other = DataModule(DataSettings(name="tasks", path="builtin:tasks.jsonl", seed=1))
    other.check_files()
    assert other.val_records != a.val_records


def _lines(name: str) -> int:
    """Non-blank lines of a shipped JSON Lines file: its records, counted without ftlab's reader."""
    from ftlab.data.records import builtin_dir

    return sum(1 for line in (builtin_dir() / name).read_text(encoding="utf-8").splitlines() if line.strip())


def _documents(name: str) -> int:
    from ftlab.data.records import builtin_dir

    return len(list((builtin_dir() / name).glob("*.txt")))


@pytest.mark.parametrize("name,fmt,count", [("tasks.jsonl", "instruction", _lines),
                                            ("chat.jsonl", "chat", _lines),
                                            ("sentiment.jsonl", "classification", _lines),
                                            ("corpus", "text", _documents)])
def test_builtin_data_ships_and_validates(name, fmt, count):
    """Every record of the shipped file (every document of the corpus) is read and valid."""
    dm = datamodule(f"builtin:{name}", format=fmt)
    assert len(dm.train_records) + len(dm.val_records) == count(name) > 1


def test_builtin_generator_is_deterministic():
    from ftlab.data.builtin.generate import chat_records, generate, sentiment
    from ftlab.data.records import builtin_dir

    lines = (builtin_dir() / "tasks.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate()
    chats = [json.loads(line) for line in (builtin_dir() / "chat.jsonl").read_text().splitlines()]
    assert chats == chat_records(generate())
    rows = sentiment()
    assert [json.loads(line) for line in (builtin_dir() / "sentiment.jsonl").read_text().splitlines()] == rows
    # sentiment()'s contract: n=400 distinct sentences, the labels alternating (balanced).
    assert len({r["text"] for r in rows}) == len(rows) == 400
    assert sum(r["label"] == "positive" for r in rows) == 200


def test_text_from_a_file_a_directory_a_glob_and_records(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first doc")
    (tmp_path / "docs" / "sub" / "b.md").write_text("second doc")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "one.txt").write_text("only doc")
    val = str(tmp_path / "one.txt")
    assert datamodule(tmp_path / "docs", format="text", val_path=val).train_records == [
        {"text": "first doc"}, {"text": "second doc"}]
    assert datamodule(tmp_path / "one.txt", format="text", val_path=val).train_records == [{"text": "only doc"}]
    globbed = datamodule(f"{tmp_path}/docs/**/*.md", format="text", val_path=val)
    assert globbed.train_records == [{"text": "second doc"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "from a record"}])
    assert datamodule(path, format="text", val_path=val, fields={"text": "body"}).train_records == [
        {"text": "from a record"}]


def test_text_split_holds_out_blocks(tmp_path, tok):
    (tmp_path / "doc.txt").write_text("word " * 200)
    dm = datamodule(tmp_path / "doc.txt", tok, "text", max_length=50, val_fraction=0.25)
    # 1000 bytes + <eos> = 1001 tokens -> 21 blocks of 50; 0.25 x 21 = 5.25 -> 5 held out.
    assert len(dm.val_set) == 5 and len(dm.train_set) == 16
    lengths = sorted(len(e["input_ids"]) for e in dm.train_set + dm.val_set)
    assert lengths == [1] + [50] * 20  # 1000 bytes + <eos>, cut into blocks of 50


def test_classification_label_set_from_config_or_file(tmp_path, tok):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(12)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    assert datamodule(path, format="classification").labels == ["0", "1", "2"]  # integers, in order
    dm = datamodule(path, tok, "classification", labels=["2", "1", "0"])
    assert dm.labels == ["2", "1", "0"]
    assert {e["labels"] for e in dm.train_set} == {0, 1, 2}
    assert all(dm.labels[e["labels"]] == str(r["label"]) for e, r in zip(dm.train_set, dm.train_records))


def test_hub_dataset_from_the_cache(monkeypatch):
    """A hub name goes to datasets.load_dataset; its rows are validated like a file's."""
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": "Hi.", "output": "Hello."},
                                           {"instruction": "Bye.", "output": None}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = read_rows("hub:someone/alpaca-mini:test")
    assert calls == [("someone/alpaca-mini", "test")] and rows[0].where == "row 1"
    with pytest.raises(DataError, match=r"someone/alpaca-mini\[train\], row 2, field 'output': missing"):
        datamodule("someone/alpaca-mini")


def test_hub_dataset_without_network_or_cache_is_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        read_rows("hub:nobody-here/no-such-dataset")
    msg = str(err.value)
    assert "no-such-dataset" in msg and "local cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg
