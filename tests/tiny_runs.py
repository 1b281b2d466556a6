"""Tiny runs trained in the test process (no subprocess start-up), shared by the eval, export,
resume and fault tests. A run is the real pipeline (:func:`ftlab.run.train`) on the random
tiny Llama, writing a complete run directory, as ``python -m ftlab`` would."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
# Fast: small batches, few generated answers, no csv files, no before-training evaluation.
FAST = ["model=tiny-llama", "logger=none", "data.batch_size=8", "eval.before=false",
        "eval.max_examples=3", "eval.max_new_tokens=4", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=100"]

# Runs several test files use (trained once per session, see cached_run).
LORA = ["trainer.max_steps=8", "optimizer.lr=2e-2", "eval.before=true", "eval.max_examples=4",
        "eval.max_new_tokens=6", "eval.show_samples=2"]
NATIVE_VERA = ["method=vera", "method.backend=native", "method.r=8", "trainer.max_steps=3",
               "optimizer.lr=5e-2", "eval.generate=false"]
DELTA_LORA = ["method=delta_lora", "method.start_step=1", "method.r=4", "data.batch_size=16",
              "trainer.max_steps=7", "checkpoint.every_n_steps=4", "eval.generate=false", "optimizer.lr=2e-2"]

_cache: dict[tuple, Path] = {}
# One thread per process: on a shared 2-core machine, torch's default (a thread per core, in
# every test process and subprocess) makes the threads wait on each other, 10x slower. All
# runs of a comparison (reference, interrupted, resumed) use the same setting.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}


def one_thread():
    """Body of a module-scoped autouse fixture: this process computes on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.settings import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def train_run(run_dir: Path, *overrides: str) -> dict:
    """Train one run into ``run_dir`` (config.yaml written as the CLI writes it)."""
    from ftlab.settings import settings_from_config
    from ftlab.run import train

    cfg = compose(*FAST, *overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return train(settings_from_config(cfg, str(run_dir)), config=resolved)


def cached_run(tmp_path_factory, *overrides: str) -> Path:
    """A run trained once per test session for these overrides (treat it as read-only)."""
    key = tuple(overrides)
    if key not in _cache:
        run_dir = tmp_path_factory.mktemp("run")
        train_run(run_dir, *overrides)
        _cache[key] = run_dir
    return _cache[key]


def tree_digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its content: 'nothing was modified'."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def cli(*args: str, module: str = "ftlab", timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """``python -m ftlab ARGS`` in the background, output to ``log``."""
    fh = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "ftlab", *args], cwd=REPO, env=ENV,
                            stdout=fh, stderr=subprocess.STDOUT)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    """Poll ``condition()`` every 20 ms until true; fail with the log after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.02)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def wandb_records(run_dir: Path) -> list:
    """The records of the offline W&B run under ``run_dir`` (its ``run-*.wandb`` file: W&B's
    LevelDB-style log of protobuf records), read without a W&B server."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    data, pos, block, out, part = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


class WarnOnFit:
    """A Lightning callback (``+callbacks.w._target_=tiny_runs.WarnOnFit``) that warns when
    training starts, or with ``fail=true`` raises there."""

    def __new__(cls, fail: bool = False):
        from lightning.pytorch.callbacks import Callback

        class _Warn(Callback):
            def on_fit_start(self, trainer, pl_module):
                import warnings

                if fail:
                    raise RuntimeError("an error from the tiny run")
                warnings.warn("a warning from the tiny run", UserWarning, stacklevel=1)

        return _Warn()
