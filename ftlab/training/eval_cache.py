"""The "before training" evaluation, computed once per base model, data, evaluation settings
and precision, and reused by every run whose method starts as the identity.

A sweep compares many methods on one base model; most of them (LoRA and its relatives with
B = 0, VeRA with b = 0, (IA)^3 with its ones, full fine-tuning) leave the model's outputs
bit-identical until the first step, so their "before" scores are the base model's. Methods
that change the model when applied (``Method.traits.changes_model_at_init``: prompt methods,
PiSSA's residual split, DoRA's renormalisation, bottleneck adapters) always evaluate. The
entry's key is a hash of everything the scores depend on; entries are written atomically
under ``$FTLAB_CACHE/evals/`` and an unreadable one counts as absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ftlab import __version__
from ftlab.config import RunSettings
from ftlab.io import read_json, write_json
from ftlab.cachelock import cache_root

FORMAT = 2
# The code the scores come from: an entry written by other code is not reused.
SCORING_CODE = ("training/evaluation.py", "training/module.py", "training/loss.py", "metrics/generation.py",
                "data/collate.py", "data/encode.py", "data/formats.py", "data/templates.py", "models/loading.py")


def cache_key(s: RunSettings, quantization: str) -> str:
    """Hash of what the untrained model's held-out scores depend on."""
    data = dataclasses.asdict(s.data)
    data.pop("batch_size", None)      # training batches
    data.pop("num_workers", None)
    parts = {"format": FORMAT, "ftlab": __version__, "code": _code_digest(), "model": dataclasses.asdict(s.model),
             "quantization": quantization, "data": data, "eval": dataclasses.asdict(s.eval),
             "precision": str(s.hardware.precision), "accelerator": s.hardware.accelerator,
             "loss": dataclasses.asdict(s.loss),
             "seed": s.seed,  # a randomly initialised base model is drawn from the run's seed
             "limit_val_batches": s.trainer.get("limit_val_batches", 1.0)}
    # The user's own weights and data files may change in place: their sizes and times count.
    parts["files"] = [_fingerprint(p) for p in (s.model.path, s.data.path, s.data.val_path) if p]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _code_digest() -> str:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for rel in SCORING_CODE:
        digest.update((package / rel).read_bytes())
    return digest.hexdigest()[:16]


def _fingerprint(path: str) -> list:
    """``(name, size, mtime)`` of a local file, or of the files directly in a local directory."""
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(root.iterdir()) if root.is_dir() else []
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def cache_path(key: str) -> Path:
    return cache_root() / "evals" / f"{key}.json"


def load(key: str) -> dict[str, Any] | None:
    entry = read_json(cache_path(key))
    return entry.get("scores") if entry.get("format") == FORMAT else None


def save(key: str, scores: dict[str, Any]) -> None:
    write_json(cache_path(key), {"format": FORMAT, "scores": scores})
