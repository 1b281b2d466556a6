"""conf/optimizer/: every option builds; bitsandbytes' 8-bit AdamW trains on the CPU with 8-bit
states, over the methods' parameter groups, and its state survives a checkpoint and a resume;
the paged optimizers, which need CUDA unified memory, are refused on the CPU before any weight
loads (and train on a GPU, where there is one)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, TINY, assert_usage_error, run_cli
from ftlab.errors import ConfigError
from ftlab.training.optim import check_optimizer, is_paged

OPTIONS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))
BITSANDBYTES = ["adamw8bit", "paged_adamw", "paged_adamw8bit"]
ON_CPU = {"adamw", "sgd", "adamw8bit"}  # the others page through CUDA unified memory
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def settings_for(option: str, *overrides: str, tmp: Path = Path(".")):
    from tiny_runs import compose

    from ftlab.settings import settings_from_config

    cfg = compose(f"optimizer={option}", "model=tiny-llama", *overrides)
    return settings_from_config(cfg, str(tmp))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from tiny_runs import one_thread

    yield from one_thread()


# ------------------------------------------------------------------------------ the options
def test_the_bitsandbytes_options_are_there():
    assert set(BITSANDBYTES) <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_composes_and_builds_over_parameter_groups(option, tmp_path):
    """One step over two groups, as FinetuneModule builds them (the first with the settings'
    rate and decay, the second a LoRA+-style group of its own), from p = 1 with gradient 1:
    each parameter moves to 1 - lr * (1 + wd) with its own group's values. (AdamW's first step
    is lr * g / (|g| + eps) plus the decoupled decay lr * wd * p; SGD's is lr * (g + wd * p),
    its momentum buffer starting at the gradient. All tensors here are below bitsandbytes'
    min_8bit_size, so its optimizers keep 32-bit moments and step like torch's.)"""
    s = settings_for(option, "optimizer.lr=2e-3", "optimizer.weight_decay=0.1", tmp=tmp_path)
    a, b = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4))
    opt = s.optimizer.factory([{"params": [a], "lr": s.optimizer.lr, "weight_decay": s.optimizer.weight_decay},
                               {"params": [b], "lr": 3.2e-2, "weight_decay": 0.0}])
    a.grad, b.grad = torch.ones(4, 4), torch.ones(4)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((4, 4), 1 - 2e-3 * 1.1), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.full((4,), 1 - 3.2e-2), rtol=0, atol=1e-6)
    # Plain Python values only: a checkpoint of them loads with torch.load(weights_only=True).
    for group in opt.param_groups:
        values = [v for k, v in group.items() if k != "params"]
        assert all(type(v).__module__ in ("builtins", "torch") for v in values), group
    assert is_paged(s.optimizer) == option.startswith("paged")


@pytest.mark.parametrize("option", OPTIONS)
def test_options_that_cannot_run_on_the_cpu_are_refused_there(option, tmp_path):
    s = settings_for(option, tmp=tmp_path)
    if option in ON_CPU:
        check_optimizer(s.optimizer, s.hardware)
        return
    with pytest.raises(ConfigError, match="CUDA unified memory"):
        check_optimizer(s.optimizer, s.hardware)
    gpu = dataclasses.replace(s.hardware, accelerator="gpu", devices=1)
    check_optimizer(s.optimizer, gpu, here=False)  # a dry run plans it for a GPU


