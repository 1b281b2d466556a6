"""Every registered method on one model: trainable parameters, base weights, activations, memory, time.

Each method runs in its own child process (``--one NAME`` prints one JSON line), so none inherits
another's allocations. The child composes ``conf/train.yaml`` with Hydra (``model=<--model>
method=NAME optimizer=adamw hardware=cpu``, 32-true): every method at its ``conf/method/NAME.yaml``
defaults (``${model.target_modules}`` -> the model's, e.g. q_proj, v_proj). Then ftlab's run:
``preflight``, ``load_model`` with the base quantization the method needs (QLoRA: nf4, with its
gradient checkpointing), ``method.apply`` under the seed, the module's optimizer (the method's
``build_optimizer`` hook, else AdamW over ``param_groups``). Extra row ``vera (r=8)``: VeRA at LoRA's rank.

Fixed batch, the same for all: ``--batch-size`` x ``--seq-len`` real tokens of ``builtin:tasks.jsonl``
(Alpaca template, response-only labels) packed back to back by ``bench/step_time.py``'s
``fixed_batch``; prompt methods prepend their virtual tokens. A step: forward, ``backward``,
``optimizer.step``, ``method.after_optimizer_step``, ``zero_grad`` (Lightning's order). One warm-up
step, one measured-memory step, then ``--steps`` timed steps. MB = 2^20 bytes.

- *trainable params*, *% of total*: ``count_parameters`` after ``apply`` (4-bit weights as values).
- *base weight MB*: the parameters that existed before ``apply`` (tied once), plus 4-bit
  quantization state (absmax, code, nested state).
- *saved activations MB*: storages autograd saves for backward in the measured step's forward
  (``saved_tensors_hooks``), each once, not counting storages alive before it (weights, batch).
  Gradient-checkpointed layers save nothing here (their kept inputs are not counted).
- *peak MB*: peak live tensor bytes in the measured step: storages reachable from Python before
  it (``gc``: weights, optimizer state, batch) + the highest running sum of the CPU allocator's
  allocations and frees during it (``torch.profiler(profile_memory=True)``, as tests/test_plan.py
  measures a peak); no Python/torch runtime (the child's peak RSS is in the JSON, ``peak_rss_mb``).
- *step s*: median wall time (``time.perf_counter``) of the timed steps.

    python bench/methods.py --out methods.json          # SmolLM2-135M, every method
    python bench/methods.py --model tiny-llama --steps 1 --methods lora,lora_fa   # checks the script
    python bench/methods.py --model smollm2-135m,tiny-llama,tiny-gpt2,minilm-l6 --methods lora   # the zoo
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):  # ftlab from this checkout; bench/step_time.py's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MB = 2**20
EXTRA = {"vera": ("vera (r=8)", ["method.r=8"])}  # method -> (label, overrides) of its extra row


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ one method
def compose_settings(model: str, method: str, overrides: list[str], batch_size: int, run_dir: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.settings import config_dir, settings_from_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        from omegaconf import OmegaConf

        heads = OmegaConf.load(config_dir() / "model" / f"{model}.yaml").get("tasks", ["causal_lm"])
        data = [] if "causal_lm" in heads else ["data=classification"]  # an encoder classifies
        cfg = compose("train", overrides=[f"model={model}", *data, f"method={method}", *overrides, "optimizer=adamw",
                                          "hardware=cpu", "logger=none", f"data.batch_size={batch_size}"])
    GlobalHydra.instance().clear()
    return settings_from_config(cfg, run_dir)


def classification_batch(tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """For a classifier (``task: seq_cls``): the same built-in text, ``batch_size`` rows of
    ``seq_len`` tokens packed back to back, one label per row, so its step is timed on the same
    number of tokens as a language model's."""
    from ftlab.data.records import builtin_dir

    text = " ".join(" ".join(str(v) for v in json.loads(line).values())
                    for line in (builtin_dir() / "tasks.jsonl").read_text().splitlines() if line.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch_size * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    input_ids = torch.tensor(ids).view(batch_size, seq_len)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.arange(batch_size) % 2}


