"""Bad input ends in exit status 2 and one line naming the file, the line or row, and the field.

The checks run on the records alone (no tokenizer, no weights), in the command line's
preflight, so nothing is written: an earlier run's files are untouched and no run directory
is created.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftlab import cli
from ftlab.errors import DataError

from conftest import REPO
from .helpers import datamodule

GOOD = '{"instruction": "Add.", "output": "3"}\n'

# (format, file name, content, fragments the message must contain; {file} is the file's path)
CASES = {
    "invalid JSON line": ("instruction", "d.jsonl", GOOD + '{"instruction": "a", "output": \n',
                          ["{file}, line 2: not valid JSON"]),
    "invalid JSON in a list": ("instruction", "d.json",
                               '[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]',
                               ["{file}, line 3: not valid JSON"]),
    "missing field": ("instruction", "d.jsonl", GOOD + GOOD + '{"instruction": "a"}\n',
                      ["{file}, line 3, field 'output': missing"]),
    "wrong type": ("instruction", "d.jsonl", '{"instruction": "a", "output": 3}\n',
                   ["{file}, line 1, field 'output': must be a string, got int 3"]),
    "empty value": ("instruction", "d.jsonl", GOOD + '{"instruction": "  ", "output": "b"}\n',
                    ["{file}, line 2, field 'instruction': is empty"]),
    "not a record": ("instruction", "d.jsonl", GOOD + '["a", "b"]\n',
                     ["{file}, line 2: expected a record (JSON object), got list"]),
    "empty file": ("instruction", "d.jsonl", "\n\n", ["data file {file} is empty"]),
    "empty JSON list": ("instruction", "d.json", "[]", ["data file {file} is empty"]),
    "empty CSV cell": ("instruction", "d.csv", "instruction,output\nAdd.,3\nSay hi.,\n",
                       ["{file}, row 2, field 'output': is empty"]),
    "CSV without the column": ("instruction", "d.csv", "instruction,answer\nAdd.,3\n",
                               ["{file}, row 1, field 'output': missing"]),
    "empty CSV": ("instruction", "d.csv", "", ["data file {file} is empty"]),
    "chat role": ("chat", "c.jsonl",
                  '{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}\n',
                  ["{file}, line 1, field 'messages[1].role': must be one of system, user, assistant"]),
    "chat content type": ("chat", "c.jsonl",
                          '{"messages": [{"role": "user", "content": ["Hi"]}, '
                          '{"role": "assistant", "content": "Yo"}]}\n',
                          ["{file}, line 1, field 'messages[0].content': must be a string, got list"]),
    "chat without answer": ("chat", "c.jsonl", '{"messages": [{"role": "user", "content": "Hi"}]}\n',
                            ["{file}, line 1, field 'messages[0].role': the last message must be the assistant's"]),
    "chat messages not a list": ("chat", "c.jsonl", '{"messages": "Hi"}\n',
                                 ["{file}, line 1, field 'messages': must be a list"]),
    "label type": ("classification", "s.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": [1]}\n',
                   ["{file}, line 2, field 'label': must be a string or an integer, got list"]),
    "text not UTF-8": ("text", "t.txt", b"caf\xc3\xa9\nna\xefve\n", ["{file}, line 2: not valid UTF-8"]),
    "empty text file": ("text", "t.txt", "  \n", ["data file {file} is empty"]),
}


def _make(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.mark.parametrize("case", CASES)
def test_bad_records_raise_one_clear_data_error(tmp_path, case):
    fmt, name, content, needles = CASES[case]
    path = _make(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        datamodule(path, format=fmt)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle.format(file=path) in message, message


def _labelled(tmp_path):
    train = _make(tmp_path, "train.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    val = _make(tmp_path, "val.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
    return train, val


def test_label_outside_the_label_set(tmp_path):
    train, val = _labelled(tmp_path)
    with pytest.raises(DataError, match=rf"{val}, line 2, field 'label': label 'neutral' is not in the label "
                                        r"set \(the labels of the training data: neg, pos\)"):
        datamodule(train, format="classification", val_path=str(val))
    with pytest.raises(DataError, match=rf"{train}, line 1, field 'label': label 'pos' is not in the label "
                                        r"set \(data.labels: good, bad\)"):
        datamodule(train, format="classification", val_path=str(val), labels=["good", "bad"])


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match=f"data file {tmp_path}/nope.jsonl does not exist"):
        datamodule(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="matches no file"):
        datamodule(f"{tmp_path}/*.txt", format="text")
    with pytest.raises(DataError, match="no built-in data 'nope.jsonl'; built-in: chat.jsonl, corpus"):
        datamodule("builtin:nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        datamodule(tmp_path)


# -- through the command line -----------------------------------------------------------------
def _cli(capsys, tmp_path, *overrides):
    """``python -m ftlab ...`` in this process (preflight only: it fails before Hydra starts)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["model=tiny-llama", "logger=none", f"hydra.run.dir={tmp_path / 'outputs' / 'new-run'}",
                  *overrides])
    err = capsys.readouterr().err
    return exit_.value.code, err


def _snapshot(root):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path):
    """An earlier run's directory, whose files must survive any failed command."""
    run = tmp_path / "outputs" / "earlier-run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "val_loss": 0.5}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return run


CLI_CASES = {  # the list: invalid JSON, missing field, wrong type, empty, empty file
    case: CASES[case] for case in ("invalid JSON line", "missing field", "wrong type", "empty value",
                                   "empty file", "empty CSV cell", "chat role", "text not UTF-8")
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, earlier_run, case):
    fmt, name, content, needles = CASES[case]
    path = _make(tmp_path, name, content)
    option = {"instruction": "tasks", "chat": "chat", "text": "text", "classification": "classification"}[fmt]
    before, data_before = _snapshot(earlier_run), path.read_bytes()
    code, err = _cli(capsys, tmp_path, f"data={option}", f"data.path={path}")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftlab: error: "), err
    for needle in needles:
        assert needle.format(file=path) in lines[0]
    assert _snapshot(earlier_run) == before and path.read_bytes() == data_before
    assert not (tmp_path / "outputs" / "new-run").exists()


def test_cli_label_outside_the_set_and_missing_path(tmp_path, capsys, earlier_run):
    train, val = _labelled(tmp_path)
    before = _snapshot(earlier_run)
    code, err = _cli(capsys, tmp_path, "data=classification", f"data.path={train}", f"data.val_path={val}")
    assert code == 2 and err.count("ftlab: error:") == 1
    assert f"{val}, line 2, field 'label': label 'neutral' is not in the label set" in err
    code, err = _cli(capsys, tmp_path, f"data.path={tmp_path}/missing.jsonl")
    assert code == 2 and err.strip() == f"ftlab: error: data file {tmp_path}/missing.jsonl does not exist"
    assert _snapshot(earlier_run) == before


def test_cli_packing_with_prompt_learning_is_refused(tmp_path, capsys):
    code, err = _cli(capsys, tmp_path, "method=prompt_tuning", "data.packing=true")
    assert code == 2 and "data.packing=true cannot be combined with method 'prompt_tuning'" in err


def test_real_process_no_traceback(tmp_path):
    """The same in a real ``python -m ftlab`` process: status 2, one line, no traceback."""
    path = _make(tmp_path, "d.jsonl", GOOD + '{"instruction": "a", "output": 3}\n')
    proc = subprocess.run([sys.executable, "-m", "ftlab", "model=tiny-llama", "logger=none",
                           f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"ftlab: error: {path}, line 2, field 'output': must be a string, "
                                   "got int 3")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
