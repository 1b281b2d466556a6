"""Evaluate a finished run: ``python -m ftlab.eval RUN_DIR [--data FILE] [--base]``.

Rebuilds the run's base model from its ``config.yaml``, puts the trained method back on it
(``adapter/``, or ``model/`` for full fine-tuning, through ``Method.load``) and scores the
run's own validation split, or a test file in the run's data format, with the evaluation the
run itself ran at the end of training (:func:`ftlab.run._evaluate`: the same module, metrics and
greedy generation). On the run's own split the numbers therefore reproduce ``metrics.json``;
``--base`` scores the untrained base model instead, which reproduces the run's
before-training numbers (``*_initial``).

Metrics (all torchmetrics): loss, perplexity and next-token accuracy for language modelling;
exact match and answer F1 of greedy answers for data with reference answers; accuracy and
macro F1 for classification. A few generations are printed next to their references.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from ftlab.errors import UserError


# ------------------------------------------------------------------- reading a run directory
def read_run(run_dir: str | Path):
    """``(settings, resolved config)`` of a run directory, from its ``config.yaml``."""
    from omegaconf import OmegaConf

    from ftlab.cli import settings_from_config

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise UserError(f"{run_dir} is not an ftlab run directory (no config.yaml)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path} cannot be read: {' '.join(str(err).split())[:200]}") from None
    return settings_from_config(cfg, str(run_dir)), OmegaConf.to_container(cfg, resolve=True)


def trained_artifact(run_dir: Path, settings, best: bool = False) -> Path:
    """The directory ``Method.save`` wrote (``adapter/``, ``model/`` for full fine-tuning);
    ``best``: the model of the best validation instead (``best_adapter/`` unless that was the
    last one; see ``monitor`` in conf/train.yaml)."""
    if best:
        from ftlab.resume import read_metrics

        info = read_metrics(Path(run_dir)).get("best") or {}
        if not info.get("adapter"):
            raise UserError(f"{run_dir} recorded no best model (monitor.keep_best=false, no validation "
                            "during training, or the run did not finish); drop --best for the last one")
        return Path(run_dir) / info["adapter"]
    artifact = Path(run_dir) / ("model" if settings.method["name"] == "full" else "adapter")
    if not artifact.is_dir() or not any(artifact.iterdir()):
        raise UserError(
            f"{run_dir} holds no trained model ({artifact.name}/ is missing): the run did not finish. "
            f"Continue it with `python -m ftlab resume={run_dir}`, or score the untrained base with --base")
    return artifact


def run_method(settings):
    """The run's method, and a check that its base weights are on this machine. (Not the
    run's hardware: a run trained on GPUs can be evaluated or exported on a laptop.)"""
    from ftlab.methods import build_method
    from ftlab.models import check_available

    params = {k: v for k, v in settings.method.items() if k != "name"}
    method = build_method(settings.method["name"], **params)
    check_available(settings.model)
    return method


@dataclasses.dataclass
class LoadedRun:
    settings: Any
    method: Any
    model: Any
    tokenizer: Any
    labels: list[str] | None


def load_run(run_dir: str | Path, base: bool = False, best: bool = False) -> LoadedRun:
    """The run's model as it was at the end of training (``base``: the untrained base model;
    ``best``: at its best validation)."""
    from ftlab.data import DataModule
    from ftlab.methods.peft_methods import base_quantization
    from ftlab.models import load_model

    run_dir = Path(run_dir)
    settings, _ = read_run(run_dir)
    method = run_method(settings)
    artifact = None if base else trained_artifact(run_dir, settings, best)
    labels = None
    if settings.data.format == "classification":  # the head's classes, in the run's order
        own = DataModule(settings.data, tokenizer=None)
        own.check_files()
        labels = own.labels
    model_settings = dataclasses.replace(
        settings.model, quantization=base_quantization(method, settings.model.quantization))
    model, tokenizer = load_model(model_settings, seed=settings.seed, labels=labels)
    if artifact is not None:
        try:
            model = method.load(model, artifact)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"{artifact} cannot be loaded as a {settings.method['name']} model: "
                            f"{' '.join(str(err).split())[:300]}") from None
    model.eval()
    return LoadedRun(settings, method, model, tokenizer, labels)


# -------------------------------------------------------------------------------- evaluation
def evaluate_run(run_dir: str | Path, data_file: str | None = None, base: bool = False,
                 max_examples: int | None = None, samples: int | None = None,
                 best: bool = False) -> dict[str, Any]:
    """Score a run (see the module docstring); returns the metrics, printing as it goes."""
    import lightning as L
    import torch

    from ftlab.data import DataModule
    from ftlab.module import FinetuneModule
    from ftlab.run import _evaluate, say

    run_dir = Path(run_dir)
    settings, _ = read_run(run_dir)
    if not base:
        trained_artifact(run_dir, settings, best)  # before reading any data
    data_settings = settings.data
    if data_file is not None:
        if not Path(data_file).is_file():
            raise UserError(f"--data {data_file}: no such file")
        data_settings = dataclasses.replace(settings.data, path=str(data_file), val_path=str(data_file))
    data = DataModule(data_settings, tokenizer=None)
    data.check_files()  # a file in the wrong format stops here, before any weights load
    loaded = load_run(run_dir, base=base, best=best)
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
    say(f"ftlab.eval: {what} of {run_dir} on {where}")
    records = data.val_records[: s.eval.max_examples]
    metrics = _evaluate(trainer, module, data, s, records, loaded.tokenizer, "")
    say(_report(metrics, _reference(run_dir, base, best) if data_file is None else {}, base, best))
    return {"run_dir": str(run_dir), "model": "base" if base else "trained",
            "data": str(data_file) if data_file else "validation split", **metrics}


def _reference(run_dir: Path, base: bool, best: bool = False) -> dict[str, float]:
    """What the run recorded for the same model and data (before or after training, or at
    its best validation)."""
    from ftlab.resume import read_metrics

    recorded = read_metrics(run_dir)
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


# ------------------------------------------------------------------------------ command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and status 2, like the rest of ftlab
        from ftlab.cli import fail

        fail(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> None:
    from ftlab.cli import fail

    parser = _Parser(prog="python -m ftlab.eval",
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
    try:
        if args.base and args.best:
            fail("--base and --best exclude each other")
        result = evaluate_run(args.run_dir, data_file=args.data, base=args.base,
                              max_examples=args.max_examples, samples=args.samples, best=args.best)
    except UserError as err:
        fail(str(err))
    if args.json:
        from ftlab.run import write_json

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)


if __name__ == "__main__":
    main()
