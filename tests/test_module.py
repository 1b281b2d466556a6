"""FinetuneModule drives any object that implements the Method interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.data.collate import Collator
from ftlab.methods.base import PlainHooks, default_param_groups
from ftlab.training.module import FinetuneModule
from ftlab.training.optim import lr_lambda


@dataclass
class RecordingMethod(PlainHooks):
    """A method that trains only the lm_head, with its own learning-rate multiplier."""

    name: str = "recording"
    steps_seen: list[tuple[int, int]] = field(default_factory=list)
    grad_seen: list[bool] = field(default_factory=list)

    def check(self, model): pass

    def apply(self, model, total_steps):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("lm_head"))
        return model

    def param_groups(self, model, lr, weight_decay):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 3 * lr}]

    def after_optimizer_step(self, model, step, total_steps):
        self.steps_seen.append((step, total_steps))

    def state_dict(self): return {"seen": len(self.steps_seen)}
    def load_state_dict(self, state): pass
    def save(self, model, directory): pass
    def load(self, model, directory): return model


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def batches(n: int = 8):
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        ids = torch.randint(3, 64, (6 + i % 3,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return DataLoader(examples, batch_size=4, collate_fn=Collator(pad_id=0))


def fit(method, steps=4, lr=1e-2, schedule=SchedulerSettings(name="constant")):
    model = method.apply(tiny_model(), steps)
    module = FinetuneModule(model, method, OptimizerSettings(factory=torch.optim.SGD, lr=lr), schedule, steps)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=batches())
    return module, trainer


def test_optimizer_gets_the_methods_groups_and_only_trainable_parameters():
    method = RecordingMethod()
    module, trainer = fit(method)
    opt = trainer.optimizers[0]
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(3e-2)]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) == 1


def test_method_hook_runs_after_every_optimizer_step_with_the_true_total():
    method = RecordingMethod()
    fit(method, steps=4)
    assert method.steps_seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_frozen_parameters_do_not_move_and_trainable_ones_do():
    method = RecordingMethod()
    before = {n: p.detach().clone() for n, p in method.apply(tiny_model(), 1).named_parameters()}
    module, _ = fit(method)
    for n, p in module.model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == n.startswith("lm_head"), n


def test_throughput_counts_real_tokens():
    module, _ = fit(RecordingMethod(), steps=2)
    t = module.throughput()
    real = sum(int(b["attention_mask"].sum()) for b in list(batches())[:2])
    assert module.tokens_real == real
    # Lengths 6 + i % 3 in order, 4 a batch: (6, 7, 8, 6) and (7, 8, 6, 7), each padded to 8:
    # 27 + 28 real tokens of 2 x 4 x 8 computed.
    assert real == 55 and t["padding_efficiency"] == pytest.approx(55 / 64)
    assert t["tokens_per_second"] > 0


@pytest.mark.parametrize("name,expect", [
    ("constant", [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]),
    ("linear", [0.25, 0.5, 0.75, 1.0, 0.8, 0.6, 0.4, 0.2]),
])
def test_schedules_with_warmup(name, expect):
    f = lr_lambda(SchedulerSettings(name=name, warmup_steps=3), total_steps=8)
    assert [round(f(t), 6) for t in range(8)] == pytest.approx(expect)


def test_cosine_ends_at_the_floor():
    f = lr_lambda(SchedulerSettings(name="cosine", warmup_steps=2, min_lr_ratio=0.1), total_steps=10)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)


def test_default_groups_skip_weight_decay_on_biases_and_norms():
    model = tiny_model()
    groups = default_param_groups(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), n
    assert groups[1]["weight_decay"] == 0.0


def _bare_module() -> FinetuneModule:
    return FinetuneModule(nn.Linear(1, 1), RecordingMethod(), OptimizerSettings(factory=torch.optim.SGD, lr=0.1),
                          SchedulerSettings(name="constant"), 1)


def test_throughput_is_the_median_after_the_first_step():
    module = _bare_module()
    assert module.throughput() == {"tokens_per_second": 0.0, "step_time_s": 0.0, "padding_efficiency": 0.0}
    module.step_times, module.step_tokens = [10.0], [30]
    assert module.throughput()["tokens_per_second"] == 3.0  # one step: it counts, warm-up or not
    # steps 2-4: 20 tokens in 2 s, 20 in 4 s, 30 in 1 s -> rates 10, 5, 30 (median 10), times median 2
    module.step_times, module.step_tokens = [10.0, 2.0, 4.0, 1.0], [5, 20, 20, 30]
    module.tokens_real, module.tokens_computed = 75, 100
    assert module.throughput() == {"tokens_per_second": 10.0, "step_time_s": 2.0, "padding_efficiency": 0.75}


def test_a_step_logs_its_rate_loss_throughput_and_memory():
    module, trainer = fit(RecordingMethod(), steps=2)
    logged = trainer.callback_metrics
    assert {"train/lr", "train/loss", "train/tokens_per_sec", "train/peak_memory_mb"} <= set(logged)
    assert float(logged["train/lr"]) == pytest.approx(3e-2)  # the method's group: 3 x lr
    assert float(logged["train/loss"]) == module.train_losses[-1][1] and "train/loss" in trainer.progress_bar_metrics
    assert [s for s, _ in module.train_losses] == [1, 2]
