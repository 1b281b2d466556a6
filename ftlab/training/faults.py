"""Faults: preemption signals and a diverging loss end a run cleanly, never half-written.

- **SIGTERM / SIGINT / SIGUSR1** (a cluster preempting the job, Ctrl-C, SLURM's warning before
  the time limit): during training the run finishes
  the optimizer step in progress, saves ``checkpoints/last.ckpt``, marks ``metrics.json``
  ``"status": "interrupted"`` and exits with 128 + the signal number (143, 130, 138);
  ``python -m ftlab resume=RUN_DIR`` then continues exactly. Under SLURM, SIGTERM and SIGUSR1
  also requeue the job, which then continues the run by itself (:mod:`ftlab.training.preemption`).
  A second signal, or one before training starts, stops at once. With several processes the
  decision to stop is shared, so every rank saves at the same step.
- **SIGKILL** cannot be caught: what protects the run then is that checkpoints, the adapter and
  ``metrics.json`` are written to a temporary name and renamed into place
  (:class:`ftlab.training.checkpoints.AtomicCheckpointIO`), so the previous checkpoint stays whole.
- **A write that fails** once training has started (disk full, quota, a directory that became
  read-only): the run stops with one line naming the path (:class:`ftlab.io.WriteError`) and
  exit status 74 (``EX_IOERR``); the checkpoints and adapter written before stay whole (each is
  written beside its target and renamed into place), and ``metrics.json`` says ``"failed"`` if
  it can still be written. Before training the same error is bad input: exit status 2.
- **A NaN or infinite loss** stops the run before that step's backward pass (the parameters
  are not touched), with a message naming the step; the checkpoints written so far stay, and
  ``metrics.json`` says ``"status": "failed"``.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from ftlab.errors import UserError
from ftlab.io import WRITE_ERRNOS, WriteError
from ftlab.training.checkpoints import checkpoints
from ftlab.training.preemption import requeue

# SIGUSR1: what SLURM sends before a time limit with `--signal=USR1@<seconds>` (preemption.py).
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(SystemExit):
    """The run was stopped by ``signum``; exits with status 128 + signum."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""

    def __init__(self, value: float, step: int):
        super().__init__(f"the training loss is {value} at step {step}; the run stopped before "
                         "updating the weights with it. Lower optimizer.lr, set "
                         "trainer.gradient_clip_val, or use a more stable hardware.precision")
        self.value, self.step = value, step


class NonFiniteLossGuard(L.Callback):
    """Raise :class:`NonFiniteLoss` before the backward pass of a NaN/inf loss (so the weights
    and optimizer state stay those of the last good step, and no checkpoint of it is written)."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        # Every process decides together: one rank raising alone would leave the others
        # waiting in the gradient all-reduce.
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLoss(float(loss.detach().float().mean()), int(trainer.global_step) + 1)


class GracefulStop(L.Callback):
    """SIGTERM/SIGINT during training: save ``checkpoint`` after the step in progress, then
    raise :class:`Interrupted`. Outside the training loop a signal raises at once."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self.received: int | None = None
        self.training = False
        self._stepped = False  # whether this batch ended with an optimizer step
        self._previous: dict[int, Any] = {}

    # -- handlers -----------------------------------------------------------------------------
    def install(self) -> None:
        for signum in HANDLED:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None or not self.training:
            raise Interrupted(signum)
        self.received = signum  # acted on at the end of this optimizer step

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.training = True
        # Lightning installs its own SIGTERM handler for fit (it would stop at the end of the
        # epoch, without a checkpoint); ours takes over while the loop runs.
        for signum in HANDLED:
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer, pl_module) -> None:
        # a signal during the last validation, with no step left to stop after
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._stop(trainer)
        self.training = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.training = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # With gradient accumulation only a batch that ends in an optimizer step is a point to
        # stop at: the gradients summed so far are not part of a checkpoint.
        stepped, self._stepped = self._stepped, False
        if stepped and trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._stop(trainer)

    def _stop(self, trainer) -> None:
        self.training = False
        trainer.save_checkpoint(str(self.checkpoint))
        raise Interrupted(self.received or signal.SIGTERM, step=int(trainer.global_step),
                          checkpoint=self.checkpoint)


@contextmanager
def supervise(stop: GracefulStop, run_dir: Path, result: dict[str, Any],
              history: Callable[[], dict[str, Any]], write: Callable[[Path, dict], None] | None):
    """Around ``trainer.fit``: signal handlers in place, and an interrupted or failed run
    recorded in ``metrics.json`` (``write`` is None on processes that write nothing)."""
    run_dir = Path(run_dir)
    stop.install()
    try:
        yield
    except Interrupted as err:
        where = f"at step {err.step}" if err.step is not None else "outside the training loop"
        saved = (f"checkpoint saved: {err.checkpoint}. Continue with: python -m ftlab resume={run_dir}"
                 if err.checkpoint else "no new checkpoint")
        requeued = requeue(err.signum)  # under SLURM: the job starts again and continues the run
        result.update(status="interrupted", signal=err.signal_name, interrupted_at_step=err.step,
                      checkpoint=str(err.checkpoint) if err.checkpoint else None, **history())
        if requeued:
            result["requeue"] = requeued
        if write:
            write(run_dir / "metrics.json", result)
        print(f"ftlab: interrupted by {err.signal_name} {where}; {saved}" + (f"; {requeued}" if requeued else ""),
              file=sys.stderr, flush=True)
        raise
    except NonFiniteLoss as err:
        kept = checkpoints(run_dir)
        result.update(status="failed", error=str(err), failed_at_step=err.step,
                      last_checkpoint=str(max(kept, key=lambda p: p.stat().st_mtime)) if kept else None,
                      **history())
        if write:
            write(run_dir / "metrics.json", result)
        raise
    finally:
        stop.uninstall()


@contextmanager
def write_failures(run_dir: Path, result: dict[str, Any], write: Callable[[Path, dict], None] | None):
    """From the start of training on: a write that fails ends the run as a
    :class:`~ftlab.io.WriteError` marked ``mid_run`` (the command exits 74), recorded in
    ``metrics.json`` where that can still be written. An ``OSError`` of the environment raised
    by a library's own write (Lightning's directories, the csv logger) is turned into one."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        failed = WriteError(err.filename or run_dir, err)
        failed.mid_run = True
        _record_failure(run_dir, result, failed, write)
        raise failed from None
    except WriteError as err:
        err.mid_run = True
        _record_failure(run_dir, result, err, write)
        raise


def _record_failure(run_dir: Path, result: dict[str, Any], err: WriteError,
                    write: Callable[[Path, dict], None] | None) -> None:
    kept = checkpoints(run_dir)
    err.last_checkpoint = max(kept, key=lambda p: p.stat().st_mtime) if kept else None
    result.update(status="failed", error=str(err),
                  last_checkpoint=str(err.last_checkpoint) if err.last_checkpoint else None)
    if write:
        try:
            write(Path(run_dir) / "metrics.json", result)
        except WriteError:
            pass  # the disk that refused the first write may refuse this one too
