"""The LightningDataModule: records -> split -> token ids and labels -> batches.

One class serves every format (:mod:`ftlab.data.formats` supplies what differs), in two steps:

1. :meth:`DataModule.check_files` reads and validates every record without a tokenizer, so the
   command line refuses a bad file (exit status 2, one line naming file, line/row and field)
   before any weights load. For classification it also fixes the label set.
2. :meth:`DataModule.setup` (with a tokenizer) encodes the splits, or reuses them from the
   on-disk cache (:mod:`ftlab.data.cache`), drops or truncates over-long examples, plans the
   packed rows, and computes the statistics printed by :meth:`describe`.
"""

from __future__ import annotations

import json
import random

import lightning as L
from torch.utils.data import DataLoader

from ftlab.config import DataSettings
from ftlab.data import cache
from ftlab.data.collate import Collator, LengthGroupedSampler, PackedCollator, pack
from ftlab.data.encode import IGNORE_INDEX, encode_text_blocks
from ftlab.data.formats import build_format
from ftlab.data.records import (JSON_LINES, TABLES, Row, is_hub_name, read_rows, read_text,
                                resolve_path, text_files)
from ftlab.data.stats import SplitStats, split_stats, stats_table
from ftlab.errors import DataError


def split_records(records: list, val_fraction: float, seed: int, source: str = "the data") -> tuple[list, list]:
    """A seeded shuffle, then the first ``val_fraction`` (at least one record) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"{source} has only {len(records)} record(s): too few to hold out a validation split "
                        "(give data.val_path, or more data)")
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


def carve_test(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """The held-out test split: ``fraction`` of the *distinct* records (at least one), drawn
    with a random stream of its own (``data.seed``, never the run's seed), so every method and
    seed is scored on the same test set, whatever ``val_fraction``. All copies of a record go to
    the same side, so the test split shares no record with training or validation."""
    keys = list(dict.fromkeys(_key(r) for r in records))
    random.Random(f"ftlab-test-split-{seed}").shuffle(keys)
    n_test = max(1, round(fraction * len(keys)))
    if n_test >= len(keys):
        raise DataError(f"only {len(keys)} distinct record(s): too few to hold out a test split "
                        "(give data.test_path, or more data)")
    held = set(keys[:n_test])
    return [r for r in records if _key(r) not in held], [r for r in records if _key(r) in held]


def check_disjoint(test: list, others: list, where: str) -> None:
    """Refuse a test split that shares records with the data the run trains or selects on."""
    seen = {_key(r) for r in others}
    shared = [r for r in test if _key(r) in seen]
    if shared:
        raise DataError(f"{len(shared)} of the {len(test)} test record(s) also appear in {where} "
                        f"(first: {_key(shared[0])[:120]}); a test split must be disjoint from them")


def _key(record) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


class DataModule(L.LightningDataModule):
    """Records of any ``data.format``, batched with dynamic padding, length grouping or packing."""

    def __init__(self, settings: DataSettings, tokenizer=None):
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.format = build_format(settings)
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []
        self.test_records: list[dict] = []  # empty: no test split (data.test_path, data.test_fraction)
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.test_set: list[dict] = []
        self.packed_rows: list[list[int]] | None = None
        self.stats: dict[str, SplitStats] = {}
        self.cache_status = "off"

    # -- facts the run needs ----------------------------------------------------------------
    @property
    def generative(self) -> bool:
        """Whether each held-out record has one reference answer to score generations on."""
        return self.format.generative

    @property
    def labels(self) -> list[str] | None:
        """The class names (classification), in the order of the model's outputs."""
        return getattr(self.format, "labels", None)

    @property
    def num_train_rows(self) -> int:
        """Sequences the training loader yields per epoch (packed rows when packing)."""
        return len(self.packed_rows) if self.packed_rows is not None else len(self.train_set)

    # -- 1. read and validate ---------------------------------------------------------------
    def check_files(self) -> None:
        """Read and validate every record (no tokenizer); raises :class:`DataError`."""
        s = self.settings
        train = self._read(s.path)
        val = self._read(s.val_path) if s.val_path else None
        test = self._read(s.test_path) if s.test_path else None
        if s.format == "classification":
            # The label set comes from all of the training file, before the split, so a rare
            # label that lands in the held-out part is not reported as unknown.
            self.format.set_labels(train)
            for row, record in train + (val or []) + (test or []):
                self.format.check_label(row, record)
        records = [r for _, r in train]
        self.test_records = [r for _, r in test] if test is not None else []
        if s.test_fraction and s.format != "text":  # (text: test blocks are carved after tokenising)
            records, self.test_records = carve_test(records, s.test_fraction, s.seed)
        if val is not None:
            self.train_records, self.val_records = records, [r for _, r in val]
        elif s.format == "text":
            self.train_records, self.val_records = records, []  # split into blocks later
        else:
            self.train_records, self.val_records = split_records(records, s.val_fraction, s.seed, s.path)
        if self.test_records:
            check_disjoint(self.test_records, self.train_records + self.val_records,
                           "the training or validation data")

    @property
    def has_test(self) -> bool:
        return bool(self.test_records or self.test_set)

    def _read(self, path: str) -> list[tuple[Row, dict]]:
        if self.settings.format == "text" and not _structured(path):
            # Plain text: each file is one document (read_text refuses empty or non-UTF-8 ones).
            return [(Row(str(f), "line 1", None), {"text": read_text(f)}) for f in text_files(path)]
        return [(row, self.format.record(row)) for row in read_rows(path, self.settings.subset)]

    # -- 2. encode ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        if self.tokenizer is None:
            raise RuntimeError("DataModule.setup needs a tokenizer")
        if not self.train_records:
            self.check_files()
        s = self.settings
        key = None
        if s.cache:
            key = cache.cache_key({
                "format": s.format, "max_length": s.max_length, "train_on_prompt": s.train_on_prompt,
                "over_length": s.over_length, "val_fraction": s.val_fraction, "seed": s.seed,
                "val_path": bool(s.val_path), **self.format.fingerprint(self.tokenizer),
                "tokenizer": cache.tokenizer_fingerprint(self.tokenizer),
                "records": cache.records_digest(self.train_records, self.val_records),
                **({"test_fraction": s.test_fraction, "test_path": bool(s.test_path),
                    "test_records": cache.records_digest(self.test_records)} if self._wants_test else {}),
            })
            splits, meta, self.cache_status = cache.load_or_build(key, self._encode_for_cache)
            self.train_set, self.val_set = splits["train"], splits["val"]
            self.test_set = splits.get("test", [])
            counts = meta["counts"]
        else:
            (self.train_set, self.val_set, self.test_set), counts = self._encode_splits()
        if s.packing:
            self.packed_rows = pack([len(e["input_ids"]) for e in self.train_set], s.max_length)
        pad_to = s.max_length if s.padding == "max_length" else None
        self.stats["train"] = split_stats(self.train_set, *counts["train"], batch_size=s.batch_size,
                                          pad_to=pad_to, shuffle_seed=s.seed, group=s.group_by_length,
                                          packed_rows=self.packed_rows)
        self.stats["val"] = split_stats(self.val_set, *counts["val"], batch_size=s.eval_batch_size,
                                        pad_to=None)
        if self.test_set:
            self.stats["test"] = split_stats(self.test_set, *counts["test"], batch_size=s.eval_batch_size,
                                             pad_to=None)

    @property
    def _wants_test(self) -> bool:
        return bool(self.settings.test_path or self.settings.test_fraction)

    def _encode_for_cache(self):
        (train, val, test), counts = self._encode_splits()
        splits = {"train": train, "val": val, **({"test": test} if test else {})}
        return splits, {"counts": counts, "format": self.settings.format, "data": self.settings.name}

    def _encode_splits(self):
        s = self.settings
        if s.format == "text":
            train = [{"input_ids": b, "labels": list(b)} for b in
                     encode_text_blocks([r["text"] for r in self.train_records], self.tokenizer, s.max_length)]
            test = [{"input_ids": b, "labels": list(b)} for b in
                    encode_text_blocks([r["text"] for r in self.test_records], self.tokenizer, s.max_length)
                    ] if self.test_records else []
            if s.test_fraction and not self.test_records:  # plain text: blocks of the documents
                train, test = carve_test(train, s.test_fraction, s.seed)
            if self.val_records:
                val = [{"input_ids": b, "labels": list(b)} for b in
                       encode_text_blocks([r["text"] for r in self.val_records], self.tokenizer, s.max_length)]
            else:
                train, val = split_records(train, s.val_fraction, s.seed,
                                           f"{s.path} (cut into blocks of {s.max_length} tokens)")
            if test:
                check_disjoint(test, train + val, "the training or validation blocks")
            return (train, val, test), {"train": (0, 0), "val": (0, 0), "test": (0, 0)}
        out, counts = [], {}
        splits = [("train", self.train_records), ("val", self.val_records)]
        for name, records in splits + ([("test", self.test_records)] if self.test_records else []):
            examples, truncated, dropped = self._encode_records(records)
            if not examples:
                raise DataError(f"every {name} example was dropped (longer than data.max_length="
                                f"{s.max_length}, or nothing left to learn after truncation)")
            out.append(examples)
            counts[name] = (truncated, dropped)
        return tuple(out) + (() if self.test_records else ([],)), counts

    def _encode_records(self, records: list[dict]) -> tuple[list[dict], int, int]:
        """Encoded examples, how many were truncated, and how many dropped.

        Dropped: over-long ones with ``data.over_length=drop``, and those left without a single
        label token after truncation (a prompt longer than ``max_length``): they would add
        nothing but cost, and a batch of only those has no loss at all.
        """
        drop = self.settings.over_length == "drop"
        examples, truncated, dropped = [], 0, 0
        for r in records:
            if self.settings.format == "classification":
                ids, label, cut = self.format.encode(r, self.tokenizer)
                example = {"input_ids": ids, "labels": label}
                empty = False
            else:
                enc = self.format.encode(r, self.tokenizer)
                cut = enc.truncated
                example = {"input_ids": enc.input_ids, "labels": enc.labels}
                empty = all(t == IGNORE_INDEX for t in enc.labels[1:])
            truncated += cut
            if (cut and drop) or empty:
                dropped += 1
                continue
            examples.append(example)
        return examples, truncated, dropped

    # -- batches ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        s, pad = self.settings, self.tokenizer.pad_token_id
        pad_to = s.max_length if s.padding == "max_length" else None
        common = dict(batch_size=s.batch_size, num_workers=s.num_workers)
        if self.packed_rows is not None:
            rows = [[self.train_set[i] for i in row] for row in self.packed_rows]
            return DataLoader(rows, shuffle=True, collate_fn=PackedCollator(pad, pad_to), **common)
        if s.group_by_length:
            sampler = LengthGroupedSampler([len(e["input_ids"]) for e in self.train_set],
                                           s.batch_size, seed=s.seed)
            return DataLoader(self.train_set, sampler=sampler, collate_fn=Collator(pad, pad_to), **common)
        return DataLoader(self.train_set, shuffle=True, collate_fn=Collator(pad, pad_to), **common)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The held-out test split: scored once after training, never used to select anything."""
        return self._eval_loader(self.test_set)

    def _eval_loader(self, examples: list[dict]) -> DataLoader:
        return DataLoader(examples, batch_size=self.settings.eval_batch_size, shuffle=False,
                          collate_fn=Collator(self.tokenizer.pad_token_id),
                          num_workers=self.settings.num_workers)

    # -- generation-based evaluation ----------------------------------------------------------
    def prompts(self, records: list[dict]) -> list[list[int]]:
        """Token ids a greedy generation starts from, one per record (generative formats)."""
        return [self.format.prompt_ids(r, self.tokenizer) for r in records]

    def shown(self, records: list[dict]) -> list[str]:
        """A short human-readable form of each record's question, for printed samples."""
        return [self.format.shown(r) for r in records]

    def references(self, records: list[dict]) -> list[str]:
        return [self.format.reference(r) for r in records]

    # -- report -------------------------------------------------------------------------------
    def describe(self) -> str:
        s = self.settings
        loss = {"classification": "class label", "text": "loss on all tokens"}.get(
            s.format, "loss on all tokens" if s.train_on_prompt else "response-only loss")
        if s.packing:
            batching = f"packed into rows of {s.max_length} tokens ({self.num_train_rows} rows)"
        elif s.padding == "max_length":
            batching = f"padded to max_length={s.max_length}"
        else:
            batching = "dynamic padding" + (", length-grouped" if s.group_by_length else "")
        length = (f"blocks of {s.max_length} tokens" if s.format == "text" else
                  f"over-long examples {'dropped' if s.over_length == 'drop' else 'truncated'} "
                  f"at {s.max_length} tokens")
        lines = [f"Data {s.name!r} ({s.format}, {s.path}; {loss}; {batching}; {length})"]
        if s.format in ("chat", "sharegpt") or (s.format == "instruction" and s.template == "chat"):
            lines.append(f"  chat template: {self.format.template(self.tokenizer)[1]}")
        if self.labels:
            lines.append(f"  labels: {', '.join(self.labels)}")
        lines += stats_table(self.stats)
        lines.append(f"  tokenised splits {self.cache_status}")
        return "\n".join(lines)


def _structured(path: str) -> bool:
    """Whether a text-format path holds records (JSON, CSV, ...) rather than plain text."""
    if is_hub_name(path):
        return True
    if any(ch in path for ch in "*?[") and not path.startswith("builtin:"):
        return False
    p = resolve_path(path)
    return p.is_file() and p.suffix.lower() in (".json", *JSON_LINES, *TABLES)


# The name the first version used; the class now serves every format.
InstructionDataModule = DataModule

