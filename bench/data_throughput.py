"""Useful tokens per second for three ways of batching the same data, side by side.

Useful tokens are the real (non-padding) tokens a training step processes; useful tokens per
second is what the time spent on padding costs. The three batchings of ftlab's data module:

- **pad to max_length** (``data.padding=max_length``): every example padded to
  ``max_length`` tokens, as many tutorials (and Hugging Face's ``padding="max_length"``) do;
- **dynamic padding** (``data.padding=longest``, ftlab's default): each batch padded to its
  own longest example;
- **packing** (``data.packing=true``): whole examples packed into rows of ``max_length``
  tokens, position ids restarting per example so attention stays inside each example.

All three run in ONE process on the same model (``conf/model/<model>.yaml`` + LoRA r=8,
alpha=16 on q_proj, v_proj, the ``conf/method/lora.yaml`` dropout; AdamW, lr 1e-4), on the
training split of the built-in instruction data (``conf/data/tasks.yaml``: 356 examples,
Alpaca template, response-only labels), with the same ``--batch-size`` sequences per step
(examples, or packed rows). Each mode has its own shuffled data loader; the model keeps
training across modes (its weights do not change the cost of a step).

A step is ``model(**batch)``, ``loss.backward()``, ``optimizer.step()``, ``zero_grad()``,
timed with ``time.perf_counter``. ``--warmup`` steps per mode are run first and discarded;
then ``--blocks`` blocks of ``--steps`` steps per mode run interleaved (pad, dynamic, pack,
pad, ...), so drift in the machine's load hits every mode alike. Per block and mode:
useful tokens / seconds. Reported: the median over blocks (and min-max), the padding
efficiency of the batches that ran (real tokens / tokens computed), the speedup over the
pad-to-max_length baseline, and the speedup the efficiencies predict (efficiency of the mode /
efficiency of the baseline: what one would get if a step's time were proportional to the
tokens it computes), with the ratio measured / predicted.

    python bench/data_throughput.py                           # SmolLM2-135M, ~5 min on 2 cores
    python bench/data_throughput.py --model tiny-llama --steps 1 --blocks 2   # checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing ftlab
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MODES = {  # label -> DataSettings changes
    "pad to max_length": {"padding": "max_length", "packing": False},
    "dynamic padding": {"padding": "longest", "packing": False},
    "packing": {"padding": "longest", "packing": True},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compose_settings(model: str, batch_size: int, max_length: int):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.settings import config_dir, settings_from_config

    overrides = [f"model={model}", "method=lora", "method.r=8", "method.alpha=16",
                 "method.target_modules=[q_proj,v_proj]", "data=tasks", f"data.batch_size={batch_size}",
                 f"data.max_length={max_length}", "logger=none", "hardware=cpu"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return settings_from_config(cfg, str(REPO / "outputs" / "bench-unused"))


class Mode:
    """One batching of the data: an endless stream of its training batches."""

    def __init__(self, label: str, data_settings, tokenizer):
        from ftlab.data import DataModule

        self.label = label
        self.data = DataModule(data_settings, tokenizer)
        self.data.check_files()
        self.data.setup("fit")
        self._it = None
        self.rates: list[float] = []
        self.real = self.computed = 0
        self.widths: list[int] = []

    def batch(self):
        while True:
            if self._it is None:
                self._it = iter(self.data.train_dataloader())
            try:
                return next(self._it)
            except StopIteration:
                self._it = None


def run_steps(model, optimizer, mode: Mode, steps: int, record: bool) -> None:
    from ftlab.data.collate import model_inputs, real_tokens

    tokens, seconds = 0, 0.0
    for _ in range(steps):
        batch = mode.batch()
        t0 = time.perf_counter()
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        if record:
            real = real_tokens(batch)
            tokens += real
            mode.real += real
            mode.computed += batch["input_ids"].numel()
            mode.widths.append(batch["input_ids"].shape[1])
    if record:
        mode.rates.append(tokens / seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="an option of conf/model")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (examples or packed rows) per step")
    parser.add_argument("--max-length", type=int, default=256, help="data.max_length (conf/data/tasks.yaml: 256)")
    parser.add_argument("--steps", type=int, default=2, help="steps per mode per block")
    parser.add_argument("--blocks", type=int, default=5, help="interleaved blocks")
    parser.add_argument("--warmup", type=int, default=1, help="discarded steps per mode before timing")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from ftlab.methods import method_from_spec
    from ftlab.models import load_model

    settings = compose_settings(args.model, args.batch_size, args.max_length)
    log(f"loading {args.model} ...")
    model, tokenizer = load_model(settings.model, seed=settings.seed)
    torch.manual_seed(settings.seed)
    model = method_from_spec(settings.method).apply(model, total_steps=1000)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.0)
    torch.manual_seed(settings.seed)  # the loaders' shuffles
    modes = [Mode(label, dataclasses.replace(settings.data, **change), tokenizer)
             for label, change in MODES.items()]

    log(f"warm-up: {args.warmup} step(s) per mode")
    for mode in modes:
        run_steps(model, optimizer, mode, args.warmup, record=False)
    for block in range(args.blocks):
        for mode in modes:
            run_steps(model, optimizer, mode, args.steps, record=True)
        log(f"block {block + 1}/{args.blocks}: " + ", ".join(
            f"{m.label} {m.rates[-1]:.0f} tok/s" for m in modes))

    base = modes[0]
    base_rate, base_eff = statistics.median(base.rates), base.real / base.computed
    st = modes[0].data.stats["train"]
    print(f"Useful tokens per second (non-padding tokens processed per second of training), "
          f"{args.model} + LoRA r=8 (q_proj, v_proj), CPU, {args.threads} threads, fp32; "
          f"built-in instruction data (train split: {st.examples} examples, mean {st.mean_length:.1f} "
          f"tokens, max {st.max_length}), max_length {args.max_length}, {args.batch_size} sequences per "
          f"step; median over {args.blocks} interleaved blocks of {args.steps} steps per mode "
          f"(after {args.warmup} warm-up step(s) per mode).")
    print()
    print("| batching | sequence length per step (median) | padding efficiency (real / computed) "
          "| useful tokens/s, median (min-max) | speedup over pad to max_length | predicted by efficiency "
          "| measured / predicted |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in modes:
        rate, eff = statistics.median(m.rates), m.real / m.computed
        speedup, predicted = rate / base_rate, eff / base_eff
        print(f"| {m.label} | {statistics.median(m.widths):.0f} | {eff:.1%} | {rate:.0f} "
              f"({min(m.rates):.0f}-{max(m.rates):.0f}) | {speedup:.2f}x | {predicted:.2f}x "
              f"| {speedup / predicted:.2f} |")


if __name__ == "__main__":
    main()
