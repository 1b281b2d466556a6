"""Evaluate a finished run: ``python -m ftlab.eval RUN_DIR [--data FILE] [--base]``.

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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_examples is not None and args.max_examples < 1:
        fail("--max-examples must be a positive integer")
    if args.base and args.best:
        fail("--base and --best exclude each other")
    try:
        result = evaluate_run(args.run_dir, data_file=args.data, base=args.base,
                              max_examples=args.max_examples, samples=args.samples, best=args.best)
    except UserError as err:
        fail(str(err))
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
