"""ShareGPT records, instruction records through the chat template, and hub subsets.

ShareGPT conversations and chat ``messages`` are the same conversations written two ways, so
they must give the same token ids and labels; the expected ids are written out from the
ChatML text itself (one token per byte with the byte-level tokenizer).
"""

from __future__ import annotations

import json

import pytest

from ftlab import cli
from ftlab.data.encode import IGNORE_INDEX
from ftlab.data.records import read_rows
from ftlab.errors import ConfigError, DataError

from conftest import TINY, assert_usage_error, run_cli
from .helpers import datamodule, ids, write_jsonl

M = IGNORE_INDEX

SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Yes."}, {"from": "human", "value": "More?"},
            {"from": "gpt", "value": "No."}]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "More?"},
            {"role": "assistant", "content": "No."}]


def _expected(tok, pieces):
    """Ids and labels of ``(text, scored)`` pieces: scored pieces are labels, the rest -100."""
    input_ids, labels = [], []
    for text, scored in pieces:
        piece = ids(tok, text)
        input_ids += piece
        labels += piece if scored else [M] * len(piece)
    return {"input_ids": input_ids, "labels": labels}


def test_sharegpt_scores_the_gpt_turns_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": SHAREGPT}])
    dm = datamodule(path, tok, "sharegpt", val_path=str(path))
    expected = _expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Yes.<|im_end|>\n", True),
        ("<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n", False),
        ("No.<|im_end|>\n", True)])
    assert dm.train_set[0] == expected
    scored = [t for t in expected["labels"] if t != M]
    assert tok.decode(scored) == "Yes.<|im_end|>\nNo.<|im_end|>\n"
    assert dm.references(dm.val_records) == ["No."]


def test_sharegpt_file_equals_the_same_conversation_as_messages(tmp_path, tok):
    rows = [{"conversations": SHAREGPT},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]
    chats = [{"messages": MESSAGES},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    share = datamodule(write_jsonl(tmp_path / "s.jsonl", rows), tok, "sharegpt", val_fraction=0.5)
    chat = datamodule(write_jsonl(tmp_path / "c.jsonl", chats), tok, "chat", val_fraction=0.5)
    assert share.train_set == chat.train_set and share.val_set == chat.val_set
    assert share.prompts(share.val_records) == chat.prompts(chat.val_records)
    assert share.references(share.val_records) == chat.references(chat.val_records)


def test_sharegpt_accepts_chat_role_names_and_its_own_field_name(tmp_path, tok):
    """user/assistant/tool are read as written; data.fields.conversations renames the list."""
    turns = [{"from": "user", "value": "Weather?"}, {"from": "assistant", "value": "Let me look."},
             {"from": "tool", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"turns": turns}])
    dm = datamodule(path, tok, "sharegpt", val_path=str(path), fields={"conversations": "turns"})
    assert [m["role"] for m in dm.train_records[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert dm.train_set[0] == _expected(tok, [
        ("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Let me look.<|im_end|>\n", True),
        ("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n", False),
        ("Sunny.<|im_end|>\n", True)])


def test_builtin_sharegpt_equals_builtin_chat(tok):
    share, chat = datamodule("builtin:sharegpt.jsonl", tok, "sharegpt"), datamodule("builtin:chat.jsonl", tok, "chat")
    assert len(share.train_set) == 356 and share.train_set == chat.train_set and share.val_set == chat.val_set


# -- instruction records through the chat template ----------------------------------------------
def test_instruction_through_the_chat_template_scores_the_response_only(tmp_path, tok):
    rows = [{"instruction": "Add.", "input": "12 + 30", "output": "42"},
            {"instruction": "Say hi.", "output": "hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = datamodule(path, tok, val_path=str(path), template="chat")
    first_prompt = "<|im_start|>user\nAdd.\n\n12 + 30<|im_end|>\n<|im_start|>assistant\n"
    assert dm.train_set[0] == _expected(tok, [(first_prompt, False), ("42<|im_end|>\n", True)])
    # No input: the instruction alone is the user turn.
    assert dm.train_set[1] == _expected(tok, [("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", False),
                                              ("hi<|im_end|>\n", True)])
    assert dm.prompts(dm.val_records[:1]) == [ids(tok, first_prompt)]
    assert dm.references(dm.val_records) == ["42", "hi"]
    assert "chat template: the model's own chat template" in dm.describe()


def test_instruction_chat_template_equals_the_same_records_as_chat(tok):
    """The built-in chat.jsonl is tasks.jsonl as conversations (instruction, blank line, input)."""
    inst = datamodule("builtin:tasks.jsonl", tok, template="chat")
    chat = datamodule("builtin:chat.jsonl", tok, "chat")
    assert inst.train_set == chat.train_set and inst.val_set == chat.val_set


def test_instruction_chat_template_needs_one(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "input": "1 + 2", "output": "3"}])
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"data.template=chat: the model's tokenizer has no chat template"):
        datamodule(path, tok, val_path=str(path), template="chat")
    dm = datamodule(path, tok, val_path=str(path), template="chat", chat_template="chatml")
    assert dm.train_set[0]["labels"][-len(ids(tok, "3<|im_end|>\n")):] == ids(tok, "3<|im_end|>\n")
    assert "data.chat_template" in dm.describe()


def test_alpaca_and_chat_templates_have_separate_cache_entries(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "input": "1 + 2", "output": "3"}])
    alpaca = datamodule(path, tok, val_path=str(path))
    chat = datamodule(path, tok, val_path=str(path), template="chat")
    assert alpaca.train_set != chat.train_set
    assert chat.cache_status.startswith("saved to")  # not reused from the alpaca entry


