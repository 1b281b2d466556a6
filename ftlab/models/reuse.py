"""The loaded base model, kept for the next job of the same process (a Hydra multirun).

Hydra's basic launcher runs a sweep's jobs one after another in one process; most of them load
the same base model. With :func:`keep_bases` on (``ftlab.cli`` turns it on for a multirun whose
launcher is that sequential one, when ``FTLAB_REUSE_BASE=1`` asks for it), :func:`load_base`
keeps one pristine copy of the last base it loaded and hands every later job that asks for the
same base a deep copy of it (``copy.deepcopy``: tied weights stay tied, buffers and config come
along), instead of reading the weights again. A job never trains the kept copy: methods change
the model they are given in place (PiSSA rewrites W, Delta-LoRA moves W0, full fine-tuning
trains every weight, peft injects its layers into the module tree), so each job gets its own
copy, bit-identical to a fresh load (tests/test_base_reuse.py compares the hashes of the state
dicts).

What identifies a base: every model setting (source, name, path or hub id, packaged file,
dtype, quantization, task and the label set of a classification head, architecture), the
size and modification time of the files of a local ``model.path``, and for a randomly
initialised model the seed. Loading may also draw from torch's global random generator (a new
classification head is initialised from it, after the run has seeded it); the kept entry
remembers the generator's state before and after its load, and is reused by a job that starts
from the same state (it then leaves the generator as the load did), or by any job when the load
drew nothing. Otherwise the base is loaded again. Either way a job's training draws the same
random numbers as with a fresh load.

Not kept: quantized bases (``model.quantization`` nf4, fp4, int8). bitsandbytes keeps their
quantization state outside the tensor data (``Params4bit.quant_state``, ``Int8Params``'
``CB``/``SCB``) and re-quantizes when a weight moves to another device, so a deep copy is not
known to give the same base; they load from disk for each job.

Opt-in, because it does not pay where a reload is cheap. Measured on SmolLM2-135M (2-core CPU,
docs/training.md): a reload from ftlab's safetensors cache takes about 1.1 s once the process has
loaded it before, a deep copy of the kept model and tokenizer about 1.8 s, and the kept copy
holds 513 MiB more for the whole sweep. Reuse pays where loading is slow: weights read from a
slow or network disk, ``.bin`` checkpoints (unpickled), large random initialisations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftlab.config import ModelSettings
from ftlab.console import say
from ftlab.models.loading import load_model

_state = {"keep": False}


@dataclass
class _Entry:
    key: str
    model: Any
    tokenizer: Any
    rng_before: torch.Tensor
    rng_after: torch.Tensor

    @property
    def draws_random(self) -> bool:
        return not torch.equal(self.rng_before, self.rng_after)


_kept: list[_Entry] = []  # at most one: the last base loaded


def keep_bases(on: bool = True) -> None:
    """Keep the last loaded base for later jobs of this process (off: drop it and load each time)."""
    _state["keep"] = bool(on)
    if not _state["keep"]:
        clear()


def asked_for() -> bool:
    """``FTLAB_REUSE_BASE=1`` in the environment: reuse is opt-in (see the module docstring)."""
    return os.environ.get("FTLAB_REUSE_BASE", "0").lower() in ("1", "true", "yes")


def clear() -> None:
    """Drop the kept base (its memory is freed once no job holds a reference to it)."""
    _kept.clear()


def kept_key() -> str | None:
    """The identity of the base kept now (None: none is kept)."""
    return _kept[0].key if _kept else None


def base_key(settings: ModelSettings, seed: int, labels: list[str] | None) -> str | None:
    """What the loaded weights depend on, as a string; None for a base that is never kept."""
    if settings.quantization != "none":
        return None
    parts: dict[str, Any] = {"model": dataclasses.asdict(settings), "labels": list(labels or [])}
    parts["model"].pop("target_modules", None)  # what a method adapts, not what is loaded
    if settings.source == "random" and not settings.path:
        parts["seed"] = seed
    if settings.path:
        parts["files"] = _fingerprint(settings.path)
    return json.dumps(parts, sort_keys=True, default=str)


def load_base(settings: ModelSettings, seed: int = 0, labels: list[str] | None = None):
    """``(model, tokenizer, reused)``: :func:`ftlab.models.load_model`'s result, from the kept
    base when there is a matching one (``reused=True``), else loaded (and kept, if keeping)."""
    key = base_key(settings, seed, labels) if _state["keep"] else None
    if key is None:
        model, tokenizer = load_model(settings, seed=seed, labels=labels)
        return model, tokenizer, False
    entry = _kept[0] if _kept and _kept[0].key == key else None
    if entry is not None and (not entry.draws_random or torch.equal(torch.get_rng_state(), entry.rng_before)):
        model, tokenizer = copy.deepcopy(entry.model), copy.deepcopy(entry.tokenizer)
        if entry.draws_random:
            torch.set_rng_state(entry.rng_after)
        say(f"ftlab: base model {settings.name!r} reused from the previous job of this process (a fresh copy)")
        return model, tokenizer, True
    clear()  # the old base's memory goes before the new one loads
    before = torch.get_rng_state()
    model, tokenizer = load_model(settings, seed=seed, labels=labels)
    after = torch.get_rng_state()
    _kept.append(_Entry(key, copy.deepcopy(model), copy.deepcopy(tokenizer), before, after))
    return model, tokenizer, False


def _fingerprint(path: str) -> list:
    """``(name, size, mtime)`` of a local file, or of the files directly in a local directory."""
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(root.iterdir()) if root.is_dir() else []
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