def _tensors_in(obj, depth: int = 0):
    """Tensors held by ``obj`` or its attributes (a 4-bit weight's nested quantization state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors_in(value, depth + 1)


def base_weight_bytes(model, base_ids: set[int]) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size() for p in model.parameters() if id(p) in base_ids
            for t in (p, *_tensors_in(getattr(p, "quant_state", None)))}
    return sum(seen.values())


def live_storages() -> dict[int, int]:
    """data_ptr -> nbytes of every tensor storage reachable from Python."""
    storages = (o.untyped_storage() for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and not o.is_meta)
    return {st.data_ptr(): st.nbytes() for st in storages if st.data_ptr()}


def measure_one(args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from ftlab.training.hardware import enable_gradient_checkpointing, keep_trainable_in_fp32
    from ftlab.methods import count_parameters
    from ftlab.methods.quantized import base_quantization
    from ftlab.models import load_model
    from ftlab.training.optim import build_optimizer
    from ftlab.run import preflight
    from step_time import fixed_batch

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as ftlab.run.train sets it
    with tempfile.TemporaryDirectory(prefix="ftlab-bench-") as tmp:
        s = compose_settings(args.model, args.one, args.set, args.batch_size, tmp)
        method = preflight(s)
        quantization = base_quantization(method, s.model.quantization)  # QLoRA: nf4
        model_settings = dataclasses.replace(s.model, quantization=quantization)
        labels = ["negative", "positive"] if s.model.task == "seq_cls" else None
        model, tokenizer = load_model(model_settings, seed=s.seed, labels=labels)
        batch = (fixed_batch(s, tokenizer, args.batch_size, args.seq_len) if labels is None
                 else classification_batch(tokenizer, args.batch_size, args.seq_len))
    if s.hardware.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    base_ids = {id(p) for p in model.parameters()}
    total_steps = args.steps + 2
    torch.manual_seed(s.seed)  # adapters draw their initial weights from the global generator
    model = method.apply(model, total_steps)
    keep_trainable_in_fp32(model, s.hardware.precision)
    trainable, total = count_parameters(model)
    lr, wd = s.optimizer.lr, s.optimizer.weight_decay
    own = getattr(method, "build_optimizer", None)  # as FinetuneModule.configure_optimizers
    optimizer = ((own(model, lr, wd) if own else None)
                 or build_optimizer(s.optimizer, method.param_groups(model, lr, wd)))
    model.train()

    def step(i: int, hooks=None) -> None:
        with torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, i, total_steps)  # before zero_grad: AdaLoRA reads grads
        optimizer.zero_grad(set_to_none=True)

    step(1)  # warm-up: allocates the optimizer state
    gc.collect()
    before, saved = live_storages(), {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in before:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(2, (pack, lambda t: t))
    live = rise = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        rise = max(rise, live)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(3 + i)
        times.append(time.perf_counter() - t0)
    return {"method": args.label or args.one, "trainable_params": trainable, "total_params": total,
            "base_weight_mb": base_weight_bytes(model, base_ids) / MB,
            "saved_activations_mb": sum(saved.values()) / MB, "peak_mb": (sum(before.values()) + rise) / MB,
            "step_s": statistics.median(times), "step_times_s": times, "config": s.method,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "quantization": quantization, "checkpointing": s.hardware.gradient_checkpointing
            or (method.traits.gradient_checkpointing and quantization != "none")}


# ------------------------------------------------------------------------------ all methods
def run_child(args: argparse.Namespace, model: str, name: str, label: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--label", label, "--model", model, "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads), *(f"--set={o}" for o in overrides)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"{model} {label}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}")
        return {"model": model, "method": label, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    row = {"model": model, **json.loads(proc.stdout.strip().splitlines()[-1])}
    log(f"{model} {label}: {row['trainable_params']:,} trainable, step {row['step_s']:.3g} s "
        f"({time.perf_counter() - t0:.0f} s with loading)")
    return row


def table(rows: list[dict], models: list[str]) -> str:
    """One row per (model, method); a model column when more than one model ran."""
    many = len(models) > 1
    lines = [("| model " if many else "") + "| method | trainable params | % of total | base weight MB "
             "| saved activations MB | peak MB | step s |",
             ("|---" if many else "") + "|---|---:|---:|---:|---:|---:|---:|"]
    done = (r for r in rows if "error" not in r)
    for r in sorted(done, key=lambda r: (models.index(r["model"]), r["trainable_params"], r["method"])):
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append((f"| {r['model']} " if many else "")
                     + f"| {r['method']} | {r['trainable_params']:,} | {share:.3f} | {r['base_weight_mb']:.2f} "
                     f"| {r['saved_activations_mb']:.2f} | {r['peak_mb']:.2f} | {r['step_s']:.3g} |")
    return "\n".join(lines)


CHECKS = [  # (what, row a, row b, column, a < b * factor, format)
    ("LoRA-FA saves fewer activations than LoRA", "lora_fa", "lora", "saved_activations_mb", 1, "{:.2f} MB"),
    ("QLoRA base weights < 1/3 of the fp32 base", "qlora", "lora", "base_weight_mb", 1 / 3, "{:.2f} MB"),
    ("VeRA trains << LoRA at r=8 (< 1/10)", "vera (r=8)", "lora", "trainable_params", 1 / 10, "{:,}"),
]


def checks(rows: list[dict]) -> list[dict]:
    """The three expectations from the papers: measured numbers, their ratio, PASS/FAIL (rows
    of one model)."""
    by = {r["method"]: r for r in rows if "error" not in r}
    out = []
    for what, a, b, col, factor, fmt in CHECKS:
        if a not in by or b not in by:
            out.append({"check": what, "result": "SKIPPED", "measured": f"needs rows {a!r} and {b!r}"})
            continue
        x, y = by[a][col], by[b][col]
        out.append({"check": what, "result": "PASS" if x < y * factor else "FAIL",
                    "measured": f"{a} {fmt.format(x)} vs {b} {fmt.format(y)} (ratio {x / y:.4f})"})
    if "vera" in by and "lora" in by:  # the default ranks differ (256 vs 8): shown, not judged
        v, lo = by["vera"], by["lora"]
        out.append({"check": "VeRA vs LoRA at their default ranks", "result": "INFO",
                    "measured": f"vera r={v['config'].get('r')} {v['trainable_params']:,} vs "
                                f"lora r={lo['config'].get('r')} {lo['trainable_params']:,}"})
    return out


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    from ftlab.methods import available
    from step_time import model_choices

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="conf/model/<name>.yaml; comma-separated for several models in one run")
    p.add_argument("--methods", default=",".join(available()), help="comma-separated method names")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after a warm-up and a memory step)")
    p.add_argument("--batch-size", type=int, default=8, help="rows in the fixed batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row in the fixed batch")
    p.add_argument("--threads", type=int, default=cores, help="torch.set_num_threads in every child")
    p.add_argument("--out", type=Path, help="write the rows and checks as JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one method, print JSON
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # Hydra overrides
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.model_list = [m.strip() for m in args.model.split(",") if m.strip()]
    if unknown := sorted(set(args.model_list) - set(model_choices())):
        p.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(model_choices())}")
    if args.one and len(args.model_list) != 1:
        p.error("--one measures one model")
    if unknown := sorted(set(args.method_list) - set(available())):
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(available())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)), flush=True)
        return 0
    methods = [(m, m, []) for m in args.method_list]
    methods += [(m, *EXTRA[m]) for m in args.method_list if m in EXTRA]
    # Models interleaved method by method, so a change in machine load hits all of them alike.
    jobs = [(model, *m) for m in methods for model in args.model_list]
    load_before = os.getloadavg()
    rows = [run_child(args, *job) for job in jobs]
    report = [c for model in args.model_list for c in checks([r for r in rows if r["model"] == model])
              if len(args.model_list) == 1 or c["result"] != "SKIPPED"]
    print(f"model {args.model}, fixed batch {args.batch_size} x {args.seq_len} tokens of builtin:tasks.jsonl "
          f"(packed), AdamW, 1 warm-up + 1 memory step + median of {args.steps} timed step(s), "
          f"threads {args.threads}, torch {torch.__version__}, one child process per method")
    print("load average (1, 5, 15 min) at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}\n"
          .format(*load_before, *os.getloadavg()))
    print(table(rows, args.model_list) + "\n")
    for c in report:
        print(f"- {c['result']}: {c['check']}: {c['measured']}")
    for r in rows:
        if "error" in r:
            print(f"- ERROR: {r['model']} {r['method']} did not run: {r['error']}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "batch_size": args.batch_size,
                                        "seq_len": args.seq_len, "steps": args.steps, "threads": args.threads,
                                        "torch": torch.__version__, "rows": rows, "checks": report}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
