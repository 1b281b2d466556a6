"""Every registered method (and native backend) in every precision a sweep compares, on the
tiny Llama, through Lightning as a run trains (``FinetuneModule``, ``Trainer(precision=...)``,
``keep_trainable_in_fp32``):

1. a few optimizer steps in bf16-mixed and bf16-true give the losses of 32-true, to bf16 rounding;
2. the trainable set (names and shapes) is the same in the three precisions;
3. the saved artifact, loaded onto a fresh base by ftlab (``Method.load``), and by plain peft
   where it is peft's format, gives the trained model's validation loss, within TOLERANCE.

Tolerances (absolute, on a validation loss of about 6.9 nats; measured maxima in brackets):
- 32-true: 1e-5 (9.5e-7: PiSSA's rank-2r LoRA and Delta-LoRA's LoRA over W0, fp32 reassociation;
  every artifact copied as trained: 0);
- bf16-mixed: 1e-3 for an artifact holding the trained tensors (0; plain peft's VeRA over the
  native one 2.1e-4, peft computes the branch in another order under autocast); 1e-2 for one
  re-expressed in another form, whose matmuls autocast differently: PiSSA (1.8e-3), Delta-LoRA
  read by plain peft (3.9e-3: LoRA over W0 instead of W = W0 + D), p-tuning and prefix tuning,
  whose encoder output is saved computed once in fp32 where training ran it in bf16 (7.9e-4);
- bf16-true: 1e-3, 1e-2 re-expressed (all 0 measured: every tensor and op is bf16 either way).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.training.hardware import keep_trainable_in_fp32
from ftlab.training.module import FinetuneModule
from tiny_runs import one_thread

from .test_matrix import base_model
from .tiny import LLAMA, build, cases

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
# Delta-LoRA's K = 500 would keep W still in a short run: from K = 0, W moves at step 2.
CASES = [(case, name, {**overrides, **({"start_step": 0} if name == "delta_lora" else {})})
         for case, name, overrides in cases()]
STEPS = 2
# Saved in another form than trained (see the module docstring).
REEXPRESSED = {"pissa", "delta_lora", "p_tuning", "prefix_tuning"}
TOLERANCE = {"32-true": 1e-5, "bf16-mixed": 1e-3, "bf16-true": 1e-3}
REEXPRESSED_TOLERANCE = {"32-true": 1e-5, "bf16-mixed": 1e-2, "bf16-true": 1e-2}
LR = 1e-2
# bf16 against 32-true, absolute, on losses of about 6.9 nats (measured maxima in brackets): the
# first training loss 0.02 (6.7e-3, prefix tuning in bf16-true); the validation loss after the
# steps 0.2 (7.1e-2, LoRA+ in bf16-mixed, whose B steps at 16 x LR).
FIRST_LOSS_TOLERANCE = 0.02
VAL_LOSS_TOLERANCE = 0.2


def train_batches() -> DataLoader:
    # batch_size=None: the loader hands out the ready batches as they are.
    return DataLoader([LLAMA.batch(rows=4, length=10, seed=s) for s in range(STEPS)], batch_size=None)


def val_batches() -> DataLoader:
    return DataLoader([LLAMA.batch(rows=4, length=10, seed=100)], batch_size=None)


def trainer(precision: str, steps: int = STEPS) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False)


def module(model, method) -> FinetuneModule:
    return FinetuneModule(model, method, OptimizerSettings(factory=torch.optim.AdamW, lr=LR),
                          SchedulerSettings(name="constant"), STEPS)


def val_loss(model, method, precision: str) -> float:
    t = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, inference_mode=False)
    return t.validate(module(model, method), dataloaders=val_batches(), verbose=False)[0]["val/loss"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


_trained: dict[tuple[str, str], dict] = {}


def trained(case: str, precision: str) -> dict:
    """Train ``case`` in ``precision`` once per session (the three tests share the runs)."""
    key = (case, precision)
    if key not in _trained:
        _, name, overrides = next(c for c in CASES if c[0] == case)
        torch.manual_seed(0)
        method = build(name, **overrides)
        model = method.apply(base_model(method, LLAMA), STEPS)
        keep_trainable_in_fp32(model, precision)
        m = module(model, method)
        losses = []
        m.on_train_batch_end = lambda out, batch, i: losses.append(float(out["loss"] if isinstance(out, dict) else out))
        trainer(precision).fit(m, train_dataloaders=train_batches())
        _trained[key] = {"name": name, "overrides": overrides, "method": method, "model": m.model,
                         "losses": losses, "val_loss": val_loss(m.model, method, precision),
                         "trainable": {n: tuple(p.shape) for n, p in m.model.named_parameters() if p.requires_grad}}
    return _trained[key]


MATRIX = [(case, precision) for case, _, _ in CASES for precision in PRECISIONS]


@pytest.mark.parametrize("case,precision", MATRIX, ids=[f"{c}-{p}" for c, p in MATRIX])
def test_trains_with_the_loss_of_the_fp32_run(case, precision):
    """The first loss is taken before any update, on the same weights and batch: it differs from
    the 32-true one by bf16 rounding only. The validation loss after the steps differs by that
    rounding carried through two updates. A precision that broke training (a NaN, a wrong cast,
    a weight left out of the update) is far outside both."""
    t, reference = trained(case, precision), trained(case, "32-true")
    assert len(t["losses"]) == STEPS and all(math.isfinite(x) for x in t["losses"]), t["losses"]
    assert t["losses"][0] == pytest.approx(reference["losses"][0], abs=FIRST_LOSS_TOLERANCE)
    assert t["val_loss"] == pytest.approx(reference["val_loss"], abs=VAL_LOSS_TOLERANCE)


@pytest.mark.parametrize("case", [c for c, _, _ in CASES])
def test_trainable_set_is_the_same_in_every_precision(case):
    sets = {p: trained(case, p)["trainable"] for p in PRECISIONS}
    assert sets["bf16-mixed"] == sets["32-true"] and sets["bf16-true"] == sets["32-true"]


@pytest.mark.parametrize("case,precision", MATRIX, ids=[f"{c}-{p}" for c, p in MATRIX])
def test_saved_artifact_reproduces_the_validation_loss(case, precision, tmp_path):
    t = trained(case, precision)
    tol = (REEXPRESSED_TOLERANCE if t["name"] in REEXPRESSED else TOLERANCE)[precision]
    t["method"].save(t["model"], tmp_path)
    fresh = build(t["name"], **t["overrides"])
    loaded = fresh.load(base_model(fresh, LLAMA), tmp_path)
    assert val_loss(loaded, fresh, precision) == pytest.approx(t["val_loss"], abs=tol)
    if (tmp_path / "adapter_config.json").is_file():  # peft's format: plain peft reads it too
        plain = PeftModel.from_pretrained(base_model(fresh, LLAMA), str(tmp_path))
        assert val_loss(plain, fresh, precision) == pytest.approx(t["val_loss"], abs=tol)
