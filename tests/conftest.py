"""Shared test helpers: offline environment, running the real CLI, tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (CI: -n 2) each worker is one core's worth: one thread in this process
    # and in every ftlab process it starts, instead of each oversubscribing the machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# Small, fast settings for CLI runs on the tiny random model.
TINY = ["model=tiny-llama", "trainer.max_steps=3", "trainer.val_check_interval=2",
        "eval.max_examples=4", "data.batch_size=4", "logger=none"]


# The tiny Llama's shapes (conf/model/tiny-llama.yaml): hidden 64, 4 attention heads of 16, 2
# key/value heads, 2 layers. LoRA on its default targets adapts q_proj (64 -> 64) and v_proj
# (64 -> 2 * 16 = 32) in each layer.
TINY_LORA_LAYERS = 2 * [(64, 64), (64, 32)]
# Every weight of the tiny Llama: the embeddings and the (untied) head, 272 x 64 each; the final
# norm, 64; per layer q and o (64 x 64), k and v (64 x 32), gate, up and down (64 x 128), 2 norms.
TINY_LLAMA_PARAMS = 2 * 272 * 64 + 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64)


def tiny_lora_params(r: int) -> int:
    """LoRA's trainable count on the tiny Llama: A (r x d_in) and B (d_out x r) per adapted layer."""
    return sum(r * (d_in + d_out) for d_in, d_out in TINY_LORA_LAYERS)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            module: str = "ftlab", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m ftlab ARGS`` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one line on stderr starting with ``ftlab: error:``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def pytest_collection_modifyitems(config, items):
    """Tests marked ``stress`` (minutes each) run only when ``-m`` names them (``-m stress``)."""
    if "stress" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if "stress" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if "stress" in item.keywords])
        items[:] = kept


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
