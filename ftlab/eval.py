"""Evaluate a finished run: ``python -m ftlab.eval RUN_DIR [--data FILE] [--base] [--lm-eval TASKS]``.

Rebuilds the run's base model from its ``config.yaml``, puts the trained method back on it
(``Method.load`` on what it saved) and scores the run's own validation split, or a test file
in the run's data format, with the evaluation the run itself ran at the end of training
(:func:`ftlab.training.evaluation.evaluate_held_out`: the same module, metrics and greedy
generation). On the run's own split the numbers therefore reproduce ``metrics.json``;
``--base`` scores the untrained base model instead, which reproduces the run's
before-training numbers (``*_initial``).

Metrics (all torchmetrics): loss, perplexity and next-token accuracy for language modelling;
exact match and answer F1 of greedy answers for data with reference answers; accuracy and
macro F1 for classification. A few generations are printed next to their references.

``--lm-eval hellaswag,arc_easy`` scores the same reloaded model on standard benchmarks with
lm-evaluation-harness instead (the optional extra ``ftlab[lmeval]``; :mod:`ftlab.metrics.lm_harness`)
and writes ``lm_eval.json`` into the run directory, beside ``metrics.json``, where
``ftlab.report`` finds it (``lm_eval_base.json`` with ``--base``, ``lm_eval_best.json`` with
``--best``). docs/evaluation.md has the task names and options.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from ftlab.console import CommandParser, fail, quiet_third_party, say
from ftlab.errors import UserError
from ftlab.io import write_json
from ftlab.rundir import RunDir, load_run


def evaluate_run(run_dir: str | Path, data_file: str | None = None, base: bool = False,
                 max_examples: int | None = None, samples: int | None = None,
                 best: bool = False) -> dict[str, Any]:
    """Score a run (see the module docstring); returns the metrics, printing as it goes."""
    import lightning as L
    import torch

    from ftlab.data import DataModule
    from ftlab.training.evaluation import evaluate_held_out
    from ftlab.training.module import FinetuneModule

    run = RunDir.open(run_dir)
    settings = run.settings
    if not base:
        run.artifact(best)  # before reading any data
    data_settings = settings.data
    if data_file is not None:
        if not Path(data_file).is_file():
            raise UserError(f"--data {data_file}: no such file")
        data_settings = dataclasses.replace(settings.data, path=str(data_file), val_path=str(data_file))
    data = DataModule(data_settings, tokenizer=None)
    data.check_files()  # a file in the wrong format stops here, before any weights load
    loaded = load_run(run.path, base=base, best=best)
    if data_file is not None and loaded.labels:
        data_settings = dataclasses.replace(data_settings, labels=loaded.labels)
        data = DataModule(data_settings, tokenizer=None)
        data.check_files()
    data.tokenizer = loaded.tokenizer
    data.setup("validate")

    s = settings
    eval_settings = dataclasses.replace(
        s.eval, max_examples=max_examples or s.eval.max_examples,
        show_samples=s.eval.show_samples if samples is None else samples)
    s = dataclasses.replace(s, eval=eval_settings)
    module = FinetuneModule(loaded.model, loaded.method, s.optimizer, s.scheduler, total_steps=1,
                            num_classes=len(loaded.labels) if loaded.labels else None,
                            loss_chunk_size=s.loss.chunk_size)
    accelerator, precision = s.hardware.accelerator, s.hardware.precision
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        say(f"ftlab.eval: the run trained on {accelerator}, which this machine lacks: evaluating on "
            "the CPU in float32 (numbers may differ from the run's in the last digits)")
        accelerator, precision = "cpu", "32-true"
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False,
                        limit_val_batches=s.trainer.get("limit_val_batches", 1.0),
                        default_root_dir=tempfile.gettempdir())  # nothing is written to the run
    what = ("the untrained base model" if base else
            f"the {'best' if best else 'trained'} {s.method['name']} model")
    where = data_file or f"the run's validation split of {s.data.name!r}"
    say(f"ftlab.eval: {what} of {run.path} on {where}")
    records = data.val_records[: s.eval.max_examples]
    metrics = evaluate_held_out(trainer, module, data, s, records, loaded.tokenizer, "")
    say(_report(metrics, _reference(run, base, best) if data_file is None else {}, base, best))
    return {"run_dir": str(run.path), "model": "base" if base else "trained",
            "data": str(data_file) if data_file else "validation split", **metrics}


def lm_eval_run(run_dir: str | Path, harness, base: bool = False, best: bool = False,
                json_file: str | None = None) -> dict[str, Any]:
    """Score a run's model with lm-evaluation-harness (``harness``: a
    :class:`ftlab.metrics.lm_harness.Harness`) and record it in the run directory. Everything
    that can be checked without the weights (lm-eval installed, the run, the task names and
    their data) is checked before the model loads."""
    from ftlab.metrics import lm_harness
    from ftlab.models import check_available

    lm_harness.require_lm_eval()
    run = RunDir.open(run_dir)
    settings = run.settings
    artifact = None if base else run.artifact(best)
    if settings.model.task != "causal_lm":
        raise UserError(f"{run.path} trained a classification head ({settings.model.task}); lm-eval "
                        "scores language models (their next-token log-likelihoods and generations)")
    check_available(settings.model)
    harness.prepare()
    loaded = load_run(run.path, base=base, best=best)
    device = _device(settings.hardware.accelerator)
    model = loaded.model.to(device) if device != "cpu" else loaded.model
    what = ("the untrained base model" if base else
            f"the {'best' if best else 'trained'} {settings.method['name']} model")
    say(f"ftlab.eval: lm-eval {lm_harness.lm_eval_version()} on {', '.join(harness.tasks)}: {what} "
        f"of {run.path} ({device})")
    results = harness.run(model, loaded.tokenizer)
    entries = harness.entries(results)
    suffix = "_base" if base else "_best" if best else ""
    about = {"run_dir": str(run.path), "model": "base" if base else "best" if best else "trained",
             "method": settings.method["name"], "artifact": str(artifact.relative_to(run.path)) if artifact else None}
    path = lm_harness.write_results(run.path, entries, about, file=f"lm_eval{suffix}.json")
    say(lm_harness.summary(entries))
    say(f"\nwrote {path}")
    if harness.log_samples:
        say(f"wrote {lm_harness.write_samples(run.path, results, f'lm_eval_samples{suffix}')}/")
    out = {**about, "tasks": entries}
    if json_file:
        write_json(Path(json_file), out)
    return out


def _device(accelerator: str) -> str:
    """Where lm-eval runs: on CUDA where the run trained on GPUs and this machine has one."""
    import torch

    if str(accelerator).lower() in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    if str(accelerator).lower() in ("gpu", "cuda"):
        say(f"ftlab.eval: the run trained on {accelerator}, which this machine lacks: lm-eval runs on the CPU")
    return "cpu"


def _reference(run: RunDir, base: bool, best: bool = False) -> dict[str, float]:
    """What the run recorded for the same model and data (before or after training, or at
    its best validation)."""
    recorded = run.metrics
    if best:
        step = (recorded.get("best") or {}).get("step")
        point = next((h for h in recorded.get("val_history", []) if h.get("step") == step), {})
        return {k: v for k, v in point.items() if k.startswith("val_")}
    suffix = "_initial" if base else ""
    if not base and recorded.get("status") != "completed":
        return {}
    return {k[: len(k) - len(suffix)] if suffix else k: v for k, v in recorded.items()
            if k.startswith("val_") and isinstance(v, (int, float))
            and (k.endswith(suffix) if suffix else not k.endswith("_initial"))}


def _report(metrics: dict[str, Any], reference: dict[str, float], base: bool, best: bool = False) -> str:
    column = "run (before training)" if base else "run (best validation)" if best else "run (end of training)"
    lines = ["", f"  {'metric':20} {'value':>10}" + (f"  {column:>22}" if reference else "")]
    for key, value in metrics.items():
        if not key.startswith("val_") or not isinstance(value, (int, float)):
            continue
        fmt = "{:.4f}" if key in ("val_loss",) else "{:.2f}" if key == "val_perplexity" else "{:.1%}"
        ref = reference.get(key)
        lines.append(f"  {key:20} {fmt.format(value):>10}"
                     + (f"  {fmt.format(ref):>22}" if ref is not None else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    parser = CommandParser(prog="python -m ftlab.eval",
                           description="Score a finished ftlab run (or its untrained base) on held-out data.")
    parser.add_argument("run_dir", help="the run directory (holds config.yaml and adapter/ or model/)")
    parser.add_argument("--data", metavar="FILE",
                        help="a test file in the run's data format (default: the run's validation split)")
    parser.add_argument("--base", action="store_true",
                        help="score the untrained base model instead (the run's before-training numbers)")
    parser.add_argument("--best", action="store_true",
                        help="score the model of the run's best validation (best_adapter/) instead of the last")
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help="greedy answers to generate and score (default: the run's eval.max_examples)")
    parser.add_argument("--samples", type=int, metavar="K",
                        help="generations to print (default: eval.show_samples)")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics to FILE")
    lm = parser.add_argument_group("standard benchmarks (lm-evaluation-harness; pip install 'ftlab[lmeval]')")
    lm.add_argument("--lm-eval", metavar="TASK[,TASK]",
                    help="score the model on these lm-eval tasks (hellaswag, arc_easy, gsm8k, ...) instead, "
                         "and write lm_eval.json into the run directory")
    lm.add_argument("--lm-eval-tasks-dir", metavar="DIR", help="a directory of your own lm-eval task YAML files")
    lm.add_argument("--lm-eval-limit", type=int, metavar="N", help="score only the first N documents of each task")
    lm.add_argument("--lm-eval-fewshot", type=int, metavar="K",
                    help="few-shot examples per prompt (default: each task's own, else 0)")
    lm.add_argument("--lm-eval-batch-size", default="8", metavar="B", help="batch size, or 'auto' (default 8)")
    lm.add_argument("--lm-eval-samples", action="store_true",
                    help="also write lm-eval's per-document log to lm_eval_samples/TASK.jsonl")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_examples is not None and args.max_examples < 1:
        fail("--max-examples must be a positive integer")
    if args.base and args.best:
        fail("--base and --best exclude each other")
    if args.lm_eval is not None:
        _lm_eval_main(args)
        return
    if given := [f"--{k.replace('_', '-')}" for k in ("lm_eval_tasks_dir", "lm_eval_limit", "lm_eval_fewshot")
                 if getattr(args, k) is not None] + (["--lm-eval-samples"] if args.lm_eval_samples else []):
        fail(f"{', '.join(given)} without --lm-eval TASK[,TASK]")
    try:
        result = evaluate_run(args.run_dir, data_file=args.data, base=args.base,
                              max_examples=args.max_examples, samples=args.samples, best=args.best)
    except UserError as err:
        fail(str(err))
    if args.json:
        write_json(Path(args.json), result)


def _lm_eval_main(args) -> None:
    from ftlab.metrics.lm_harness import Harness, parse_tasks

    if ignored := [flag for flag, value in (("--data", args.data), ("--max-examples", args.max_examples),
                                            ("--samples", args.samples)) if value is not None]:
        fail(f"{', '.join(ignored)}: ftlab's own evaluation, not lm-eval's; use --lm-eval-tasks-dir, "
             "--lm-eval-limit, --lm-eval-samples")
    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        fail("--lm-eval-limit must be a positive integer")
    if args.lm_eval_fewshot is not None and args.lm_eval_fewshot < 0:
        fail("--lm-eval-fewshot must be a non-negative integer")
    batch = args.lm_eval_batch_size
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        fail(f"--lm-eval-batch-size {batch}: a positive integer or 'auto'")
    try:
        harness = Harness(parse_tasks(args.lm_eval), tasks_dir=Path(args.lm_eval_tasks_dir)
                          if args.lm_eval_tasks_dir else None, limit=args.lm_eval_limit,
                          num_fewshot=args.lm_eval_fewshot, batch_size=batch if batch == "auto" else int(batch),
                          log_samples=args.lm_eval_samples)
        lm_eval_run(args.run_dir, harness, base=args.base, best=args.best, json_file=args.json)
    except UserError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
