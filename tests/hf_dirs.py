"""Hugging Face model directories written by tests: a tiny random model saved with
``save_pretrained`` (weights, config.json, tokenizer files), and the same files laid out as a
Hugging Face hub cache entry, so ``model.path=<dir>`` and ``model.path=Org/Name`` can be run
offline exactly as a user's downloaded model would be."""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def save_tiny_model(directory: Path, family: str = "tiny-llama", arch: dict | None = None) -> Path:
    """``conf/model/<family>.yaml``'s random tiny model and its byte-level tokenizer, saved to
    ``directory`` as a plain transformers model directory; ``arch`` replaces the family's
    architecture (another ``model_type`` at tiny size, e.g. Falcon)."""
    from ftlab.config import ModelSettings, build
    from ftlab.models import load_model

    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{family}.yaml"))
    if arch is not None:
        values["arch"] = dict(arch)
    model, tokenizer = load_model(build(ModelSettings, values, "model"), seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def hub_cache_entry(cache: Path, repo_id: str, model_dir: Path,
                    commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """``model_dir``'s files as the hub cache holds a download of ``repo_id``:
    ``models--Org--Name/snapshots/<commit>/`` and ``refs/main`` naming that commit.
    Point ``HF_HUB_CACHE`` at ``cache`` to use it."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    return snapshot
