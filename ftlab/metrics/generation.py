"""Generation-based evaluation: greedy answers to held-out prompts, scored against the reference
answers with torchmetrics, every score in [0, 1]:

- **exact match** and **answer F1**: torchmetrics' SQuAD metric (lower case, no punctuation, no
  articles); F1 of the bag of words of answer and reference, averaged over the examples.
- **BLEU**: corpus BLEU-4 (Papineni et al., ACL 2002) over all answers, on SacreBLEU's ``13a``
  tokens (punctuation split off, case kept; Post, arXiv 1804.08771),
  ``BLEU = BP * exp(mean_n log p_n)``, ``p_n`` the clipped n-gram precision summed over the
  corpus, ``BP = min(1, exp(1 - r/c))`` for ``c`` answer and ``r`` reference tokens. Short
  answers have no 4-grams (often no bigrams), which makes unsmoothed BLEU-4 0 for any answer
  set of one- to three-word answers however right; so ``p_n`` for n > 1 is add-one smoothed,
  ``(m_n + 1) / (c_n + 1)`` (Lin & Och, COLING 2004): an order with no n-grams counts as 1, one
  with n-grams but no match as ``1 / (c_n + 1)``. ``p_1`` is not smoothed, so answers sharing no
  token with their references score 0, and identical answers score 1. (torchmetrics'
  ``smooth=True`` applies the same formula but returns 0 first whenever any order has no match,
  which is the case smoothing is for: :class:`SmoothedBLEU` computes it from the same states.)
- **ROUGE-L**: F-measure of the longest common subsequence (Lin, ACL 2004 workshop) of answer
  and reference tokens (lower case, alphanumeric runs): ``P = LCS/|answer|``,
  ``R = LCS/|reference|``, ``F = 2PR/(P+R)``, averaged over the examples. torchmetrics'
  ``ROUGEScore`` needs nltk only for stemming and ROUGE-Lsum, neither used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.text import ROUGEScore, SacreBLEUScore


@dataclass
class GenerationResult:
    exact_match: float
    f1: float  # mean word-overlap F1 of answer and reference (SQuAD's), in [0, 1]
    bleu: float  # corpus BLEU-4, add-one smoothed for n > 1, in [0, 1]
    rouge_l: float  # mean ROUGE-L F-measure, in [0, 1]
    predictions: list[str]
    references: list[str]
    prompts: list[str]


@torch.no_grad()
def generate_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy continuations of each prompt, cut at the end-of-sequence token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompt_ids)
    pad = tokenizer.pad_token_id
    for indices in _batches(prompt_ids, batch_size, same_length=_virtual_tokens_in_input(model)):
        chunk = [prompt_ids[i] for i in indices]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(indices, out[:, width:]):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def _virtual_tokens_in_input(model) -> bool:
    """Whether the model prepends trained virtual tokens to the input (peft's prompt tuning and
    p-tuning). peft drops the position ids of such models, so left padding would shift every
    real token away from the virtual ones, unlike in training; prefix tuning keeps them."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning
                and str(getattr(config.peft_type, "value", config.peft_type)) != "PREFIX_TUNING")


def _batches(prompt_ids: list[list[int]], batch_size: int, same_length: bool) -> list[list[int]]:
    """Indices of the prompts, in batches of at most ``batch_size``; with ``same_length`` only
    prompts of one length share a batch, so none is padded."""
    if not same_length:
        return [list(range(i, min(i + batch_size, len(prompt_ids)))) for i in range(0, len(prompt_ids), batch_size)]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_length.setdefault(len(p), []).append(i)
    return [group[j:j + batch_size] for group in by_length.values() for j in range(0, len(group), batch_size)]


class SmoothedBLEU(SacreBLEUScore):
    """Corpus BLEU with add-one smoothing of the n > 1 precisions (module docstring), over
    torchmetrics' SacreBLEU n-gram counts (``13a`` tokens).

    Every process of a distributed run scores all the answers, so the counts are not summed
    across processes (``sync_on_compute=False``): add-one smoothing of counts multiplied by the
    number of processes would make the score depend on it."""

    def __init__(self, n_gram: int = 4) -> None:
        super().__init__(n_gram=n_gram, smooth=True, tokenize="13a", lowercase=False,
                         sync_on_compute=False)

    def compute(self) -> torch.Tensor:
        matches, counts = self.numerator, self.denominator
        if self.preds_len == 0 or matches[0] == 0:
            return torch.tensor(0.0)
        precision = torch.cat([matches[:1] / counts[:1], (matches[1:] + 1) / (counts[1:] + 1)])
        brevity = torch.clamp(torch.exp(1 - self.target_len / self.preds_len), max=1.0)
        return brevity * torch.exp(torch.log(precision).mean())


def bleu_score(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 of the answers against one reference each (:class:`SmoothedBLEU`)."""
    bleu = SmoothedBLEU()
    bleu.update(predictions, [[r] for r in references])
    return float(bleu.compute())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure of the answers against one reference each."""
    if not predictions:
        return 0.0
    rouge = ROUGEScore(rouge_keys="rougeL", use_stemmer=False)  # no stemmer: no nltk needed
    rouge.update(predictions, references)
    return float(rouge.compute()["rougeL_fmeasure"])


def score_generation(model, tokenizer, prompt_ids, prompts, references, max_new_tokens,
                     batch_size=16) -> GenerationResult:
    from torchmetrics.text import SQuAD

    predictions = generate_answers(model, tokenizer, prompt_ids, max_new_tokens, batch_size)
    squad = SQuAD()
    squad.update([{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)],
                 [{"answers": {"answer_start": [0], "text": [r]}, "id": str(i)} for i, r in enumerate(references)])
    scores = squad.compute()  # percentages
    return GenerationResult(float(scores["exact_match"]) / 100, float(scores["f1"]) / 100,
                            bleu_score(predictions, references), rouge_l(predictions, references),
                            predictions, references, prompts)
