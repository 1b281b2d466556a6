"""Checkpoints: what they hold beyond Lightning's own state, how they are written, found and checked.

Checkpoints hold only the trainable parameters (the frozen base is rebuilt from its source).
:class:`RunState` adds to each what Lightning does not keep: the run's identity (method,
model), the random generators (torch CPU and CUDA, numpy, Python) and the loss and validation
curves, and restores them after a restart. :class:`AtomicCheckpointIO` writes each checkpoint
to a temporary name and renames it into place, so a process killed while writing leaves the
previous checkpoint whole. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ftlab.errors import UserError
from ftlab.io import torch_save
from ftlab.rundir import CHECKPOINT_DIR

FORMAT_VERSION = 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<random>`` in the same directory, fsync, ``os.replace``.

    A rename within one file system is atomic: readers (and a later resume) see the old file or
    the new one, never a truncated one, even if the process is killed mid-write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None):
        """Every checkpoint Lightning reads (resume, ``ckpt_path=``) with ``weights_only=True``:
        ftlab writes only tensors and plain Python values, so a file that needs more (a pickled
        object, code to run) is refused rather than executed."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every global generator training draws from, in types ``torch.load(weights_only=True)`` reads."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_identity(settings) -> dict[str, Any]:
    """What a checkpoint must match to continue a run: the method and the model."""
    model = dataclasses.asdict(settings.model)
    return {"method": dict(settings.method),
            "model": {k: model[k] for k in ("name", "source", "hub_id", "path", "gguf_file", "package", "task",
                                             "dtype", "quantization", "arch")}}


class RunState(L.Callback):
    """Adds to every checkpoint what Lightning does not keep (``checkpoint["ftlab"]``): the
    run's identity (method, model), the random generators, the loss and validation curves.
    After a restart it restores the curves at once and the generators right before the
    first training step."""

    def __init__(self, identity: dict[str, Any]):
        self.identity = identity
        self.train_losses: list[tuple[int, float]] = []
        self._rng: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Copied here, before any checkpoint callback runs at this hook: the module records
        # the token-weighted loss of each optimizer step (not of each micro-batch).
        self.train_losses = list(pl_module.train_losses)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["ftlab"] = {
            "version": FORMAT_VERSION, **self.identity,
            "trainable": {n: list(p.shape) for n, p in pl_module.model.named_parameters() if p.requires_grad},
            "rng": rng_state(),
            "train_losses": [list(x) for x in self.train_losses],
            "val_history": [dict(v) for v in pl_module.val_history],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("ftlab") or {}
        self.train_losses = [(int(s), float(v)) for s, v in saved.get("train_losses", [])]
        pl_module.train_losses = list(self.train_losses)
        pl_module.val_history = [dict(v) for v in saved.get("val_history", [])]
        self._rng = saved.get("rng")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, or a :class:`UserError` that says why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  torch raises several types for a damaged file
        if "Weights only load failed" in str(err):
            raise UserError(f"checkpoint {path} holds Python objects other than tensors and plain values, "
                            "which ftlab never writes: refused, since loading it could run code from the "
                            "file (was it written by another program, or tampered with?)") from None
        first = " ".join(str(err).split())[:160] or type(err).__name__
        raise UserError(f"checkpoint {path} cannot be read: it is truncated or corrupted ({first})") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a Lightning checkpoint (no global_step / state_dict)")
    if "ftlab" not in ckpt:
        raise UserError(f"checkpoint {path} was not written by this version of ftlab (no run "
                        "identity or random state in it), so the run cannot continue exactly from it")
    return ckpt


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run (temporary files of an interrupted write excluded)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    return sorted(p for p in directory.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of ``run_dir`` with the most optimizer steps (newest file on a tie)."""
    found = checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir} has no checkpoint to resume from ({run_dir / CHECKPOINT_DIR} "
                        "holds no *.ckpt): the run stopped before its first one; start it again")
    loaded = []
    for path in found:
        try:
            loaded.append((path, read_checkpoint(path)))
        except UserError as err:
            others = [p.name for p in found if p != path]
            hint = f"; resume from another with resume={path.parent}/{others[0]}" if others else ""
            raise UserError(f"{err}{hint}") from None
    return max(loaded, key=lambda pc: (int(pc[1]["global_step"]), pc[0].stat().st_mtime))


def check_identity(ckpt: dict[str, Any], path: Path, settings) -> None:
    """Refuse a checkpoint written for another method or model."""
    mine = checkpoint_identity(settings)
    for part in ("method", "model"):
        theirs = ckpt["ftlab"].get(part, {})
        keys = ["name"] + sorted((set(theirs) | set(mine[part])) - {"name"})  # the name says most
        diff = [k for k in keys if theirs.get(k) != mine[part].get(k)]
        if diff:
            k = diff[0]
            raise UserError(
                f"checkpoint {path} belongs to another {part}: {part}.{k} is {theirs.get(k)!r} there "
                f"and {mine[part].get(k)!r} in this run's config; resume a run with its own checkpoints")


def check_parameters(ckpt: dict[str, Any], path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's trainable tensors must be exactly this model's (names and shapes)."""
    theirs = {k.removeprefix("model."): list(v.shape) for k, v in ckpt["state_dict"].items()
              if k.startswith("model.")}
    mine = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or extra:
        name = (missing or extra)[0]
        raise UserError(f"checkpoint {path} does not fit this model: {name} is "
                        f"{'missing from it' if missing else 'not a trainable parameter here'} "
                        f"({len(missing)} missing, {len(extra)} unexpected)")
    for name, shape in mine.items():
        if theirs[name] != shape:
            raise UserError(f"checkpoint {path} does not fit this model: {name} has shape "
                            f"{theirs[name]} there and {shape} here")
