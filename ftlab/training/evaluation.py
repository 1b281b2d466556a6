"""Held-out evaluation of a model being trained or a finished run: the validation loop's
scores (loss, perplexity, token accuracy, or accuracy and macro F1 for classification) and,
for data with reference answers, greedy generation scored by :mod:`ftlab.metrics.generation`.

A run evaluates with it before and after training; ``python -m ftlab.eval`` with the same
function, so on a run's own split the command reproduces the run's ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

from ftlab.config import RunSettings
from ftlab.console import say
from ftlab.metrics.generation import score_generation

# Validation scores the module logs: loss, then perplexity and next-token accuracy (language
# modelling) or accuracy and macro F1 (classification).
VAL_SCORES = ("val_loss", "val_perplexity", "val_token_accuracy", "val_accuracy", "val_f1")
PERCENT_SCORES = ("val_token_accuracy", "val_accuracy", "val_f1")


def evaluate_held_out(trainer, module, data, s: RunSettings, records, tokenizer, suffix: str) -> dict[str, Any]:
    """Validate ``module`` on ``data``'s held-out split and generate answers for ``records``;
    returns the scores with ``suffix`` appended to each key (``_initial`` before training)."""
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    out = {f"{k}{suffix}": float(metrics[k.replace("_", "/", 1)]) for k in VAL_SCORES
           if k.replace("_", "/", 1) in metrics}
    shown = ", ".join(f"{k.split('_', 1)[1]} " + (f"{out[k + suffix]:.1%}" if k in PERCENT_SCORES
                                                  else f"{out[k + suffix]:.4g}")
                      for k in VAL_SCORES if k + suffix in out)
    # Every process generates (the same answers): the scores are torchmetrics metrics, which
    # synchronise across the processes of a distributed run when computed.
    if s.eval.generate and data.generative and records:
        gen = score_generation(module.model, tokenizer, data.prompts(records), data.shown(records),
                               data.references(records), s.eval.max_new_tokens, s.data.eval_batch_size)
        out[f"val_exact_match{suffix}"] = gen.exact_match
        out[f"val_answer_f1{suffix}"] = gen.f1
        out[f"val_bleu{suffix}"] = gen.bleu
        out[f"val_rouge_l{suffix}"] = gen.rouge_l
        shown_samples = list(zip(gen.prompts, gen.predictions, gen.references))[: s.eval.show_samples]
        out[f"samples{suffix}"] = [{"prompt": p, "prediction": y, "reference": r} for p, y, r in shown_samples]
        say(f"Held-out ({len(data.val_set)} examples): {shown}, exact match {gen.exact_match:.1%}, "
            f"answer F1 {gen.f1:.1%}, BLEU {gen.bleu:.1%}, ROUGE-L {gen.rouge_l:.1%} "
            f"on {len(records)} greedy answers")
        for sample in out[f"samples{suffix}"]:
            say(f"  {sample['prompt'][:60]!r:64} -> {sample['prediction'][:40]!r} (ref {sample['reference']!r})")
    else:
        say(f"Held-out ({len(data.val_set)} examples): {shown}")
    return out
