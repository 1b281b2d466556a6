"""A probe of multi-process runs, for tests/test_hardware.py (not part of ftlab).

The test runs the real CLI with ``hardware=ddp`` on two CPU processes and needs to see what
each rank really did. It adds :class:`ProbeCallback` as a user callback
(``+callbacks.probe._target_=ftlab_probe.ProbeCallback``), and puts this directory on
``PYTHONPATH`` so that ``sitecustomize.py`` starts :func:`watch_writes` in every process
(the processes Lightning starts for the other ranks too). Every rank writes into
``FTLAB_PROBE_DIR``, outside the run directory:

- ``rank<r>.pt`` (at the end of fit): the token rows of every training batch it drew; for the
  first optimizer step, the trainable parameters before it, the batch, the gradients the
  optimizer received and the parameters after it;
- ``rank<r>-writes.json`` (at exit): every file or directory the process created or opened
  for writing under ``FTLAB_PROBE_RUN_DIR``, seen by a Python audit hook
  (``sys.addaudithook``), so "only rank zero writes the outputs" is observed, not assumed.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

ENV = "FTLAB_PROBE_DIR"
_writes: list[str] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def watch_writes(run_dir: str | Path) -> None:
    """Record every write under ``run_dir`` made by this process."""
    root = os.path.realpath(run_dir)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & _WRITE_FLAGS)
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir"):
            path = args[1] if event == "os.rename" else args[0]
            # mkdir(exist_ok=True) of a directory that exists changes nothing
            writing = not (event == "os.mkdir" and os.path.isdir(path))
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            if full.startswith(root):
                _writes.append(os.path.relpath(full, root))

    sys.addaudithook(hook)
    atexit.register(_dump_writes)


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _dump_writes() -> None:
    out = Path(os.environ[ENV]) / f"rank{_rank()}-writes.json"
    out.write_text(json.dumps(sorted(set(_writes))))


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


try:
    import lightning as L

    class ProbeCallback(L.Callback):
        def __init__(self) -> None:
            self.out = Path(os.environ[ENV])
            self.record: dict = {"rows": []}

        def on_train_start(self, trainer, pl_module) -> None:
            self.record["params_before"] = _trainable(pl_module.model)
            self.record["world_size"] = trainer.world_size

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            self.record["rows"].extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
            if trainer.global_step == 0 and "batch" not in self.record:
                self.record["batch"] = {k: v.detach().clone() for k, v in batch.items()}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if "grads" not in self.record:
                self.record["grads"] = {n: p.grad.detach().clone()
                                        for n, p in pl_module.model.named_parameters()
                                        if p.requires_grad and p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if "params_after" not in self.record and trainer.global_step >= 1:
                self.record["params_after"] = _trainable(pl_module.model)

        def on_fit_end(self, trainer, pl_module) -> None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.record["rank"] = trainer.global_rank
            torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")
except ImportError:  # pragma: no cover  lightning is a dependency
    pass
