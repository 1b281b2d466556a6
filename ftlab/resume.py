"""Resume: continue an interrupted run exactly where it stopped.

    python -m ftlab resume=RUN_DIR              # from the run's latest checkpoint
    python -m ftlab resume=RUN_DIR/checkpoints/step-40.ckpt
    python -m ftlab resume=last                 # the newest unfinished run under ./outputs

The run continues in its own directory with its own ``config.yaml``; the losses after the
restart equal those of a run that was never stopped (tests/test_resume.py). What that takes,
beyond the model, optimizer, scheduler and loop counters Lightning restores by itself:

- **method state**: the checkpoint holds ``Method.state_dict()`` (AdaLoRA's importance scores and
  rank pattern, Delta-LoRA's previous factors), restored by :class:`~ftlab.module.FinetuneModule`;
- **data position**: :class:`ResumableLoader` draws each epoch's order from ``(seed, epoch)``
  alone and tells Lightning (through ``state_dict``) how many batches of the epoch were used,
  so a restart skips exactly those, without loading them;
- **random state**: :class:`RunState` saves the torch (CPU and CUDA), numpy and Python generator
  states with every checkpoint and puts them back right before the first step after the
  restart, so dropout masks continue as they would have; the loaders own their generators, so
  iterating them takes nothing from the global one;
- **history**: the loss and validation curves so far, so ``metrics.json`` covers the whole run.

Checkpoints hold only the trainable parameters (the frozen base is rebuilt from its source), and
:class:`AtomicCheckpointIO` writes each one to a temporary name and renames it into place, so a
process killed while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from ftlab.errors import ConfigError, UserError

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
# Keys a resumed run may change: none of them alters what is trained or in which order.
RESUMABLE_OVERRIDES = ("eval.", "logger.", "checkpoint.", "trainer.enable_progress_bar",
                       "trainer.log_every_n_steps")


# --------------------------------------------------------------------- atomic checkpoint files
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<random>`` in the same directory, fsync, ``os.replace``.

    A rename within one file system is atomic: readers (and a later resume) see the old file or
    the new one, never a truncated one, even if the process is killed mid-write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, Path(path))


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- data position
class SeededSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` before each epoch. Unlike ``RandomSampler`` (which seeds
    itself from the global generator when iterated), the order of any epoch can be recomputed
    after a restart, and iterating consumes nothing from the global generator."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that can stop mid-epoch and continue at the next batch.

    Lightning keeps :meth:`state_dict` (epoch, batches used in it) in the checkpoint and hands
    it to :meth:`load_state_dict` before iterating again; the first epoch after that skips the
    used batches at the index level (no example is loaded twice or collated for nothing).
    Skipping after sharding, it also stays right when Lightning wraps the sampler for DDP.
    Same constructor as ``DataLoader``, so Lightning can rebuild it with another sampler.
    """

    _epoch = 0
    _consumed = 0
    _resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "batches": int(self._consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # stopped after the last batch: the next epoch starts afresh
            epoch, batches = epoch + 1, 0
        self._resume_at = (epoch, batches)
        if callable(getattr(self.sampler, "set_epoch", None)):
            # With worker processes the first indices are drawn when the iterator is built,
            # before Lightning's set_epoch for the resumed epoch.
            self.sampler.set_epoch(epoch)

    @property
    def _index_sampler(self):
        return _SkipUsed(super()._index_sampler, self)

    def __iter__(self):
        return _Counted(super().__iter__(), self)


class _SkipUsed:
    """The loader's batch-index sampler, minus the batches a restored epoch already used."""

    def __init__(self, base, loader: ResumableLoader):
        self.base, self.loader = base, loader

    def __len__(self) -> int:
        return len(self.base)  # Lightning counts the epoch's batches as if none were skipped

    def __iter__(self):
        loader = self.loader
        epoch = getattr(loader.sampler, "epoch", None)
        epoch = loader._epoch + 1 if epoch is None else int(epoch)
        skip = 0
        if loader._resume_at is not None:
            if loader._resume_at[0] == epoch:
                skip = loader._resume_at[1]
            loader._resume_at = None
        loader._epoch, loader._consumed = epoch, skip
        for i, indices in enumerate(self.base):
            if i >= skip:
                yield indices


class _Counted:
    """The loader's iterator, counting the batches handed out (with worker processes the index
    sampler runs ahead of what training has used)."""

    def __init__(self, iterator, loader: ResumableLoader):
        self.iterator, self.loader = iterator, loader

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.loader._consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


def resumable_loader(loader: DataLoader, seed: int) -> ResumableLoader:
    """The same batches as ``loader``, in an order fixed by ``seed`` and the epoch, resumable.

    A ``RandomSampler`` (``shuffle=True``) becomes a :class:`SeededSampler`; a sampler with its
    own ``set_epoch`` (length-grouped batches) is kept. Any other loader is returned as it is,
    with a warning: training works, but a resumed run starts its epoch over."""
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        sampler = SeededSampler(len(loader.dataset), seed)
    elif loader.batch_size is None or not (isinstance(sampler, SequentialSampler)
                                           or callable(getattr(sampler, "set_epoch", None))):
        warnings.warn(f"the training loader ({type(loader.batch_sampler or sampler).__name__}) cannot be "
                      "replayed from a checkpoint; a resumed run will not continue exactly", stacklevel=2)
        return loader
    return ResumableLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
        num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        # Its own generator: worker seeds are drawn from it, not from the global one.
        generator=torch.Generator().manual_seed(int(seed)),
    )


