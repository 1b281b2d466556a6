"""Peak RSS of one training step, plain cross-entropy (``loss.chunk_size=0``) against chunked.

One process, one model: SmolLM2-135M (``conf/model/smollm2-135m.yaml``) with LoRA r=8 on q, v
(dropout 0), AdamW. The batch is fixed: ``--batch`` rows of ``--seq-len`` random token ids,
the first ``--prompt`` labels of each row -100 (a masked prompt). One step is
``ftlab.training.loss.loss_sum`` -> mean over scored tokens -> backward -> optimizer step -> zero_grad,
the same loss the training module computes. Steps alternate plain, chunked, plain, ... after
one warm-up step of each, so drift in the machine's load hits both alike.

Measured per step: the process's resident set size, sampled every millisecond by a thread
(``/proc/self/statm``) during the step, minus the RSS just before the step (after
``malloc_trim(0)``, so memory freed by the previous step is given back first). Reported:
medians over the ``--repeats`` steps of each kind, the absolute peak RSS, and the step times.

    python bench/loss_memory.py                     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time

import torch
import yaml

from ftlab.settings import config_dir
from ftlab.config import ModelSettings
from ftlab.training.loss import loss_sum
from ftlab.methods import build_method
from ftlab.models import load_model

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    def __enter__(self):
        self.peak, self._stop = rss(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=240)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    libc = ctypes.CDLL("libc.so.6")

    settings = ModelSettings(**yaml.safe_load((config_dir() / "model" / "smollm2-135m.yaml").read_text()))
    base, _ = load_model(settings)
    model = build_method("lora", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]).apply(base, 100)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step(chunk: int) -> tuple[float, float, float]:
        libc.malloc_trim(0)
        before = rss()
        start = time.perf_counter()
        with PeakRSS() as peak:
            s = loss_sum(model, inputs, labels, chunk)
            loss = s.total / s.count
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (peak.peak - before) / MIB, time.perf_counter() - start, peak.peak / MIB

    results: dict[int, list[tuple[float, float, float]]] = {0: [], args.chunk: []}
    for chunk in (0, args.chunk):  # warm-up
        step(chunk)
    for _ in range(args.repeats):
        for chunk in (0, args.chunk):
            results[chunk].append(step(chunk))
    print(f"SmolLM2-135M LoRA q,v r=8, batch {args.batch} x {args.seq_len} tokens "
          f"({args.batch * (args.seq_len - args.prompt)} scored), {torch.get_num_threads()} threads")
    for chunk, rows in results.items():
        name = "plain" if chunk == 0 else f"chunked ({chunk})"
        print(f"{name:>16}: peak RSS over pre-step {statistics.median(r[0] for r in rows):7.0f} MiB "
              f"(runs: {', '.join(f'{r[0]:.0f}' for r in rows)}), absolute peak RSS "
              f"{statistics.median(r[2] for r in rows):.0f} MiB, step {statistics.median(r[1] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
