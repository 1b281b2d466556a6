"""One run, end to end, from typed settings (no Hydra here).

    validate -> method.check on the meta model -> data records -> weights -> method.apply
    -> datamodule -> FinetuneModule -> Trainer -> evaluate, fit, evaluate -> save

Everything that can be wrong with the user's input is checked before any weight is read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ftlab.config import RunSettings, check_warmup
from ftlab.console import say
from ftlab.data import DataModule
from ftlab.errors import ConfigError
from ftlab.io import atomic_directory, remove_orphans, write_json
from ftlab.methods import count_parameters, method_from_spec
from ftlab.methods.quantized import base_quantization, check_quantized_base
from ftlab.metrics.memory import peak_memory_mb, process_age_s, reset_peak_memory
from ftlab.models import check_available, meta_model
from ftlab.models.reuse import load_base
from ftlab.planning.budget import fit_budget
from ftlab.planning.counts import parameter_summary
from ftlab.training.checkpoints import AtomicCheckpointIO, RunState, checkpoint_identity
from ftlab.training import eval_cache
from ftlab.training.evaluation import VAL_SCORES, evaluate_held_out, evaluate_test, results_table
from ftlab.training.preemption import slurm_plugins
from ftlab.training.faults import GracefulStop, NonFiniteLossGuard, supervise, write_failures
from ftlab.training.hardware import (build_strategy, check_hardware, enable_gradient_checkpointing,
                                     full_parameters, keep_trainable_in_fp32, world_size)
from ftlab.training.loaders import own_generator, resumable_loader
from ftlab.training.dashboard import run_columns
from ftlab.training.loggers import build_logger, finish_logger, logged_to
from ftlab.training.module import FinetuneModule
from ftlab.training.optim import check_optimizer

from ftlab.resume import ResumePoint


def run_label(s: RunSettings) -> str:
    """``lora-r8-a16-32-true``: method, rank, alpha and precision, for run names and tables."""
    parts = [s.method["name"]]
    if "r" in s.method:
        parts.append(f"r{s.method['r']}")
    if "alpha" in s.method:
        parts.append(f"a{s.method['alpha']:g}" if isinstance(s.method["alpha"], (int, float)) else "")
    if s.model.quantization != "none":
        parts.append(s.model.quantization)
    parts.append(str(s.hardware.precision))
    return "-".join(p for p in parts if p)


def preflight(s: RunSettings):
    """Every check that needs no weights: method hyperparameters, targets, model, data."""
    method = method_from_spec(s.method)
    meta = meta_model(s.model)
    method.check(meta)
    # A dry run plans for hardware this machine need not have: only the settings are checked
    # (the quantized base as if on CPU, where bitsandbytes runs too), and no weights are needed.
    here = not s.dry_run.enabled
    check_quantized_base(method, s.model.quantization, s.hardware.accelerator if here else "cpu",
                         s.hardware.strategy)
    check_hardware(s.hardware, meta=meta, here=here)
    check_optimizer(s.optimizer, s.hardware, here=here)  # a paged optimizer needs CUDA
    if here:
        check_available(s.model)
    if s.data.packing and not method.traits.packing:
        # Packed rows need their position ids to keep each example's attention to itself.
        raise ConfigError(f"data.packing=true cannot be combined with method {s.method['name']!r} "
                          "(it ignores the position ids that keep packed examples apart); "
                          "use data.packing=false")
    return method


def train(s: RunSettings, config: dict[str, Any] | None = None,
          resume: ResumePoint | None = None) -> dict[str, Any]:
    """Run one fine-tuning job; returns the metrics also written to ``metrics.json``.

    ``resume``: continue from a checkpoint of this run (:mod:`ftlab.resume`)."""
    started = time.perf_counter()
    clock = _PhaseClock(started)
    reset_peak_memory()  # this run's peak, not that of earlier jobs in the same process (multirun)
    run_dir = Path(s.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")

    s, budget = fit_budget(s, s.budget)  # budget.trainable_params: the method's size for it
    if budget is not None:
        say(budget.line(s.method["name"]))
    method = preflight(s)
    if s.dry_run.enabled:
        return _dry_run(s, method)
    # Data records are read (and refused) before the weights, which take much longer.
    data = DataModule(s.data, tokenizer=None)
    data.check_files()

    clock.lap("setup")
    L.seed_everything(s.seed, workers=True, verbose=False)
    say(f"ftlab: model {s.model.name!r}, method {s.method['name']!r}, data {s.data.name!r} -> {run_dir}")
    model_settings = dataclasses.replace(s.model, quantization=base_quantization(method, s.model.quantization))
    # A fresh copy of the base kept from the previous job of a multirun, or loaded (models/reuse.py).
    model, tokenizer, base_reused = load_base(model_settings, seed=s.seed, labels=data.labels)
    if s.hardware.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    data.tokenizer = tokenizer
    data.setup("fit")
    say(data.describe())

    total_steps = _total_steps(s, data.num_train_rows)
    check_warmup(s.scheduler, total_steps)  # (runs sized in steps were checked with the config)
    model = method.apply(model, total_steps)
    keep_trainable_in_fp32(model, s.hardware.precision)
    trainable, total = count_parameters(model)
    say(parameter_summary(model, s.method["name"], method, str(s.hardware.precision)))
    module = FinetuneModule(model, method, s.optimizer, s.scheduler, total_steps,
                            num_classes=len(data.labels) if data.labels else None,
                            loss_chunk_size=s.loss.chunk_size)
    if resume is not None:
        resume.check_model(module.model)  # a foreign checkpoint is refused before anything is written
        remove_orphans(run_dir)  # temporary files of writes a kill interrupted
    label = run_label(s)
    logger = build_logger(s.logger, run_dir, label, s.sweep_name or s.method["name"], config or {},
                          columns=run_columns(s, model_settings.quantization))
    state, stop = RunState(checkpoint_identity(s)), GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    trainer = _trainer(s, run_dir, logger, model, callbacks=[state, NonFiniteLossGuard(), stop])
    writer = trainer.is_global_zero  # only rank zero writes the run's outputs

    clock.lap("load")
    eval_records = data.val_records[: s.eval.max_examples]
    result: dict[str, Any] = {"status": "running", "method": s.method["name"], "model": s.model.name,
                              "data": s.data.name, "run_name": label, "seed": s.seed,
                              "r": s.method.get("r"), "alpha": s.method.get("alpha"),
                              "lr": s.optimizer.lr, "precision": str(s.hardware.precision),
                              "world_size": trainer.world_size,
                              "gradient_checkpointing": s.hardware.gradient_checkpointing,
                              "quantization": model_settings.quantization, "base_reused": base_reused,
                              "trainable_params": trainable, "total_params": total,
                              "budget": budget.as_dict() if budget else None,
                              "validation": "on" if s.validates else "off",
                              "train_examples": len(data.train_set), "val_examples": len(data.val_set),
                              "test_examples": len(data.test_set) or None,
                              "data_stats": {k: v.as_dict() for k, v in data.stats.items()},
                              **logged_to(logger)}

    if resume is not None:
        result.update(resume.initial_metrics(), resumed_from=str(resume.checkpoint),
                      resumed_at_step=resume.step)
        resume.keep_logs(trainer)
    elif s.eval.before and s.validates:
        result.update(_evaluate_before(s, method, trainer, module, data, eval_records, tokenizer,
                                       model_settings.quantization, writer))
        module.val_history.clear()
        module.val_history.append({"step": 0, **{k: result[f"{k}_initial"] for k in VAL_SCORES
                                                 if f"{k}_initial" in result}})

    clock.lap("eval_before")
    if writer:  # "running", with the numbers before training: an interrupted run keeps them
        write_json(run_dir / "metrics.json", result)

    def history() -> dict[str, Any]:  # the curves so far, for a run that stops early
        return {"val_history": module.val_history, "train_loss_history": state.train_losses}

    with write_failures(run_dir, result, write_json if writer else None):
        fit_start = time.perf_counter()
        with supervise(stop, run_dir, result, history, write_json if writer else None):
            # Loaders whose order is a function of (seed, epoch) and whose position goes into the
            # checkpoint, so a resumed run sees the same batches (ftlab/training/loaders.py).
            trainer.fit(module, train_dataloaders=resumable_loader(data.train_dataloader(), s.seed),
                        val_dataloaders=own_generator(data.val_dataloader()),
                        ckpt_path=str(resume.checkpoint) if resume is not None else None,
                        weights_only=True)  # tensors and plain types only: no code runs from a checkpoint
        train_time = time.perf_counter() - fit_start
        clock.lap("train")
        ckpt_dir = run_dir / "checkpoints"
        if writer:
            ckpt_dir.mkdir(exist_ok=True)
        trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))  # every rank calls; rank zero writes
        clock.lap("checkpoint")  # the last checkpoint
        if s.validates:
            result.update(evaluate_held_out(trainer, module, data, s, eval_records, tokenizer, ""))
        clock.lap("eval_after")

        with full_parameters(trainer, module.model):  # every rank enters: sharded weights gather
            if writer:
                _save_trained(method, module, tokenizer, run_dir / method.traits.artifact)

        result["best"] = _keep_best(trainer, module, method, tokenizer, s, run_dir, writer)
        clock.lap("save")
        if data.has_test:  # after _keep_best: the model kept (best validation) is the one tested
            result.update(evaluate_test(trainer, module, data, s, tokenizer, result["best"]))
            clock.lap("eval_test")
        result.update(module.throughput())
        result.update({
            "status": "completed",
            "steps": int(trainer.global_step),
            "train_loss_final": module.train_losses[-1][1] if module.train_losses else None,
            "peak_memory_mb": peak_memory_mb(),
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - started,
            **clock.summary(),
            "val_history": module.val_history,
            "train_loss_history": module.train_losses,
        })
        if writer:
            write_json(run_dir / "metrics.json", result)
    say(results_table(result))
    finish_logger(logger, result)
    return result


class _PhaseClock:
    """Where a job's wall time goes: ``setup`` (checks, data files), ``load`` (weights, data,
    method), ``eval_before``, ``train``, ``checkpoint``, ``eval_after``, ``save`` (adapters),
    ``eval_test``, in seconds; the first job of a process also gets ``startup`` (interpreter and imports, from the
    process's start). Sweeps are many jobs: what is not training is what to cut."""

    _first_job = True

    def __init__(self, started: float):
        self.started = self.last = started
        self.phases: dict[str, float] = {}
        if _PhaseClock._first_job:
            _PhaseClock._first_job = False
            age = process_age_s()
            if age is not None:
                self.phases["startup"] = age

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def summary(self) -> dict[str, Any]:
        wall = self.last - self.started + self.phases.get("startup", 0.0)
        outside = wall - self.phases.get("train", 0.0)
        return {"time_s": {k: round(v, 3) for k, v in self.phases.items()},
                "outside_training_share": round(outside / wall, 4) if wall > 0 else None}


def _evaluate_before(s: RunSettings, method, trainer, module, data, records, tokenizer, quantization: str,
                     writer: bool) -> dict[str, Any]:
    """The held-out scores before training (``*_initial``), reused from ``$FTLAB_CACHE/evals``
    when the method starts as the identity (:mod:`ftlab.training.eval_cache`). The evaluation
    draws nothing from the global random generators, so training goes on identically whether
    it ran or was reused."""
    reusable = (s.eval.cache_before and not method.traits.changes_model_at_init and trainer.world_size == 1)
    key = eval_cache.cache_key(s, quantization) if reusable else None
    cached = eval_cache.load(key) if key else None
    if cached is not None:
        say("Before training: the base model's scores, reused from an earlier run with the same base "
            f"model, data, evaluation and precision ({eval_cache.cache_path(key)})")
        return {**cached, "eval_before_reused": True}
    say("Evaluating before training ...")
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        scores = evaluate_held_out(trainer, module, data, s, records, tokenizer, "_initial")
    if key and writer:
        eval_cache.save(key, scores)
    return scores


def _keep_best(trainer, module, method, tokenizer, s: RunSettings, run_dir: Path, writer: bool):
    """Report the best validation of the run (``monitor``) next to the last, and write the best
    model's adapter to ``best_adapter/`` when it is not the last one. Returns what metrics.json
    keeps under ``best`` (None with ``monitor.keep_best=false``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    m = s.monitor
    best = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor == m.metric), None)
    if best is None:
        return None
    if not best.best_model_path:
        say(f"No best checkpoint: no validation ran during training, so {m.metric} was never "
            f"logged (trainer.val_check_interval={s.trainer.get('val_check_interval')})")
        return {"metric": m.metric, "mode": m.direction, "checkpoint": None}
    key, value = m.metric.replace("/", "_"), float(best.best_model_score)
    step = next((h["step"] for h in module.val_history if h["step"] > 0 and key in h
                 and math.isclose(h[key], value, rel_tol=1e-6, abs_tol=1e-12)), None)
    last_step = int(trainer.global_step)
    artifact = method.traits.artifact
    info = {"metric": m.metric, "mode": m.direction, "value": value, "step": step,
            # Lightning holds the real path; run_dir may be relative (resume=last, resume=outputs/...)
            "checkpoint": str(Path(best.best_model_path).resolve().relative_to(Path(run_dir).resolve())),
            "adapter": artifact if step == last_step else None, "last_step": last_step,
            "stopped_early": bool(s.max_steps > 0 and last_step < s.max_steps)}
    if step != last_step and trainer.world_size == 1:
        # The trainable weights and method state of the best validation, over the same base.
        ckpt = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(ckpt["state_dict"], strict=False)
        module.on_load_checkpoint(ckpt)
        info["adapter"] = f"best_{artifact}"
        if writer:
            _save_trained(method, module, tokenizer, run_dir / info["adapter"])
    say(f"Best {m.metric} {value:.4g} at step {step} ({info['checkpoint']}"
        + (f", {info['adapter']}/" if info["adapter"] else "") + f"); last at step {last_step}"
        + (" (stopped early)" if info["stopped_early"] else ""))
    return info


def _dry_run(s: RunSettings, method) -> dict[str, Any]:
    """Plan instead of training (``dry_run=true``): print the plan, write ``plan.json``."""
    from ftlab.planning.planner import plan_run, write_plan

    plan = plan_run(s, method)
    say(plan.table())
    return write_plan(plan, Path(s.run_dir))


def _total_steps(s: RunSettings, train_examples: int) -> int:
    if s.max_steps > 0:
        return s.max_steps
    accum = int(s.trainer.get("accumulate_grad_batches") or 1)
    # Each of the data-parallel processes sees 1/world of the examples per epoch.
    per_process = math.ceil(train_examples / (world_size(s.hardware) or 1))
    per_epoch = math.ceil(math.ceil(per_process / s.data.batch_size) / accum)
    return per_epoch * int(s.trainer["max_epochs"])


def _trainer(s: RunSettings, run_dir: Path, logger, model=None, callbacks=()) -> L.Trainer:
    """The Trainer for the run's hardware (``model``: the model to train, for FSDP's wrapping)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(callbacks) + [instantiate(spec) for spec in s.callbacks.values()]
    if s.checkpoint_every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step}",
                                         auto_insert_metric_name=False,
                                         every_n_train_steps=s.checkpoint_every_n_steps,
                                         save_top_k=1, save_last=False))
    callbacks += _monitor_callbacks(s, run_dir)
    # inference_mode=False: metric states live across validate() and fit(); no_grad is enough.
    kwargs = dict(num_sanity_val_steps=0, enable_model_summary=False, inference_mode=False)
    kwargs.update(s.trainer)
    return L.Trainer(
        accelerator=s.hardware.accelerator, devices=s.hardware.devices,
        strategy=build_strategy(s.hardware, model),
        precision=s.hardware.precision, num_nodes=s.hardware.num_nodes, logger=logger,
        callbacks=callbacks, default_root_dir=str(run_dir), **kwargs,
        # temp name + rename: a kill mid-write keeps the old file; under SLURM, ftlab requeues
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
    )


def _monitor_callbacks(s: RunSettings, run_dir: Path) -> list:
    """The best checkpoint (``checkpoints/best.ckpt``) and early stopping, on ``monitor.metric``."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    m, out = s.monitor, []
    # Without validation there is no best to keep (keep_best is on by default, so this is no
    # error; early stopping, which cannot work without it, is refused in config.py).
    if m.keep_best and s.validates and s.trainer.get("enable_checkpointing", True) is not False:
        out.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=m.metric,
                                  mode=m.direction, save_top_k=1, save_last=False,
                                  auto_insert_metric_name=False, enable_version_counter=False))
    if m.patience is not None:
        # check_on_train_epoch_end=False: judge after each validation, which may fall mid-epoch.
        out.append(EarlyStopping(monitor=m.metric, mode=m.direction, patience=m.patience,
                                 min_delta=m.min_delta, check_on_train_epoch_end=False, strict=True))
    return out


def _save_trained(method, module, tokenizer, target: Path) -> None:
    """What the method trained (its own format) and the tokenizer, written atomically to ``target``."""
    atomic_directory(target, lambda d: (method.save(module.model, d), tokenizer.save_pretrained(d)))
