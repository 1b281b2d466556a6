"""BLEU and ROUGE-L of greedy answers (ftlab/metrics/generation.py) against values worked out by hand,
and in a run's metrics.json, printed line and final table, on a task the tiny model learns."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from torch import nn

from ftlab.metrics.generation import bleu_score, rouge_l, score_generation


# ------------------------------------------------------------------------------------ BLEU
def test_bleu_of_identical_and_disjoint_answers():
    assert bleu_score(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu_score(["a b c d e"], ["v w x y z"]) == 0.0
    assert bleu_score([""], ["Bangkok"]) == 0.0  # no answer at all


def test_bleu_of_a_partial_overlap():
    # answer  "the cat sat on the mat", reference "the cat is on the mat" (6 tokens each):
    # unigrams 5/6 (the x2, cat, on, mat); bigrams 3 of 5 (the cat, on the, the mat) -> (3+1)/(5+1);
    # trigrams 1 of 4 (on the mat) -> 2/5; 4-grams 0 of 3 -> 1/4; equal lengths: BP = 1.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    got = bleu_score(["the cat sat on the mat"], ["the cat is on the mat"])
    assert got == pytest.approx(expected, rel=1e-6)


def test_bleu_of_short_answers_is_smoothed_not_zero():
    # One- and two-word answers have no 4-grams: unsmoothed BLEU-4 would be 0 for right answers.
    assert bleu_score(["Bangkok", "foxes"], ["Bangkok", "foxes"]) == pytest.approx(1.0)
    # "blue whale" for "the blue whale": every precision is 1, brevity penalty exp(1 - 3/2).
    got = bleu_score(["blue whale"], ["the blue whale"])
    assert got == pytest.approx(math.exp(1 - 3 / 2), rel=1e-6)
    # 13a tokens split the full stop off: p1 = 1/2 (Paris, .), p2 = (0+1)/(1+1), c > r so BP = 1.
    assert bleu_score(["Paris."], ["Paris"]) == pytest.approx((1 / 2 * 1 / 2) ** 0.25, rel=1e-6)
    assert bleu_score(["paris"], ["Paris"]) == 0.0  # BLEU keeps case


def test_bleu_pools_the_counts_of_the_whole_answer_set():
    # Corpus BLEU: n-gram counts summed over both pairs before the precisions are taken.
    # unigrams 6/7 (5 + 1 matches of 6 + 1, not smoothed); bigrams (3+1)/(5+1), trigrams
    # (1+1)/(4+1) and 4-grams (0+1)/(3+1) from the first pair alone; c = r = 7, BP = 1.
    expected = (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    got = bleu_score(["the cat sat on the mat", "Bangkok"], ["the cat is on the mat", "Bangkok"])
    assert got == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_of_identical_disjoint_and_partial_answers():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["a b c"], ["x y z"]) == 0.0
    # LCS("the cat sat on mat", "the cat is on the mat") = "the cat on mat", 4 tokens:
    # P = 4/5, R = 4/6, F = 2PR / (P + R) = 8/11.
    got = rouge_l(["the cat sat on mat"], ["the cat is on the mat"])
    assert got == pytest.approx(8 / 11, rel=1e-6)
    # Order matters (unlike word-overlap F1): the same five words reordered share an LCS of 3.
    assert rouge_l(["mat the on cat the"], ["the cat on the mat"]) == pytest.approx(3 / 5, rel=1e-6)
    # Tokens are lower-cased alphanumeric runs: case and punctuation do not count.
    assert rouge_l(["The Cat!"], ["the cat"]) == pytest.approx(1.0)


def test_rouge_l_is_the_mean_over_answers():
    got = rouge_l(["the cat sat on mat", "Bangkok", "yes"],
                  ["the cat is on the mat", "Bangkok", "no"])
    assert got == pytest.approx((8 / 11 + 1 + 0) / 3, rel=1e-6)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            same = table[i][j] + 1 if x == y else 0
            table[i + 1][j + 1] = max(same, table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_matches_the_lcs_formula_on_random_answers():
    rng = random.Random(0)
    words = ["a1", "b2", "c3", "d4", "e5"]
    for _ in range(20):
        pred = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        ref = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        lcs = _lcs(pred, ref)
        p, r = lcs / len(pred), lcs / len(ref)
        expected = 2 * p * r / (p + r) if lcs else 0.0
        assert rouge_l([" ".join(pred)], [" ".join(ref)]) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------- score_generation
class _Words:
    """A tokenizer over a fixed word list (id 0 pads, id 1 ends a sequence)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, words: list[str]):
        self.words = ["<pad>", "</s>", *words]

    def ids(self, text: str) -> list[int]:
        return [self.words.index(w) for w in text.split()]

    def decode(self, row, skip_special_tokens=True) -> str:
        return " ".join(self.words[i] for i in row.tolist() if i > 1)


class _Scripted(nn.Module):
    """A "model" whose greedy answer to the prompt [k] is the k-th scripted answer."""

    def __init__(self, answers: list[list[int]]):
        super().__init__()
        self.answers = answers
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        width = max(len(a) for a in self.answers) + 1
        out = torch.zeros(len(input_ids), input_ids.shape[1] + width, dtype=torch.long)
        out[:, : input_ids.shape[1]] = input_ids
        for row, prompt in enumerate(input_ids):
            answer = self.answers[int(prompt[-1])] + [1]
            out[row, input_ids.shape[1]: input_ids.shape[1] + len(answer)] = torch.tensor(answer)
        return out