def own_generator(loader: DataLoader) -> DataLoader:
    """``loader`` (not shuffled) rebuilt with its own generator. Every iteration of a
    ``DataLoader`` draws a base seed for its workers, from the global generator unless it has
    one: validation inside fit would otherwise shift the dropout masks of later steps."""
    if loader.generator is not None or loader.batch_size is None:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- random state and history
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


# ------------------------------------------------------------ finding and checking checkpoints
def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, or a :class:`UserError` that says why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  torch raises several types for a damaged file
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


# ------------------------------------------------------------------------- the resumed run
@dataclass
class ResumePoint:
    """Where a resumed run starts: the checkpoint and what the first part of the run recorded."""

    run_dir: Path
    checkpoint: Path
    step: int
    ckpt: dict[str, Any] = field(repr=False)
    previous: dict[str, Any] = field(default_factory=dict, repr=False)  # the old metrics.json

    def initial_metrics(self) -> dict[str, Any]:
        """The before-training evaluation of the first part (``*_initial``)."""
        return {k: v for k, v in self.previous.items() if k.endswith("_initial")}

    def check_model(self, model: torch.nn.Module) -> None:
        check_parameters(self.ckpt, self.checkpoint, model)

    def keep_logs(self, trainer: L.Trainer) -> None:
        """Keep the csv logger's rows up to the checkpoint (it would start a fresh file), and
        Lightning quiet about the run's directories not being empty, as expected here."""
        from lightning.pytorch.loggers import CSVLogger

        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            path = Path(logger.log_dir) / "metrics.csv"
            if not path.is_file():
                continue
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if _step(r) < self.step]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                experiment = logger.experiment  # creating it empties the file
            experiment.metrics[:0] = [{k: v for k, v in r.items() if v != ""} for r in rows]


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or 0))
    except ValueError:
        return 0


