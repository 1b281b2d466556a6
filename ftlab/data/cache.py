"""Tokenised splits cached on disk, reused by later runs that would compute the same ids.

Location: ``$FTLAB_CACHE/data/<key>/`` (default ``~/.cache/ftlab/data``). The key is a SHA-256
over everything the token ids depend on:

- the records of both splits after reading, validation, field mapping and the seeded split
  (so a change to the file's content, to ``data.fields``, ``val_fraction`` or ``seed``
  changes it; an edit that does not change any record, such as reformatting, does not);
- the tokenizer: ``name_or_path``, a hash of its vocabulary, added and special tokens, and of
  its chat template;
- the format's settings: template (or the chat template's text), ``max_length``,
  ``train_on_prompt``, ``over_length``, the label set;
- :data:`VERSION`, bumped whenever ftlab's encoding changes.

An entry is a directory written under a temporary name and renamed into place, so a run
never reads half an entry; a corrupt entry is ignored and rewritten. Concurrent runs that need
the same missing entry encode it once (:func:`load_or_build`, :mod:`ftlab.cachelock`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from ftlab.cachelock import cache_root, hold, scratch_dir
from ftlab.io import replace_directory

VERSION = 1


def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    specials = {k: str(getattr(tokenizer, k, None)) for k in
                ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token")}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # merges, normalizer and pre-tokenizer change ids too
        digest.update(backend.to_str().encode())
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "sha256": digest.hexdigest()}


def cache_key(parts: dict) -> str:
    blob = json.dumps({"version": VERSION, **parts}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def records_digest(*splits: list) -> str:
    digest = hashlib.sha256()
    for split in splits:
        digest.update(json.dumps(split, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def cache_dir(key: str) -> Path:
    return cache_root() / "data" / key


def _pack_examples(examples: list[dict]) -> dict[str, np.ndarray]:
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    ids = np.array([t for e in examples for t in e["input_ids"]], dtype=np.int64)
    if examples and isinstance(examples[0]["labels"], int):
        labels = np.array([e["labels"] for e in examples], dtype=np.int64)
        return {"lengths": lengths, "input_ids": ids, "class_labels": labels}
    labels = np.array([t for e in examples for t in e["labels"]], dtype=np.int64)
    return {"lengths": lengths, "input_ids": ids, "labels": labels}


def _unpack_examples(arrays) -> list[dict]:
    bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])]).tolist()
    ids = arrays["input_ids"].tolist()
    if "class_labels" in arrays:
        classes = arrays["class_labels"].tolist()
        return [{"input_ids": ids[a:b], "labels": c} for a, b, c in zip(bounds, bounds[1:], classes)]
    labels = arrays["labels"].tolist()
    return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(bounds, bounds[1:])]


def load(key: str) -> tuple[dict[str, list[dict]], dict] | None:
    """``({split: examples}, meta)`` if the entry exists and reads cleanly, else None."""
    root = cache_dir(key)
    try:
        meta = json.loads((root / "meta.json").read_text())
        splits = {}
        for name in meta["splits"]:
            with np.load(root / f"{name}.npz") as arrays:
                splits[name] = _unpack_examples(arrays)
        return splits, meta
    except (OSError, ValueError, KeyError):
        return None


def save(key: str, splits: dict[str, list[dict]], meta: dict) -> Path:
    """Write the entry (replacing a corrupt one); call with the entry's lock held."""
    target = cache_dir(key)
    tmp = scratch_dir(target)
    try:
        for name, examples in splits.items():
            np.savez(tmp / f"{name}.npz", **_pack_examples(examples))
        (tmp / "meta.json").write_text(json.dumps({**meta, "splits": list(splits)}, indent=1, default=str))
        replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_or_build(key: str, build: Callable[[], tuple[dict[str, list[dict]], dict]]):
    """``(splits, meta, status)``: the entry if it exists, else ``build()``'s result, saved.

    Concurrent runs with the same key encode once: the first holds the entry's lock while it
    builds, the others wait for it and then read its entry.
    """
    hit = load(key)
    if hit is None:
        with hold(cache_dir(key), "tokenising the same data"):
            hit = load(key)
            if hit is None:
                splits, meta = build()
                return splits, meta, f"saved to {save(key, splits, meta)}"
    return *hit, f"reused from {cache_dir(key)}"