# -- bad records ---------------------------------------------------------------------------------
BAD = {  # name: (record, the located message)
    "unknown role": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
                     "line 2, field 'conversations[1].from': must be one of human, gpt, system, user, "
                     "assistant, tool, got 'bot'"),
    "empty turn": ({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "Yo"}]},
                   "line 2, field 'conversations[0].value': is empty"),
    "value not a string": ({"conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "Yo"}]},
                           "line 2, field 'conversations[0].value': must be a string, got list ['Hi']"),
    "turn not an object": ({"conversations": ["Hi", {"from": "gpt", "value": "Yo"}]},
                           "line 2, field 'conversations[0]': must be a {from, value} object, got str"),
    "not a list": ({"conversations": "Hi"},
                   "line 2, field 'conversations': must be a list of {from, value} messages, got str"),
    "missing list": ({"messages": MESSAGES},
                     "line 2, field 'conversations': missing (a required field); the record has "
                     "'messages', which data=chat reads"),
    "no answer": ({"conversations": [{"from": "gpt", "value": "Yo"}, {"from": "human", "value": "Hi"}]},
                  "line 2, field 'conversations[1].from': the last message must be the assistant's answer, "
                  "got 'human'"),
}


def _bad_file(tmp_path, record):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    return write_jsonl(tmp_path / "bad.jsonl", [good, record])


@pytest.mark.parametrize("case", BAD)
def test_bad_sharegpt_records_are_located(tmp_path, case):
    record, message = BAD[case]
    path = _bad_file(tmp_path, record)
    with pytest.raises(DataError) as err:
        datamodule(path, format="sharegpt")
    assert str(err.value) == f"{path}, {message}"


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_sharegpt_records_exit_2_before_any_run_dir(tmp_path, capsys, case):
    record, message = BAD[case]
    path = _bad_file(tmp_path, record)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["model=tiny-llama", "logger=none", "data=sharegpt", f"data.path={path}",
                  f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip() == f"ftlab: error: {path}, {message}"
    assert not (tmp_path / "run").exists()


def test_real_cli_bad_sharegpt_role_and_template_chat_run(tmp_path):
    """In real processes: a bad role stops with exit 2 and one line; data.template=chat trains."""
    record, message = BAD["unknown role"]
    path = _bad_file(tmp_path, record)
    proc = run_cli("model=tiny-llama", "logger=none", "data=sharegpt", f"data.path={path}",
                   f"hydra.run.dir={tmp_path / 'bad'}")
    assert_usage_error(proc, f"{path}, {message}")
    run = tmp_path / "run"
    proc = run_cli(*TINY, "trainer.max_steps=2", "eval.before=false", "eval.generate=false",
                   "data.template=chat", "data.max_length=96", f"hydra.run.dir={run}",
                   env={"FTLAB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat template: the model's own chat template" in proc.stdout + proc.stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"


# -- hub datasets with a subset (config name) ------------------------------------------------------
def test_hub_subset_is_passed_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"instruction": "Hi.", "output": "Hello."},
                                           {"instruction": "Bye.", "output": None}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = read_rows("hub:someone/math:test", subset="main")
    assert calls == [("someone/math", "main", "test")] and rows[1].file == "someone/math[main/test]"
    with pytest.raises(DataError, match=r"^someone/math\[main/train\], row 2, field 'output': missing"):
        datamodule("hub:someone/math", subset="main")
    assert calls[-1] == ("someone/math", "main", "train")


def test_hub_subset_offline_is_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        read_rows("hub:nobody-here/no-such-dataset", subset="main")
    msg = str(err.value)
    assert "'nobody-here/no-such-dataset' (subset 'main', split 'train')" in msg
    assert "local cache" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_subset_of_a_local_file_is_refused_through_the_cli(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "output": "3"}] * 3)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["model=tiny-llama", "logger=none", f"data.path={path}", "data.subset=main",
                  f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip() == (f"ftlab: error: data.subset=main names a config of a Hugging Face dataset, "
                           f"but data.path={path} is not one (use hub:<owner>/<name>, or drop data.subset)")