def plan(argv: list[str]) -> tuple[Any, dict[str, Any], ResumePoint]:
    """``(settings, resolved config, resume point)`` for a ``resume=...`` command line.

    Reads and checks everything, writes nothing: a bad request leaves the run untouched."""
    from omegaconf import OmegaConf

    from ftlab.cli import settings_from_config

    value, run_dir, overrides = _parse(argv)
    checkpoint = None
    if value == "last":
        run_dir = run_dir or _newest_run(Path("outputs"))
    else:
        target = Path(value).expanduser()
        if target.is_file():
            checkpoint = target
            if run_dir is None:
                if target.parent.name != CHECKPOINT_DIR:
                    raise UserError(f"cannot tell which run {target} belongs to (it is not in a run's "
                                    f"{CHECKPOINT_DIR}/ directory); add hydra.run.dir=<run dir>")
                run_dir = target.parent.parent
        elif target.is_dir():
            if run_dir is not None and run_dir.resolve() != target.resolve():
                raise UserError(f"resume={value} and hydra.run.dir={run_dir} name different runs")
            run_dir = target
        else:
            raise UserError(f"resume={value}: no such run directory or checkpoint file")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not an ftlab run directory (no config.yaml); "
                        "resume=<run dir> names the directory a run wrote")
    try:
        cfg = OmegaConf.load(config_path)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{config_path} cannot be read: {' '.join(str(err).split())[:200]}") from None
    allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE_OVERRIDES)
    for key, text in overrides:
        if not key.startswith(RESUMABLE_OVERRIDES):
            raise UserError(f"{key} cannot change when a run resumes: it continues with its saved config "
                            f"({config_path}). Only {allowed} may be set; start a new run to change "
                            "anything else")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown config key {key!r} in {config_path}")
        OmegaConf.update(cfg, key, yaml.safe_load(text) if text else None, merge=False)
    config = OmegaConf.to_container(cfg, resolve=True)
    settings = settings_from_config(cfg, str(run_dir))

    previous = read_metrics(run_dir)
    if previous.get("status") == "completed":
        raise UserError(f"run {run_dir} already completed all its {previous.get('steps', '?')} steps; "
                        "nothing to resume (start a new run to train longer)")
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
    else:
        checkpoint, ckpt = latest_checkpoint(run_dir)
    check_identity(ckpt, checkpoint, settings)
    point = ResumePoint(run_dir=run_dir, checkpoint=checkpoint, step=int(ckpt["global_step"]),
                        ckpt=ckpt, previous=previous)
    return settings, config, point


def _parse(argv: list[str]) -> tuple[str, Path | None, list[tuple[str, str]]]:
    value, run_dir, overrides = None, None, []
    it = iter(argv)
    for arg in it:
        if arg in ("-cd", "--config-dir"):
            run_dir = Path(next(it, ""))
        elif arg in ("-cn", "--config-name"):
            name = next(it, "")
            if name != "config":
                raise UserError(f"resume reads the run's config.yaml; -cn {name} does not apply")
        elif arg in ("-m", "--multirun"):
            raise UserError("resume continues one run; it cannot be combined with -m (a sweep)")
        elif arg.startswith("-"):
            raise UserError(f"{arg} cannot be combined with resume=")
        elif "=" not in arg:
            raise UserError(f"cannot parse {arg!r}: expected KEY=VALUE")
        else:
            key, text = arg.split("=", 1)
            key = key.lstrip("+~")
            if key == "resume":
                value = text
            elif key == "hydra.run.dir":
                run_dir = Path(text)
            elif key == "logger":  # the group choice: every logger has the same settings
                overrides.append(("logger.name", text))
            else:
                overrides.append((key, text))
    if not value:
        raise UserError("resume= needs a run directory, a checkpoint file or 'last'")
    return value, run_dir, overrides


def _newest_run(root: Path) -> Path:
    """The unfinished run under ``root`` (``outputs/<date>/<time>_...``) with the newest checkpoint."""
    best: tuple[float, Path] | None = None
    for ckpt_dir in root.glob(f"*/*/{CHECKPOINT_DIR}"):
        run_dir = ckpt_dir.parent
        if read_metrics(run_dir).get("status") == "completed":
            continue
        for path in checkpoints(run_dir):
            if best is None or path.stat().st_mtime > best[0]:
                best = (path.stat().st_mtime, run_dir)
    if best is None:
        raise UserError(f"resume=last found no unfinished run with a checkpoint under {root.resolve()}; "
                        "name it: resume=<run dir>")
    return best[1]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` so far (``{}`` if there is none or it cannot be read)."""
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def main(argv: list[str]) -> None:
    """``python -m ftlab resume=...`` (called by :func:`ftlab.cli.main`)."""
    from ftlab.cli import fail

    try:
        settings, config, point = plan(argv)
    except UserError as err:
        fail(str(err))
    from ftlab.run import say, train

    say(f"ftlab: resuming {point.run_dir} from {point.checkpoint.name} (step {point.step})")
    try:
        train(settings, config=config, resume=point)
    except UserError as err:
        fail(str(err))
