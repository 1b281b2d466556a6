"""Packing: whole examples in full rows, and no attention (or loss) across examples."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ftlab.data.collate import (Collator, LengthGroupedSampler, PackedCollator, group_by_length, model_inputs,
                                pack, pad_batch, real_tokens)
from ftlab.data.encode import IGNORE_INDEX

from .helpers import datamodule


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return out


def test_pack_keeps_every_example_whole_and_fills_rows():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    rows = pack(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(300))  # each exactly once
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    # Best fit decreasing is within a row or two of the lower bound sum(lengths) / capacity.
    assert len(rows) <= -(-sum(lengths) // 256) + 2
    with pytest.raises(ValueError):
        pack([300], 256)


def test_packed_batch_layout():
    exs = examples([3, 4, 2])
    batch = PackedCollator(pad_id=0, pad_to=12)([exs[:2], exs[2:]])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4],
                                              [0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["input_ids"][0, :7].tolist() == exs[0]["input_ids"] + exs[1]["input_ids"]
    # The first token of each example is never a target (it would be predicted from the
    # previous example); padding is never a target.
    assert batch["labels"][0].tolist() == ([IGNORE_INDEX] + exs[0]["labels"][1:] + [IGNORE_INDEX]
                                           + exs[1]["labels"][1:] + [IGNORE_INDEX] * 5)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert real_tokens(batch) == 9 and "num_tokens" not in model_inputs(batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_across_packed_examples(attn):
    """Each example's logits inside a packed row equal its logits when run alone."""
    model = tiny_llama(attn)
    exs = examples([5, 11, 1, 8, 6])
    batch = PackedCollator(pad_id=0, pad_to=40)([exs[:3], exs[3:]])
    with torch.no_grad():
        packed = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
        starts = [(0, 0), (0, 5), (0, 16), (1, 0), (1, 8)]
        for (row, at), e in zip(starts, exs):
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            n = len(e["input_ids"])
            torch.testing.assert_close(packed[row, at:at + n], alone, atol=1e-5, rtol=0)
    # Without the reset position ids the rows would be one long sequence: the check has teeth.
    with torch.no_grad():
        crossed = model(input_ids=batch["input_ids"], use_cache=False).logits
    alone = model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits[0]
    assert (crossed[0, 5:16] - alone).abs().max() > 1e-3


def test_packed_loss_equals_the_token_weighted_loss_of_the_examples():
    model = tiny_llama("sdpa")
    exs = examples([7, 12, 4, 9])
    with torch.no_grad():
        packed = model(**model_inputs(PackedCollator(pad_id=0)([exs]))).loss
        total = count = 0
        for e in exs:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(e["labels"][1:])
            total += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)


def test_datamodule_packs_the_training_split(tmp_path, tok):
    dm = datamodule("builtin:tasks.jsonl", tok, packing=True, max_length=256, batch_size=4)
    lengths = [len(e["input_ids"]) for e in dm.train_set]
    assert dm.num_train_rows == len(dm.packed_rows) < len(dm.train_set) / 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 256
    st = dm.stats["train"]
    assert st.rows == dm.num_train_rows and st.padding_efficiency > 0.9
    assert real_tokens(batch) == sum(sum(lengths[i] for i in row) for row in
                                     _rows_of(batch, dm, lengths))
    # Validation is not packed (its loss is the same either way; batches stay comparable).
    assert "attention_mask" in next(iter(dm.val_dataloader()))


def _rows_of(batch, dm, lengths):
    """The packed rows a batch was made of (matched by their first example's ids)."""
    firsts = {tuple(dm.train_set[row[0]]["input_ids"]): row for row in dm.packed_rows}
    found = []
    for r in range(batch["input_ids"].shape[0]):
        for key, row in firsts.items():
            if batch["input_ids"][r, :len(key)].tolist() == list(key):
                found.append(row)
                break
    assert len(found) == batch["input_ids"].shape[0]
    return found


def test_length_grouped_batches_pad_less_and_still_shuffle():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(400)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega=10)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(400)) and first != second  # a new order every epoch

    def waste(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(400))
    random.Random(0).shuffle(shuffled)
    assert waste(first) < waste(shuffled) / 3
    assert max(lengths[i] for i in first[:8]) == max(lengths)  # the longest batch comes first


def test_collator_counts_real_tokens():
    batch = Collator(pad_id=0)(examples([3, 6]))
    assert real_tokens(batch) == 9 == int(batch["attention_mask"].sum())


# -- hand-worked batches: every value below is worked out from the collators' definitions ------
M = IGNORE_INDEX
TWO = [{"input_ids": [5, 6, 7], "labels": [M, 6, 7]}, {"input_ids": [8], "labels": [8]}]


