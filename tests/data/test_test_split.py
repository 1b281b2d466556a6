"""The held-out test split (``data.test_path`` / ``data.test_fraction``): carved once from the
training records with the split seed, the same whatever the validation split or the run's seed,
disjoint from training and validation; bad settings refused before any weights load."""

from __future__ import annotations

import json

import pytest

from ftlab import cli
from ftlab.config import DataSettings
from ftlab.data import DataModule
from ftlab.data.module import carve_test
from ftlab.errors import ConfigError, DataError

from .helpers import datamodule, write_jsonl


def key(r) -> str:
    return json.dumps(r, sort_keys=True)


def tasks(**kw) -> DataModule:
    dm = DataModule(DataSettings(name="tasks", path="builtin:tasks.jsonl", **kw))
    dm.check_files()
    return dm


def test_carved_test_split_is_fixed_disjoint_and_independent_of_validation():
    a = tasks(test_fraction=0.1)
    b = tasks(test_fraction=0.1, val_fraction=0.2)  # another validation split: the same test set
    assert a.test_records == b.test_records and len(a.test_records) == 40
    assert a.val_records != b.val_records
    test = {key(r) for r in a.test_records}
    assert not test & {key(r) for r in a.train_records + a.val_records}
    assert len(a.train_records) + len(a.val_records) + len(a.test_records) == 396
    assert tasks(test_fraction=0.1, seed=1).test_records != a.test_records  # data.seed sets it
    assert tasks().test_records == []  # off by default


def test_duplicates_stay_on_one_side():
    records = [{"x": i % 5} for i in range(50)]  # 5 distinct records, 10 copies each
    rest, test = carve_test(records, 0.2, seed=0)
    assert len(test) == 10 and len({key(r) for r in test}) == 1
    assert not {key(r) for r in test} & {key(r) for r in rest}
    with pytest.raises(DataError, match="too few to hold out a test split"):
        carve_test([{"x": 1}, {"x": 1}], 0.5, seed=0)


def test_test_file_is_read_and_must_not_overlap(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "new", "output": "x"}])
    dm = datamodule(train, test_path=str(test))
    assert len(dm.test_records) == 1 and dm.test_records[0]["instruction"] == "new"
    leaky = write_jsonl(tmp_path / "leaky.jsonl", rows[:3] + [{"instruction": "new", "output": "x"}])
    with pytest.raises(DataError, match="3 of the 4 test record.s. also appear in the training or validation data"):
        datamodule(train, test_path=str(leaky))
    with pytest.raises(DataError, match="does not exist"):
        datamodule(train, test_path=str(tmp_path / "missing.jsonl"))


def test_text_blocks_carve_a_test_split(tmp_path, tok):
    (tmp_path / "doc.txt").write_text(" ".join(f"w{i}" for i in range(400)))
    dm = datamodule(tmp_path / "doc.txt", tok, "text", max_length=50, test_fraction=0.2)
    assert dm.test_set and dm.stats["test"].examples == len(dm.test_set)
    blocks = lambda split: {tuple(e["input_ids"]) for e in split}  # noqa: E731
    assert not blocks(dm.test_set) & (blocks(dm.train_set) | blocks(dm.val_set))


@pytest.mark.parametrize("kw,needle", [
    ({"test_fraction": 1.0}, "data.test_fraction must be a fraction in [0, 1)"),
    ({"test_fraction": -0.1}, "data.test_fraction must be a fraction in [0, 1)"),
    ({"test_fraction": 0.2, "test_path": "t.jsonl"}, "not both"),
    ({"test_fraction": 0.9}, "leaves no training records"),
    ({"test_path": "builtin:tasks.jsonl"}, "is also the training data"),
])
def test_bad_test_settings(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        DataSettings(name="tasks", path="builtin:tasks.jsonl", **kw)


@pytest.mark.parametrize("override,needle", [
    ("data.test_path={tmp}/missing.jsonl", "does not exist"),
    ("data.test_fraction=1.5", "data.test_fraction must be a fraction in [0, 1)"),
    ("data.test_path=builtin:tasks.jsonl", "is also the training data"),
])
def test_cli_refuses_bad_test_split_with_status_2(tmp_path, capsys, override, needle):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["model=tiny-llama", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                  override.format(tmp=tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("ftlab: error: ")
    assert needle in err[0]
    assert not (tmp_path / "run").exists()
