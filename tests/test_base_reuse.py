"""A multirun's jobs reuse the loaded base (ftlab/models/reuse.py): each job gets a fresh copy
that is bit-identical to a fresh load, even after an earlier job changed its own copy in place.

Two jobs run in this process through :func:`ftlab.run.train`, as Hydra's basic launcher runs
them, on a tiny Llama saved to disk (``model.path``): full fine-tuning first (it trains every
base weight in place), then PiSSA (it rewrites W when applied). The state dict the second job
starts from is hashed and compared with a fresh ``load_model``.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from hf_dirs import save_tiny_model
from tiny_runs import compose, one_thread, train_run

import ftlab.run
from ftlab.models import load_model, reuse
from ftlab.settings import settings_from_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
QUICK = ["trainer.max_steps=2", "trainer.limit_val_batches=0", "eval.before=false", "checkpoint.every_n_steps=0",
         "monitor.keep_best=false", "optimizer.lr=5e-2"]


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def keeping():
    reuse.keep_bases(True)
    yield
    reuse.keep_bases(False)


@pytest.fixture
def spy(monkeypatch):
    """Every base a job of ftlab.run.train receives: (model, hash when received, reused)."""
    seen = []
    real = ftlab.run.load_base

    def recording(*args, **kwargs):
        model, tokenizer, reused = real(*args, **kwargs)
        seen.append((model, digest(model), reused))
        return model, tokenizer, reused

    monkeypatch.setattr(ftlab.run, "load_base", recording)
    return seen


def test_second_job_starts_from_the_fresh_base_after_the_first_changed_its_own(tmp_path, keeping, spy):
    base_dir = save_tiny_model(tmp_path / "base")
    model_args = [f"model.path={base_dir}"]
    first = train_run(tmp_path / "full", *QUICK, *model_args, "method=full")
    second = train_run(tmp_path / "pissa", *QUICK, *model_args, "method=pissa", "method.r=4")

    settings = settings_from_config(compose(*model_args), str(tmp_path / "unused")).model
    fresh = digest(load_model(settings)[0])
    (model1, start1, reused1), (model2, start2, reused2) = spy
    assert (reused1, reused2) == (False, True)
    assert (first["base_reused"], second["base_reused"]) == (False, True)
    assert start1 == fresh and start2 == fresh
    # Both jobs did change the copy they were given (full fine-tuning trained W, PiSSA split it),
    # and neither is the kept copy.
    assert digest(model1) != fresh and model2 is not model1
    kept = reuse._kept[0].model
    assert kept is not model1 and kept is not model2 and digest(kept) == fresh


def test_a_reused_base_trains_exactly_as_a_fresh_load(tmp_path, keeping):
    base_dir = save_tiny_model(tmp_path / "base")
    args = [*QUICK, f"model.path={base_dir}", "method=lora", "method.r=4"]
    train_run(tmp_path / "warm", *QUICK, f"model.path={base_dir}", "method=full")  # loads and keeps the base
    reused = train_run(tmp_path / "reused", *args)
    reuse.keep_bases(False)
    fresh = train_run(tmp_path / "fresh", *args)
    assert reused["base_reused"] and not fresh["base_reused"]
    assert reused["train_loss_history"] == fresh["train_loss_history"]


def test_a_load_that_draws_random_numbers_is_reused_only_from_the_same_generator_state(tmp_path, keeping):
    # A classification head is new: transformers initialises it from torch's global generator.
    base_dir = save_tiny_model(tmp_path / "base")
    settings = settings_from_config(compose(f"model.path={base_dir}", "model.task=seq_cls",
                                            "data=classification"), str(tmp_path / "unused")).model
    labels = ["negative", "positive"]

    def load(seed: int):
        torch.manual_seed(seed)
        model, _, reused = reuse.load_base(settings, labels=labels)
        return digest(model), torch.get_rng_state(), reused

    def fresh(seed: int):
        torch.manual_seed(seed)
        return digest(load_model(settings, labels=labels)[0]), torch.get_rng_state()

    first, again, other = load(0), load(0), load(1)
    assert not first[2] and again[2] and not other[2]  # seed 1: the head differs, loaded again
    for (model_hash, rng, _), seed in ((first, 0), (again, 0), (other, 1)):
        want_hash, want_rng = fresh(seed)
        assert model_hash == want_hash and torch.equal(rng, want_rng)
    assert first[0] != other[0]


def test_quantized_bases_and_a_single_run_keep_nothing(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base")
    settings = settings_from_config(compose(f"model.path={base_dir}"), str(tmp_path / "unused")).model
    reuse.keep_bases(False)
    reuse.load_base(settings)
    assert reuse.kept_key() is None  # not a multirun: no second copy held
    nf4 = settings_from_config(compose(f"model.path={base_dir}", "model.quantization=nf4"),
                               str(tmp_path / "unused")).model
    assert reuse.base_key(nf4, 0, None) is None