# ------------------------------------------------------------------- 8-bit AdamW on the CPU
def regression(steps: int, make_optimizer):
    """Fit a 2-layer MLP to a linear target; returns (losses, first-layer update, optimizer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1))  # 8,192-value weight
    x = torch.randn(256, 64)
    y = 2 * x[:, :1] + 0.5
    before = model[0].weight.detach().clone()
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model[0].weight.detach() - before, opt, model


def test_adamw8bit_trains_on_the_cpu_with_8bit_states(tmp_path):
    s = settings_for("adamw8bit", "optimizer.lr=1e-2", "optimizer.weight_decay=0.1", tmp=tmp_path)
    factory = s.optimizer.factory
    losses, moved, opt, model = regression(30, factory)
    assert losses[-1] < 0.05 * losses[0]
    assert moved.abs().max() > 0
    big, small = opt.state[model[0].weight], opt.state[model[0].bias]
    # Block-wise 8-bit moments for the 8,192-value weight: 1 byte each + one absmax per 256.
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8
    assert big["absmax1"].numel() == model[0].weight.numel() // 256
    # The 128-value bias is below min_8bit_size (4096): bitsandbytes keeps 32-bit moments.
    assert small["state1"].dtype == torch.float32


def test_adamw8bit_follows_torch_adamw():
    import bitsandbytes as bnb

    def torch_adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)

    def adamw8bit(params):
        return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.5)

    # The first step is computed from unquantized moments: AdamW's, to rounding.
    _, ref, _, _ = regression(1, torch_adamw)
    _, got, _, _ = regression(1, adamw8bit)
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=0)
    # Later steps read the 8-bit moments back: the same descent, up to quantization noise.
    ref_losses, _, _, _ = regression(30, torch_adamw)
    got_losses, _, _, _ = regression(30, adamw8bit)
    assert got_losses[-1] == pytest.approx(ref_losses[-1], rel=0.1)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, initializer_range=0.2))


@pytest.mark.parametrize("method,kwargs", [
    ("lora_plus", dict(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], ratio=16)),
    ("full", {}),  # weight decay on matrices, none on the norm weights
], ids=["lora_plus", "full"])
def test_adamw8bit_takes_the_methods_groups(method, kwargs, tmp_path):
    """One step of AdamW8bit over the method's groups equals torch's AdamW over the same groups
    (each group's lr and weight decay honoured), with 8-bit states on every tensor of at least
    min_8bit_size values."""
    from ftlab.methods import build_method

    lr, wd = 1e-3, 0.1
    built = build_method(method, **kwargs)
    model = built.apply(_tiny_llama(), 10)
    ids = torch.randint(4, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(factory) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        opt = factory(built.param_groups(model, lr, wd))
        opt.step()
        moved = {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}
        return opt, moved

    s = settings_for("adamw8bit", f"optimizer.lr={lr}", f"optimizer.weight_decay={wd}",
                     "optimizer.min_8bit_size=256", tmp=tmp_path)
    opt, got = step(s.optimizer.factory)
    _, ref = step(lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=wd))
    groups = built.param_groups(model, lr, wd)
    def settings(gs):
        return [(g["lr"], g["weight_decay"]) for g in gs]

    assert settings(opt.param_groups) == settings(groups)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], atol=1e-7, rtol=0, msg=name)
    if method == "lora_plus":
        assert sorted({g["lr"] for g in opt.param_groups}) == [lr, 16 * lr]
        b = max(got[n].abs().max().item() for n in got if "lora_B" in n)
        assert b == pytest.approx(16 * lr, rel=1e-4)  # Adam's first step: lr * sign(g) for B
    else:
        assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, wd]
    for p in (p for g in opt.param_groups for p in g["params"]):
        if p.grad is not None:
            bits = torch.uint8 if p.numel() >= 256 else torch.float32
            assert opt.state[p]["state1"].dtype == bits


# -------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("option,instead", [
    ("paged_adamw", "optimizer=adamw or optimizer=adamw8bit"),
    ("paged_adamw8bit", "optimizer=adamw8bit"),
])
def test_paged_optimizers_are_refused_on_the_cpu_before_any_weight_loads(option, instead, tmp_path):
    proc = run_cli(*TINY, f"optimizer={option}", f"hydra.run.dir={tmp_path}", env=ONE_THREAD)
    name = {"paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}[option]
    assert_usage_error(proc, f"optimizer {name} (bitsandbytes)", "CUDA unified memory",
                       "hardware.accelerator=cpu", instead)
    assert "ftlab: model" not in proc.stdout  # printed when the weights start loading
    assert not (tmp_path / "metrics.json").exists()


def test_a_missing_bitsandbytes_is_one_clear_error(tmp_path):
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    # What a broken install raises: the package is there, its native library is not.
    (fake / "__init__.py").write_text(
        "raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    proc = run_cli(*TINY, "optimizer=adamw8bit", f"hydra.run.dir={tmp_path / 'run'}",
                   env={**ONE_THREAD, "PYTHONPATH": str(tmp_path / "site")})
    assert_usage_error(proc, "optimizer bitsandbytes.optim.AdamW8bit needs the bitsandbytes package",
                       "libbitsandbytes_cpu.so", "pip install 'bitsandbytes>=0.50'",
                       "optimizer=adamw")


def test_a_run_with_adamw8bit_completes_and_checkpoints_8bit_states(tmp_path):
    # min_8bit_size=256: the tiny LoRA matrices (256-512 values) get 8-bit states too.
    proc = run_cli(*TINY, "optimizer=adamw8bit", "optimizer.min_8bit_size=256", "optimizer.lr=1e-2",
                   "eval.before=false", f"hydra.run.dir={tmp_path}", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 3
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    states = ckpt["optimizer_states"][0]["state"]
    assert len(states) == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    for state in states.values():
        quant = state["__bnb_optimizer_quant_state__"]  # bitsandbytes' own layout in state_dict()
        assert quant["state1"].dtype == quant["state2"].dtype == torch.uint8 and state["step"] == 3


def test_resume_with_adamw8bit_continues_exactly(tmp_path_factory, tmp_path):
    from test_resume import EXACT, assert_same_training, crashed_copy, resume
    from tiny_runs import cached_run

    reference = cached_run(tmp_path_factory, *EXACT, "optimizer=adamw8bit",
                           "optimizer.min_8bit_size=256")
    resumed = crashed_copy(reference, tmp_path / "run", keep="step-4.ckpt")
    resume(f"resume={resumed}")
    # The 8-bit moments come back bit for bit: the same losses and adapter, exactly.
    assert_same_training(reference, resumed, from_step=4, tol=0.0)


# -------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option", BITSANDBYTES)
def test_bitsandbytes_optimizers_train_on_cuda(option, tmp_path):
    s = settings_for(option, "optimizer.lr=1e-2", "hardware=gpu", tmp=tmp_path)
    check_optimizer(s.optimizer, s.hardware)  # accepted on a GPU
    torch.manual_seed(0)
    # A 512 x 256 weight: bitsandbytes pages only tensors of at least 1e5 values.
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 1)).cuda()
    x = torch.randn(1024, 256, device="cuda")
    y = 2 * x[:, :1] + 0.5
    before = model[0].weight.detach().clone()
    opt = s.optimizer.factory(model.parameters())
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert (model[0].weight - before).abs().max() > 0
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == (torch.uint8 if "8bit" in option else torch.float32)
    assert getattr(state["state1"], "is_paged", False) == option.startswith("paged")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option", ["paged_adamw", "paged_adamw8bit"])
def test_paged_optimizers_fine_tune_a_llama_through_lightning_on_cuda(option, tmp_path):
    """The path a run takes: FinetuneModule over the method's groups, Lightning's closure step."""
    import lightning as L
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.config import SchedulerSettings
    from ftlab.data.collate import Collator
    from ftlab.methods import build_method
    from ftlab.training.module import FinetuneModule

    s = settings_for(option, "optimizer.lr=1e-2", "hardware=gpu", tmp=tmp_path)
    torch.manual_seed(0)
    # vocabulary 2048 x hidden 64: embeddings and head of 131,072 values each, which are paged.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    method = build_method("full")
    model = method.apply(model, 20)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 2048, (16,), generator=g).tolist() for _ in range(8)]
    loader = DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=8,
                        collate_fn=Collator(pad_id=0))
    module = FinetuneModule(model, method, s.optimizer, SchedulerSettings(name="constant"), 20)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=20, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    losses = [loss for _, loss in module.train_losses]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
    opt = trainer.optimizers[0]
    embed = module.model.get_input_embeddings().weight
    assert getattr(opt.state[embed]["state1"], "is_paged", False)
