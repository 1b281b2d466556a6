"""Training-step time of ftlab's LightningModule against a hand-written PyTorch + peft loop.

Both sides run in ONE process on the same model, batch, method and optimizer:

- **ftlab**: :class:`ftlab.training.module.FinetuneModule` driven by the ``lightning.Trainer`` that
  :func:`ftlab.run._trainer` builds from ftlab's own config (``conf/train.yaml`` composed with
  Hydra), with logger off (``logger=none``), progress bar off, no checkpoint callback
  (``checkpoint.every_n_steps=null``, ``trainer.enable_checkpointing=false``), no validation,
  accelerator ``cpu``, precision ``32-true``.
- **hand-written**: ``loss = model(**batch).loss; loss.backward(); optimizer.step();
  scheduler.step(); optimizer.zero_grad()``.

Each side gets its own freshly loaded copy of the model (``ftlab.models.load_model`` with
``conf/model/<name>.yaml``) and its own LoRA built by ``ftlab.methods.build_method("lora", r=8,
alpha=16, target_modules=[q_proj, v_proj])`` under the same seed; the initial adapter weights are
checked to be identical. Both use AdamW (lr 1e-4, weight decay 0) and a linear decay schedule.

The batch is fixed: the built-in ``builtin:tasks.jsonl`` records, encoded by ftlab's data module
(Alpaca template, response-only labels), concatenated and cut into ``batch_size`` rows of
``seq_len`` real tokens (attention mask all ones). The same tensors feed both sides.

Measurement, for a shared and noisy machine: ``--warmup`` steps per side are run first and
discarded; then ``--blocks`` blocks of ``--steps`` steps per side run interleaved
(hand, ftlab, hand, ftlab, ...), so drift in the machine's load hits both sides alike.

- *per step*: time from the start of one step to the start of the next. Hand-written: each loop
  iteration. ftlab: between consecutive ``on_train_batch_start`` callbacks, so everything the
  loop does per step (the module's logging hooks, metric bookkeeping, fetching the batch) counts;
  a block of N steps gives N-1 such intervals.
- *per fit / steps*: wall time of one ``trainer.fit`` (Trainer construction excluded, fit set-up
  and tear-down included: optimizer construction, data loader, hooks) divided by its steps;
  hand-written: the block's loop wall time divided by its steps.

Reported: medians per step for each side, the spread of the block medians (min-max), and the
ratio ftlab / hand-written with its min-max over (hand block i, ftlab block i) pairs.

``torch.set_num_threads(--threads)`` is set once for the whole process (default: the number of
cores this process may use, ``os.sched_getaffinity``), and checked again inside ``fit``.

    python bench/step_time.py                                  # SmolLM2-135M, ~5 min on 2 cores
    python bench/step_time.py --model tiny-llama --steps 3     # seconds: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing ftlab
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

LR = 1e-4
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- set-up
def model_choices() -> list[str]:
    from ftlab.settings import config_dir

    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def compose_settings(model: str, steps: int, batch_size: int, run_dir: str):
    """ftlab's RunSettings from conf/train.yaml, composed the way the CLI composes a run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.settings import config_dir, settings_from_config

    overrides = [
        f"model={model}", "method=lora", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
        f"method.target_modules=[{','.join(LORA['target_modules'])}]",
        "optimizer=adamw", f"optimizer.lr={LR}", "optimizer.weight_decay=0.0",
        "scheduler.name=linear", "hardware=cpu", "logger=none", "checkpoint.every_n_steps=null",
        f"data.batch_size={batch_size}", "eval.before=false",
        f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    settings = settings_from_config(cfg, run_dir)
    assert settings.hardware.accelerator == "cpu" and str(settings.hardware.precision) == "32-true"
    return settings


def fixed_batch(settings, tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch_size`` x ``seq_len`` real tokens of the configured data, packed back to back."""
    from ftlab.data import InstructionDataModule

    data = InstructionDataModule(settings.data, tokenizer)
    data.setup("fit")
    ids, labels = [], []
    need = batch_size * seq_len
    while len(ids) < need:  # cycle through the records if the data is shorter than the batch
        for example in data.train_set:
            ids += example["input_ids"]
            labels += example["labels"]
            if len(ids) >= need:
                break
    input_ids = torch.tensor(ids[:need]).view(batch_size, seq_len)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor(labels[:need]).view(batch_size, seq_len)}


def lora_model(settings, total_steps: int):
    """A fresh copy of the model with LoRA applied under a fixed seed."""
    from ftlab.methods import method_from_spec
    from ftlab.models import load_model

    model, tokenizer = load_model(settings.model, seed=settings.seed)
    method = method_from_spec(settings.method)
    torch.manual_seed(settings.seed)  # LoRA's A is drawn from the global generator
    return method.apply(model, total_steps), method, tokenizer


def trainable(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------ the two sides
class HandLoop:
    """The minimal loop: forward, backward, optimizer step, schedule step, zero grad."""

    def __init__(self, model, batch, total_steps: int):
        self.model = model
        self.batch = batch
        self.optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=LR, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: max(0.0, 1.0 - t / total_steps))

    def run(self, steps: int) -> tuple[list[float], float]:
        self.model.train()  # from_pretrained returns eval mode; Lightning's fit sets train mode
        times = []
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = self.model(**self.batch).loss
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            times.append(time.perf_counter() - t0)
        return times, time.perf_counter() - start


class StepTimer(L.Callback):
    """perf_counter at every batch start and end; the thread count seen inside fit."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.threads: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.batch


class FtlabLoop:
    """ftlab's FinetuneModule under the Trainer ftlab's run builds; one fit per block."""

    def __init__(self, model, method, settings, batch, total_steps: int, run_dir: Path):
        from ftlab.training.module import FinetuneModule

        self.settings, self.batch, self.run_dir = settings, batch, run_dir
        self.module = FinetuneModule(model, method, settings.optimizer, settings.scheduler, total_steps)
        self.threads_in_fit: set[int] = set()
        self.batch_body: list[float] = []  # on_train_batch_start -> on_train_batch_end

    def run(self, steps: int) -> tuple[list[float], float]:
        from ftlab.run import _trainer

        s = dataclasses.replace(self.settings, trainer={**self.settings.trainer, "max_steps": steps})
        trainer = _trainer(s, self.run_dir, logger=False)
        timer = StepTimer()
        trainer.callbacks.append(timer)
        # batch_size=None: the loader hands over the fixed batch as is, no collation.
        loader = torch.utils.data.DataLoader(_Repeat(self.batch, steps), batch_size=None)
        start = time.perf_counter()
        trainer.fit(self.module, train_dataloaders=loader)
        wall = time.perf_counter() - start
        assert trainer.global_step == steps == len(timer.starts), (trainer.global_step, len(timer.starts))
        self.threads_in_fit.add(timer.threads)
        self.batch_body += [e - s for s, e in zip(timer.starts, timer.ends)]
        return [b - a for a, b in zip(timer.starts, timer.starts[1:])], wall


# ------------------------------------------------------------------------------- report
def fmt(x: float) -> str:
    return f"{x:.4g}"


def table(hand: list[tuple[list[float], float]], ftlab: list[tuple[list[float], float]],
          steps: int) -> str:
    """Markdown: per-step and per-fit medians, block spreads, and ftlab / hand-written ratios."""
    def side(blocks):
        per_step = [t for times, _ in blocks for t in times]
        step_blocks = [statistics.median(times) for times, _ in blocks]
        fit_blocks = [wall / steps for _, wall in blocks]
        return statistics.median(per_step), step_blocks, statistics.median(fit_blocks), fit_blocks

    h_step, h_step_b, h_fit, h_fit_b = side(hand)
    f_step, f_step_b, f_fit, f_fit_b = side(ftlab)
    step_ratios = [f / h for f, h in zip(f_step_b, h_step_b)]
    fit_ratios = [f / h for f, h in zip(f_fit_b, h_fit_b)]

    def spread(xs):
        return f"{fmt(min(xs))}–{fmt(max(xs))}"

    rows = [
        "| loop | per step: median (s) | per step: block medians min–max (s) "
        "| per fit / steps: median (s) | per fit / steps: blocks min–max (s) |",
        "|---|---:|---:|---:|---:|",
        f"| hand-written PyTorch + peft | {fmt(h_step)} | {spread(h_step_b)} | {fmt(h_fit)} | {spread(h_fit_b)} |",
        f"| ftlab FinetuneModule + lightning.Trainer | {fmt(f_step)} | {spread(f_step_b)} "
        f"| {fmt(f_fit)} | {spread(f_fit_b)} |",
        f"| ratio ftlab / hand-written | {f_step / h_step:.3f} | {spread(step_ratios)} (block pairs) "
        f"| {f_fit / h_fit:.3f} | {spread(fit_ratios)} (block pairs) |",
    ]
    return "\n".join(rows)


# ------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=model_choices(),
                   help="model config by name, from conf/model/<name>.yaml")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per block (>= 2)")
    p.add_argument("--blocks", type=int, default=4, help="measured blocks per side, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="discarded steps per side before the blocks")
    p.add_argument("--batch-size", type=int, default=8, help="rows in the fixed batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row in the fixed batch")
    p.add_argument("--threads", type=int, default=cores,
                   help="torch.set_num_threads for the whole process; the default is the usable cores")
    args = p.parse_args(argv)
    for name in ("steps", "blocks", "warmup", "batch_size", "seq_len", "threads"):
        if getattr(args, name) < (2 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'steps' else 1}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # Trainer banners, once per block
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as ftlab.run.train sets it
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="ftlab-bench-") as tmp:
        settings = compose_settings(args.model, args.steps, args.batch_size, tmp)
        total_steps = args.warmup + args.blocks * args.steps
        t0 = time.perf_counter()
        hand_model, _, tokenizer = lora_model(settings, total_steps)
        ftlab_model, ftlab_method, _ = lora_model(settings, total_steps)
        log(f"loaded two copies of {args.model} with LoRA in {time.perf_counter() - t0:.1f} s")
        hand_params, ftlab_params = trainable(hand_model), trainable(ftlab_model)
        assert [n for n, _ in hand_params] == [n for n, _ in ftlab_params]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(hand_params, ftlab_params)), \
            "initial adapter weights differ"
        batch = fixed_batch(settings, tokenizer, args.batch_size, args.seq_len)
        labelled = int((batch["labels"] != -100).sum())
        if not labelled:  # the loss is then NaN; timing is unaffected, but say so
            log("note: the fixed batch holds no response token (all labels -100); use a longer --seq-len")

        hand = HandLoop(hand_model, batch, total_steps)
        ftlab = FtlabLoop(ftlab_model, ftlab_method, settings, batch, total_steps, Path(tmp))

        log(f"warm-up: {args.warmup} step(s) per side (discarded)")
        hand.run(args.warmup)
        ftlab.run(args.warmup)
        ftlab.batch_body.clear()
        results: dict[str, list] = {"hand": [], "ftlab": []}
        for block in range(args.blocks):
            for name, loop in (("hand", hand), ("ftlab", ftlab)):
                times, wall = loop.run(args.steps)
                results[name].append((times, wall))
                log(f"block {block + 1}/{args.blocks} {name:5}: median step {fmt(statistics.median(times))} s, "
                    f"wall/steps {fmt(wall / args.steps)} s")

    threads_seen = sorted(ftlab.threads_in_fit | {torch.get_num_threads()})
    print(f"model {args.model} ({sum(p.numel() for p in hand_model.parameters()):,} parameters), "
          f"LoRA r={LORA['r']} alpha={LORA['alpha']} on {','.join(LORA['target_modules'])}, "
          f"AdamW lr {LR:g}")
    print(f"fixed batch {args.batch_size} x {args.seq_len} tokens of {settings.data.path} "
          f"({labelled} labelled), {args.warmup} warm-up + {args.blocks} blocks x {args.steps} steps "
          f"per side, interleaved hand/ftlab")
    print(f"torch {torch.__version__}, lightning {L.__version__}, threads {args.threads} "
          f"(seen inside fit: {threads_seen}), usable cores {len(os.sched_getaffinity(0))}")
    print("load average (1, 5, 15 min) at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
          .format(*load_before, *os.getloadavg()))
    print()
    print(table(results["hand"], results["ftlab"], args.steps))
    print()
    h = statistics.median(t for times, _ in results["hand"] for t in times)
    f = statistics.median(t for times, _ in results["ftlab"] for t in times)
    print(f"absolute per-step difference (ftlab - hand-written medians): {fmt(f - h)} s")
    print(f"ftlab on_train_batch_start -> on_train_batch_end only (excludes the module's own "
          f"on_train_batch_end logging): median {fmt(statistics.median(ftlab.batch_body))} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
