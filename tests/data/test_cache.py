"""Tokenised splits are reused by a run with the same inputs, and rebuilt when any changes."""

from __future__ import annotations

import os
from pathlib import Path

from ftlab.data import DataModule
from ftlab.models.tiny import byte_level_tokenizer

from .helpers import datamodule, settings, write_jsonl

ROWS = [{"instruction": f"Repeat {w}.", "output": w} for w in "alpha beta gamma delta epsilon".split()]


def entries() -> set[str]:
    root = Path(os.environ["FTLAB_CACHE"]) / "data"
    # Hidden names are bookkeeping (an entry's lock file, a scratch directory), not entries.
    return {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.exists() else set()


def test_reuse_and_invalidation(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = datamodule(path, tok, val_fraction=0.2)
    assert first.cache_status.startswith("saved to") and len(entries()) == 1

    # Same file, tokenizer, template and length: reused, and encoding is not run at all.
    calls = []
    encode = DataModule._encode_splits
    monkeypatch.setattr(DataModule, "_encode_splits", lambda self: calls.append(1) or encode(self))
    again = datamodule(path, byte_level_tokenizer(), val_fraction=0.2)
    assert again.cache_status.startswith("reused from") and not calls
    assert again.train_set == first.train_set and again.val_set == first.val_set
    assert again.stats == first.stats

    # Each change makes a new entry.
    seen = set(entries())
    changed_tok = byte_level_tokenizer()
    changed_tok.add_tokens(["<new>"])
    variants = [
        lambda: datamodule(path, tok, val_fraction=0.2, max_length=49),
        lambda: datamodule(path, tok, val_fraction=0.2, template="Q: {instruction}\nA: "),
        lambda: datamodule(path, changed_tok, val_fraction=0.2),
        lambda: datamodule(path, tok, val_fraction=0.2, train_on_prompt=True),
        lambda: datamodule(path, tok, val_fraction=0.2, seed=1),
    ]
    for make in variants:
        dm = make()
        assert dm.cache_status.startswith("saved to"), dm.cache_status
        assert entries() - seen, "no new cache entry"
        seen = entries()

    # A change to the file's content invalidates it too; an identical copy elsewhere does not.
    write_jsonl(path, ROWS[:-1] + [{"instruction": "Repeat zeta.", "output": "zeta"}])
    assert datamodule(path, tok, val_fraction=0.2).cache_status.startswith("saved to")
    copy = write_jsonl(tmp_path / "copy.jsonl", ROWS[:-1] + [{"instruction": "Repeat zeta.", "output": "zeta"}])
    assert datamodule(copy, tok, val_fraction=0.2).cache_status.startswith("reused from")


def test_chat_template_change_invalidates(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Yo"}]}])
    a = datamodule(path, tok, "chat", val_path=str(path))
    tok2 = byte_level_tokenizer()
    tok2.chat_template = tok2.chat_template.replace("message['content']", "message['content'] | upper")
    b = datamodule(path, tok2, "chat", val_path=str(path))
    assert b.cache_status.startswith("saved to") and a.train_set != b.train_set


def test_corrupt_entry_is_rebuilt_and_cache_can_be_off(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    dm = datamodule(path, tok, val_fraction=0.2)
    entry = Path(dm.cache_status.split(" to ", 1)[1])
    (entry / "train.npz").write_bytes(b"not a numpy file")
    again = datamodule(path, tok, val_fraction=0.2)
    assert again.cache_status.startswith("saved to") and again.train_set == dm.train_set
    off = DataModule(settings(path, val_fraction=0.2, cache=False), tok)
    off.setup()
    assert off.cache_status == "off" and off.train_set == dm.train_set
