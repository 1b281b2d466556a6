"""Held-out evaluation of a model being trained or a finished run: the validation loop's
scores (loss, perplexity, token accuracy, or accuracy and macro F1 for classification) and,
for data with reference answers, greedy generation scored by :mod:`ftlab.metrics.generation`.

A run evaluates with it before and after training; ``python -m ftlab.eval`` with the same
function, so on a run's own split the command reproduces the run's ``metrics.json``. With a
held-out test split (``data.test_path``/``data.test_fraction``) the run scores it once, after
training, with the model it keeps (the best validation's when ``monitor.keep_best`` found one):
the same scores under ``test_*`` keys. Nothing selects on them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from ftlab.config import RunSettings
from ftlab.console import say
from ftlab.metrics.generation import score_generation

# Validation scores the module logs: loss, then perplexity and next-token accuracy (language
# modelling) or accuracy and macro F1 (classification).
VAL_SCORES = ("val_loss", "val_perplexity", "val_token_accuracy", "val_accuracy", "val_f1")
PERCENT_SCORES = ("val_token_accuracy", "val_accuracy", "val_f1")


def evaluate_held_out(trainer, module, data, s: RunSettings, records, tokenizer, suffix: str,
                      split: str = "val") -> dict[str, Any]:
    """Validate ``module`` on ``data``'s validation split (``split="test"``: its test split) and
    generate answers for ``records``; returns the scores as ``<split>_<score><suffix>``
    (``suffix``: ``_initial`` before training)."""
    if split == "test":
        with _aside(trainer, module):
            metrics = trainer.validate(module, dataloaders=data.test_dataloader(), verbose=False)[0]
        n, where = len(data.test_set), "Test split"
    else:
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
        n, where = len(data.val_set), "Held-out"
    names = {k: f"{split}_{k.split('_', 1)[1]}{suffix}" for k in VAL_SCORES}
    out = {names[k]: float(metrics[k.replace("_", "/", 1)]) for k in VAL_SCORES
           if k.replace("_", "/", 1) in metrics}
    shown = ", ".join(f"{k.split('_', 1)[1]} " + (f"{out[names[k]]:.1%}" if k in PERCENT_SCORES
                                                  else f"{out[names[k]]:.4g}")
                      for k in VAL_SCORES if names[k] in out)
    # Every process generates (the same answers): the scores are torchmetrics metrics, which
    # synchronise across the processes of a distributed run when computed.
    if s.eval.generate and data.generative and records:
        gen = score_generation(module.model, tokenizer, data.prompts(records), data.shown(records),
                               data.references(records), s.eval.max_new_tokens, s.data.eval_batch_size)
        out[f"{split}_exact_match{suffix}"] = gen.exact_match
        out[f"{split}_answer_f1{suffix}"] = gen.f1
        out[f"{split}_bleu{suffix}"] = gen.bleu
        out[f"{split}_rouge_l{suffix}"] = gen.rouge_l
        shown_samples = list(zip(gen.prompts, gen.predictions, gen.references))[: s.eval.show_samples]
        samples = f"{'test_' if split == 'test' else ''}samples{suffix}"
        out[samples] = [{"prompt": p, "prediction": y, "reference": r} for p, y, r in shown_samples]
        say(f"{where} ({n} examples): {shown}, exact match {gen.exact_match:.1%}, "
            f"answer F1 {gen.f1:.1%}, BLEU {gen.bleu:.1%}, ROUGE-L {gen.rouge_l:.1%} "
            f"on {len(records)} greedy answers")
        for sample in out[samples]:
            say(f"  {sample['prompt'][:60]!r:64} -> {sample['prediction'][:40]!r} (ref {sample['reference']!r})")
    else:
        say(f"{where} ({n} examples): {shown}")
    return out


@contextmanager
def _aside(trainer, module):
    """Score the test split without a trace in what validation records: nothing logged to
    the run's loggers as ``val/...``, nothing added to the validation curve."""
    loggers, history = trainer.loggers, list(module.val_history)
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers
        module.val_history[:] = history


def evaluate_test(trainer, module, data, s: RunSettings, tokenizer, best: dict | None) -> dict[str, Any]:
    """The test split's scores (``test_*``) of the model the run keeps: the best validation's
    when :func:`ftlab.run._keep_best` loaded it (``best``: what it returned), else the last."""
    step = best.get("step") if best else None
    last = best.get("last_step") if best else None
    loaded = bool(best) and str(best.get("adapter") or "").startswith("best_")
    which = "best" if loaded or (step is not None and step == last) else "last"
    records = data.test_records[: s.eval.max_examples]
    say(f"Scoring the held-out test split ({len(data.test_set)} examples) with the "
        f"{'best-validation' if which == 'best' else 'last'} model"
        + (f" (step {step})" if which == "best" else "") + " ...")
    out = evaluate_held_out(trainer, module, data, s, records, tokenizer, "", split="test")
    return {**out, "test_examples": len(data.test_set), "test_model": which,
            **({"test_step": step} if which == "best" else {})}


# The rows of the results table at the end of a run: key suffix and format.
_ROWS = (("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("token_accuracy", "{:.1%}"),
         ("exact_match", "{:.1%}"), ("answer_f1", "{:.1%}"), ("bleu", "{:.1%}"), ("rouge_l", "{:.1%}"),
         ("accuracy", "{:.1%}"), ("f1", "{:.1%}"))


def results_table(r: dict[str, Any]) -> str:
    """The table printed at the end of a run: validation before and after training and, with a
    test split, the test scores of the model kept (the headline numbers)."""
    test = "test_loss" in r
    lines = ["", "Result on the held-out split" + (f"s (test: {r['test_examples']} examples, "
                                                   f"{r['test_model']} model):" if test else ":"),
             (f"  {'':18} {'val before':>10} {'val after':>10} {'test':>10}" if test
              else f"  {'':18} {'before':>10} {'after':>10}")]
    if r.get("validation") == "off":
        lines[1:] = ["Validation: off (trainer.limit_val_batches=0), so no held-out scores."]
    for name, fmt in _ROWS:
        key = f"val_{name}"
        if key in r:
            before, after = r.get(f"{key}_initial"), r[key]
            label = name if test else key  # with a test column the rows name the score alone
            lines.append(f"  {label:18} {fmt.format(before) if before is not None else '-':>10} "
                         f"{fmt.format(after):>10}"
                         + (f" {fmt.format(r[f'test_{name}']) if f'test_{name}' in r else '-':>10}"
                            if test else ""))
    lines.append(f"  trainable {r['trainable_params']:,} / {r['total_params']:,} parameters, "
                 f"{r['tokens_per_second']:.0f} tokens/s, step {r['step_time_s']:.2f} s, "
                 f"peak memory {r['peak_memory_mb']:.0f} MB, wall time {r['wall_time_s']:.0f} s")
    return "\n".join(lines)