def test_pad_batch_right_left_and_to_a_width():
    batch = pad_batch(TWO, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[M, 6, 7], [8, M, M]]
    assert int(batch["num_tokens"]) == 4
    assert {batch[k].dtype for k in ("input_ids", "attention_mask", "labels")} == {torch.long}

    left = pad_batch(TWO, pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[M, 6, 7], [M, M, 8]]

    assert pad_batch(TWO, pad_id=0, pad_to=5)["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert pad_batch(TWO, pad_id=0, pad_to=2)["input_ids"].shape == (2, 3)  # never cuts
    assert Collator(pad_id=4, pad_to=4)(TWO)["input_ids"].tolist() == [[5, 6, 7, 4], [8, 4, 4, 4]]


def test_pad_batch_class_labels_and_no_labels():
    classes = pad_batch([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], pad_id=0)
    assert classes["labels"].tolist() == [1, 0] and classes["labels"].dtype == torch.long
    unlabelled = pad_batch([{"input_ids": [1, 2]}], pad_id=0)
    assert set(unlabelled) == {"input_ids", "attention_mask", "num_tokens"}


def test_real_tokens_and_model_inputs():
    assert real_tokens({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}) == 3
    assert real_tokens({"num_tokens": torch.tensor(7), "attention_mask": torch.ones(1, 2)}) == 7
    assert model_inputs({"input_ids": 1, "num_tokens": 2, "use_cache": False}) == {"input_ids": 1, "use_cache": False}


def test_pack_best_fit_decreasing_by_hand():
    # capacity 8, lengths [5, 3, 4, 2, 6]; longest first: 6 -> new row 0 (2 free); 5 -> new row 1
    # (3 free); 4 -> new row 2 (4 free); 3 -> row 1 (exactly 3 free, the fullest it fits);
    # 2 -> row 0 (exactly 2 free).
    assert pack([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    # 2 fits rows with 3 and 4 free: best fit takes the fuller (3 free).
    assert pack([6, 5, 2], 9) == [[0, 2], [1]]
    assert pack([8, 8], 8) == [[0], [1]]  # an example may fill a row exactly
    assert pack([], 8) == []
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the row capacity 8"):
        pack([1, 9], 8)


def test_packed_collator_without_pad_to():
    a, b = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [M, 5]}
    batch = PackedCollator(pad_id=0)([[a], [b]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[M, 2, 3], [M, 5, M]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert int(batch["num_tokens"]) == 5
    assert {batch[k].dtype for k in ("input_ids", "labels", "position_ids")} == {torch.long}


def test_group_by_length_sorts_within_mega_batches_and_puts_the_longest_first():
    lengths = [3, 1, 4, 7, 5, 9, 2, 6]
    # one mega-batch (8 <= 2 * 50): the order is by length, longest first, whatever the seed
    for seed in (0, 1):
        assert group_by_length(lengths, 2, seed) == [5, 3, 7, 4, 2, 0, 6, 1]
    # mega-batches of one batch: each batch sorted, the one with the 9 (index 5) moved to the front
    # (from the second, third or fourth place for most seeds), the others kept in their order
    moved = 0
    for seed in range(10):
        order = group_by_length(lengths, 2, seed=seed, mega=1)
        assert sorted(order) == list(range(8)) and order[0] == 5
        assert all(lengths[order[i]] >= lengths[order[i + 1]] for i in range(0, 8, 2))
        shuffled = list(range(8))
        random.Random(seed).shuffle(shuffled)
        batches = [sorted(shuffled[i:i + 2], key=lambda j: -lengths[j]) for i in range(0, 8, 2)]
        at = next(i for i, b in enumerate(batches) if 5 in b)
        moved += at > 0
        assert order == [i for b in [batches[at]] + batches[:at] + batches[at + 1:] for i in b]
    assert moved > 0
    assert group_by_length([], 2, 0) == []


def test_length_grouped_sampler_defaults_epochs_and_length():
    lengths = list(range(51))  # batch_size 1: mega-batches of 50, then one of 1
    sampler = LengthGroupedSampler(lengths, batch_size=1)
    assert len(sampler) == 51
    assert list(sampler) == group_by_length(lengths, 1, seed=0, mega=50) != group_by_length(lengths, 1, 0, 51)
    assert list(sampler) == group_by_length(lengths, 1, seed=1, mega=50)  # the next epoch
    assert group_by_length(lengths, 1, 0) == group_by_length(lengths, 1, 0, mega=50)
    assert list(sampler) == group_by_length(lengths, 1, seed=2, mega=50)
    sampler = LengthGroupedSampler(lengths, batch_size=1, seed=5)
    sampler.set_epoch(3)
    assert list(sampler) == group_by_length(lengths, 1, seed=8, mega=50)
    assert list(sampler) == group_by_length(lengths, 1, seed=9, mega=50)  # the epoch counts on
    assert list(LengthGroupedSampler(lengths, 1, mega=10)) == group_by_length(lengths, 1, 0, mega=10)
