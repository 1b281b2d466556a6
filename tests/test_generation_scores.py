"""Unit checks of ftlab.metrics.generation's own code paths that the end-to-end metric tests
(tests/test_generation_metrics.py) leave open: batching of the prompts, the prompt-learning
check, empty answer sets and the BLEU order. Expected values are worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ftlab.metrics.generation import (SmoothedBLEU, _batches, _virtual_tokens_in_input, bleu_score, rouge_l,
                                      score_generation)


def test_prompt_batches_in_order_or_by_length():
    prompts = [[1, 2], [1, 2, 3], [4, 5], [6, 7], [8, 9, 1]]  # lengths 2, 3, 2, 2, 3
    assert _batches(prompts, 2, same_length=False) == [[0, 1], [2, 3], [4]]
    # same length only: the 2-token prompts 0, 2, 3 in batches of 2, then the 3-token ones
    assert _batches(prompts, 2, same_length=True) == [[0, 2], [3], [1, 4]]
    assert _batches(prompts, 16, same_length=False) == [[0, 1, 2, 3, 4]]
    assert _batches([], 4, same_length=True) == [] == _batches([], 4, same_length=False)


def _peft_model(prompt_learning: bool, peft_type):
    return SimpleNamespace(active_peft_config=SimpleNamespace(is_prompt_learning=prompt_learning,
                                                              peft_type=peft_type))


def test_virtual_tokens_only_for_prompt_tuning_and_p_tuning():
    assert _virtual_tokens_in_input(_peft_model(True, SimpleNamespace(value="PROMPT_TUNING")))
    assert _virtual_tokens_in_input(_peft_model(True, "P_TUNING"))  # a plain string type
    assert not _virtual_tokens_in_input(_peft_model(True, SimpleNamespace(value="PREFIX_TUNING")))
    assert not _virtual_tokens_in_input(_peft_model(True, "PREFIX_TUNING"))
    assert not _virtual_tokens_in_input(_peft_model(False, SimpleNamespace(value="LORA")))
    assert not _virtual_tokens_in_input(SimpleNamespace())  # no peft model at all


def test_bleu_is_bleu_4_and_no_answers_score_0():
    # answer "the cat sat on the mat", reference "the cat sat on a mat": p1 = 5/6 (the clipped
    # to 1), p2 = (3+1)/(5+1), p3 = (2+1)/(4+1), p4 = (1+1)/(3+1); BP = 1: BLEU = (1/6)^(1/4).
    # A fifth order would add (0+1)/(2+1).
    assert bleu_score(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(6 ** -0.25, rel=1e-6)
    assert SmoothedBLEU().n_gram == 4
    assert bleu_score(["Bangkok"], ["Bangkok"]) == pytest.approx(1.0)  # a one-token answer
    assert bleu_score([], []) == 0.0
    assert rouge_l([], []) == 0.0


def test_rouge_l_does_not_stem():
    # without a stemmer "cats" is not "cat": LCS("cats sat", "cat sat") = 1, P = R = F = 1/2
    assert rouge_l(["cats sat"], ["cat sat"]) == pytest.approx(0.5, rel=1e-6)


class _Echo(torch.nn.Module):
    """Answers every prompt with its last token, and records each generate call's batch rows and
    ``max_new_tokens``. A tokenizer over ids: id 0 pads, 1 ends; id k decodes to "wk"."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        self.calls.append((len(input_ids), max_new_tokens))
        return torch.cat([input_ids, input_ids[:, -1:], torch.ones_like(input_ids[:, -1:])], 1)

    def decode(self, row, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in row if int(i) > 1)


def test_score_generation_batches_prompts_passes_the_limit_and_keeps_its_inputs():
    model = _Echo()
    got = score_generation(model, model, [[2], [3], [4]], ["p2", "p3", "p4"], ["w2", "w3", "x"], max_new_tokens=5,
                           batch_size=2)
    assert model.calls == [(2, 5), (1, 5)]
    assert (got.predictions, got.references, got.prompts) == (["w2", "w3", "w4"], ["w2", "w3", "x"], ["p2", "p3", "p4"])
    assert got.exact_match == pytest.approx(2 / 3)
    model.calls.clear()
    score_generation(model, model, [[2]] * 17, ["p"] * 17, ["w2"] * 17, max_new_tokens=3)
    assert model.calls == [(16, 3), (1, 3)]  # 16 prompts a batch by default