def test_score_generation_reports_all_four_scores_of_the_greedy_answers():
    predictions = ["the cat sat on the mat", "Bangkok"]
    references = ["the cat is on the mat", "Bangkok"]
    tok = _Words(sorted({w for t in predictions + references for w in t.split()}))
    model = _Scripted([tok.ids(p) for p in predictions])
    got = score_generation(model, tok, [[0], [1]], ["q0", "q1"], references, max_new_tokens=8)
    assert got.predictions == predictions
    assert got.exact_match == pytest.approx(1 / 2)
    # SQuAD F1 drops articles: {cat, sat, on, mat} vs {cat, is, on, mat} -> 3/4; then 1.
    assert got.f1 == pytest.approx((3 / 4 + 1) / 2)
    assert got.bleu == pytest.approx((6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, rel=1e-6)
    assert got.rouge_l == pytest.approx((5 / 6 + 1) / 2, rel=1e-6)  # LCS "the cat on the mat"


# ------------------------------------------------------------- a run on a task it learns
# Four instructions, each with its own answer. 60 steps of full fine-tuning teach the tiny Llama
# all four (validation loss about 0.05; 45 steps already suffice). The greedy answers are cut at
# eval.max_new_tokens=12 tokens, 12 bytes with the byte-level tokenizer: two come out whole and
# two cut short, so every score lies strictly between 0 and 1, and is worked out by hand below.
TASK = [("Name two colours.", "red and blue"), ("Name a city.", "paris"),
        ("Greet me.", "hello there friend"), ("Name an animal.", "the quick fox")]
CUT = ["red and blue", "paris", "hello there", "the quick fo"]  # the first 12 bytes, stripped
# Exact match (SQuAD: articles dropped): 2 of 4.
EXACT = 2 / 4
# Answer F1 (bags of words, articles dropped): 1, 1; {hello there} vs {hello there friend}:
# P = 1, R = 2/3, F = 0.8; {quick fo} vs {quick fox}: 1 of 2 each way, F = 0.5.
F1 = (1 + 1 + 0.8 + 0.5) / 4
# ROUGE-L: 1, 1; LCS(hello there, hello there friend) = 2: P = 1, R = 2/3, F = 0.8;
# LCS(the quick fo, the quick fox) = 2: P = R = 2/3, F = 2/3.
ROUGE_L = (1 + 1 + 0.8 + 2 / 3) / 4
# Corpus BLEU: unigrams 8 matched of 9 (3 + 1 + 2 + 2); bigrams 4 of 5 -> (4+1)/(5+1); trigrams
# 1 of 2 -> (1+1)/(2+1); no 4-grams -> 1; answers c = 9 tokens, references r = 10: BP = exp(1 - 10/9).
BLEU = math.exp(1 - 10 / 9) * (8 / 9 * 5 / 6 * 2 / 3 * 1) ** 0.25


@pytest.fixture
def one_thread():
    from tiny_runs import one_thread as body

    yield from body()


def test_a_run_that_learns_its_task_records_and_prints_its_scores(tmp_path, capsys, one_thread):
    from tiny_runs import train_run

    rows = [{"instruction": q, "output": a} for q, a in TASK]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 16))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # cache_before=false: both evaluations run and print here (tests/test_eval_cache.py covers reuse)
    metrics = train_run(tmp_path / "run", f"data.path={tmp_path / 'train.jsonl'}",
                        f"data.val_path={tmp_path / 'val.jsonl'}", "method=full", "optimizer.lr=3e-3",
                        "scheduler.name=constant", "trainer.max_steps=60", "trainer.val_check_interval=60",
                        "eval.before=true", "eval.cache_before=false", "eval.max_examples=4",
                        "eval.max_new_tokens=12", "eval.show_samples=4", "seed=0")
    out = capsys.readouterr().out
    samples = metrics["samples"]
    assert [s["reference"] for s in samples] == [a for _, a in TASK]
    assert [s["prediction"] for s in samples] == CUT  # learned, then cut at 12 tokens
    assert metrics["val_exact_match"] == pytest.approx(EXACT)
    assert metrics["val_answer_f1"] == pytest.approx(F1, rel=1e-6)
    assert metrics["val_rouge_l"] == pytest.approx(ROUGE_L, rel=1e-6)
    assert metrics["val_bleu"] == pytest.approx(BLEU, rel=1e-6)
    # Printed: one line per evaluation, and the before/after table with the recorded values.
    held_out = [line for line in out.splitlines() if line.startswith("Held-out")]
    assert len(held_out) == 2 and all("BLEU" in line and "ROUGE-L" in line for line in held_out)
    table = out[out.index("Result on the held-out split:"):]
    for key, value in (("val_bleu", BLEU), ("val_rouge_l", ROUGE_L)):
        row = re.search(rf"^\s+{key}\s+(\S+)\s+(\S+)$", table, re.M)
        assert row, table
        assert (row.group(1), row.group(2)) == (f"{metrics[key + '_initial']:.1%}", f"{value:.1%}")
