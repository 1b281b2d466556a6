"""Over-long examples (truncated or dropped, and counted) and the statistics a run prints."""

from __future__ import annotations

import pytest

from ftlab.data.encode import IGNORE_INDEX, encode_example
from ftlab.data.stats import split_stats
from ftlab.errors import DataError

from .helpers import datamodule, write_jsonl


def test_truncation_is_counted(tok):
    enc = encode_example("x" * 50, "y" * 50, tok, max_length=64)
    assert enc.truncated and len(enc.input_ids) == 64 == len(enc.labels)
    assert enc.labels[:50] == [IGNORE_INDEX] * 50


def _rows():
    prompt = "### Instruction:\n{}\n\n### Response:\n"
    rows = [{"instruction": "Echo.", "output": "a" * 10},       # 38 + 11 = 49 tokens
            {"instruction": "Echo.", "output": "b" * 40},       # 79 tokens: over 64
            {"instruction": "E" * 70, "output": "c"}]           # prompt alone over 64
    assert len(prompt.format("Echo.")) == 38
    return rows


# The byte-level tokenizer gives one token per byte, and <eos> after the response: the 1st
# example fits (49), the 2nd (79) and the 3rd (prompt 70 + 38 - 5 bytes) are over 64. Truncated,
# the 2nd keeps 64 - 38 = 26 response tokens and the 3rd none (dropped); with "drop" both go.
@pytest.mark.parametrize("over_length,kept,truncated,dropped", [("truncate", 2, 2, 1), ("drop", 1, 2, 2)])
def test_over_long_examples_are_truncated_or_dropped_and_reported(tmp_path, tok, over_length, kept,
                                                                  truncated, dropped):
    path = write_jsonl(tmp_path / "d.jsonl", _rows())
    dm = datamodule(path, tok, val_path=str(path), max_length=64, over_length=over_length)
    st = dm.stats["train"]
    # The third example has no response token left after truncation: it is always dropped.
    assert (st.examples, st.truncated, st.dropped) == (kept, truncated, dropped)
    assert max(len(e["input_ids"]) for e in dm.train_set) <= 64
    table = dm.describe()
    assert f"over-long examples {'dropped' if over_length == 'drop' else 'truncated'} at 64 tokens" in table
    assert "truncated" in table and "dropped" in table and "padding eff." in table


def test_all_dropped_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "E" * 70, "output": "c"}])
    with pytest.raises(DataError, match="every train example was dropped"):
        datamodule(path, tok, val_path=str(path), max_length=32)


def test_statistics_and_padding_efficiency_by_formula():
    examples = [{"input_ids": [1] * n, "labels": [IGNORE_INDEX] * (n - 2) + [1, 1]} for n in (2, 4, 6, 8)]
    st = split_stats(examples, truncated=1, dropped=0, batch_size=2, pad_to=None)
    assert (st.examples, st.tokens, st.label_tokens, st.max_length, st.truncated) == (4, 20, 8, 8, 1)
    assert st.mean_length == 5
    # Batches in order: (2, 4) padded to 4, (6, 8) padded to 8: 20 real of 24 computed.
    assert st.padding_efficiency == pytest.approx(20 / 24)
    # Padded to max_length 10: 20 real of 40.
    assert split_stats(examples, 0, 0, batch_size=2, pad_to=10).padding_efficiency == pytest.approx(0.5)
    # Packed rows (8+2), (6+4) in one batch: 20 real of 20 computed.
    packed = split_stats(examples, 0, 0, batch_size=2, pad_to=None, packed_rows=[[3, 0], [2, 1]])
    assert packed.padding_efficiency == 1.0 and packed.rows == 2


def _real_over_computed(loader) -> float:
    """Padding efficiency measured on the batches a loader really yields."""
    real = computed = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        computed += batch["attention_mask"].numel()
    return real / computed


def test_builtin_statistics_are_printed(tok):
    import torch

    from ftlab.data.records import builtin_dir

    dm = datamodule("builtin:tasks.jsonl", tok)
    text = dm.describe()
    # The file's records, val_fraction 0.1 of them held out, rounded: 396 lines -> 39.6 -> 40.
    n = sum(1 for line in (builtin_dir() / "tasks.jsonl").read_text().splitlines() if line.strip())
    assert (n, round(0.1 * n)) == (396, 40)
    assert f"train  {n - 40:>8}" in text and f"val    {40:>8}" in text
    assert "response-only loss; dynamic padding" in text
    st, val = dm.stats["train"], dm.stats["val"]
    assert st.tokens == sum(len(e["input_ids"]) for e in dm.train_set)
    assert st.label_tokens == sum(t != IGNORE_INDEX for e in dm.train_set for t in e["labels"])
    # Validation batches come in file order: the statistic is what its loader computes, exactly.
    assert val.padding_efficiency == pytest.approx(_real_over_computed(dm.val_dataloader()), rel=1e-12)
    # The training statistic predicts one shuffled epoch (random.Random(seed)); the loader shuffles
    # the same examples with torch's generator, another order: within 1% (0.764 and 0.761 here).
    torch.manual_seed(0)
    assert st.padding_efficiency == pytest.approx(_real_over_computed(dm.train_dataloader()), abs=0.01)
