"""Export a finished run for use without ftlab.

    python -m ftlab.export RUN_DIR --merge OUT     # a standalone Hugging Face model directory
    python -m ftlab.export RUN_DIR --adapter OUT   # the adapter in peft's format, with the tokenizer

``--merge`` folds the trained adapter into the base weights and writes ``model.safetensors``,
``config.json``, the generation config and the tokenizer: ``AutoModelForCausalLM.from_pretrained(OUT)``
loads it, with no peft and no ftlab. Every method whose update is a change of the weights merges
(LoRA and its variants, DoRA, PiSSA, VeRA, (IA)^3, LoHa, LoKr, AdaLoRA, native LoRA/VeRA/LoRA-FA);
Delta-LoRA, which also moved the base weights, is written as its full weights; full fine-tuning
is already a full model. The prompt family (prompt tuning, p-tuning, prefix tuning) adds
virtual tokens rather than changing a weight, and bottleneck adapters are nonlinear: they cannot
merge, and say so. A quantized base (QLoRA's 4-bit NF4) is dequantized to ``model.dtype`` first
(the merged model holds the dequantized weights plus the adapter, in full precision).

``--adapter`` copies the adapter directory (peft's ``adapter_config.json`` +
``adapter_model.safetensors`` for every peft-backed method and for native LoRA, VeRA, LoRA-FA and
Delta-LoRA) and records where the base model lives in ``base_model_name_or_path`` when it is on
disk or on the hub, so ``peft.AutoPeftModelForCausalLM.from_pretrained(OUT)`` finds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ftlab.errors import UserError

PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def say(msg: str) -> None:
    print(msg, flush=True)


def adapter_kind(artifact: Path) -> str:
    """``full``, ``peft:<PEFT_TYPE>`` or ``bottleneck`` for what ``Method.save`` wrote."""
    if (artifact / "adapter_config.json").is_file():
        config = json.loads((artifact / "adapter_config.json").read_text())
        return f"peft:{config.get('peft_type')}"
    if (artifact / "bottleneck_adapter.json").is_file():
        return "bottleneck"
    if (artifact / "config.json").is_file():
        return "full"
    raise UserError(f"{artifact} holds neither a peft adapter, a bottleneck adapter nor a model")


def _refuse_merge(kind: str, method: str) -> None:
    if kind.startswith("peft:") and kind.split(":", 1)[1] in PROMPT_LEARNING:
        raise UserError(
            f"method {method!r} cannot be merged into the base weights: it trains virtual tokens that "
            "are prepended to every input, not a change to any weight. Export the adapter instead "
            "(--adapter OUT); peft.PeftModel.from_pretrained(base, OUT) loads it")
    if kind == "bottleneck":
        raise UserError(
            f"method {method!r} cannot be merged into the base weights: a bottleneck adapter has a "
            "nonlinearity between its two projections, so it is not a change of any weight matrix. "
            "Export the adapter instead (--adapter OUT; ftlab's own format, loaded by ftlab.eval)")


def merge(run_dir: str | Path, out: str | Path, best: bool = False) -> Path:
    """Write the run's model, adapter merged, as a standalone Hugging Face directory ``out``."""
    from ftlab.eval import read_run, run_method, trained_artifact
    from ftlab.methods.peft_methods import base_quantization
    from ftlab.models import load_model
    from ftlab.models.loading import auto_class

    run_dir, out = Path(run_dir), Path(out)
    settings, _ = read_run(run_dir)
    name = settings.method["name"]
    artifact = trained_artifact(run_dir, settings, best)
    kind = adapter_kind(artifact)
    _refuse_merge(kind, name)
    _check_out(out)
    method = run_method(settings)
    quantization = base_quantization(method, settings.model.quantization)

    if kind == "full":
        from transformers import AutoTokenizer

        merged = auto_class(settings.model).from_pretrained(str(artifact))
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        say(f"ftlab.export: method {name!r} trained every weight: writing the full model")
    else:
        from peft import PeftModel
        from transformers import AutoTokenizer

        labels = _labels(settings)
        base, _ = load_model(dataclasses.replace(settings.model, quantization=quantization),
                             seed=settings.seed, labels=labels)
        if quantization != "none":
            # peft would merge into the 4-bit weights and quantize the sum again, losing the
            # adapter's small update to rounding; dequantize first, then add it exactly.
            say(f"ftlab.export: the base model was trained quantized ({quantization}); dequantizing "
                f"its weights to {settings.model.dtype} before merging (the merged model is a "
                "full-precision model: the dequantized base plus the adapter)")
            base = base.dequantize()
        merged = PeftModel.from_pretrained(base, str(artifact)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        if name == "delta_lora":
            say("ftlab.export: Delta-LoRA also moved the base weights during training: "
                "writing its full weights (base + its weight updates + the low-rank adapter)")
        else:
            say(f"ftlab.export: merged the {name} adapter into the base weights")
    merged.config._name_or_path = ""  # where it was loaded from says nothing about the export
    _write(out, lambda d: (merged.save_pretrained(str(d)), tokenizer.save_pretrained(str(d))))
    n = sum(p.numel() for p in merged.parameters())
    say(f"ftlab.export: wrote {out} ({n:,} parameters, safetensors); load it with "
        f"transformers.{auto_class(settings.model).__name__}.from_pretrained({str(out)!r})")
    return out


def export_adapter(run_dir: str | Path, out: str | Path, best: bool = False) -> Path:
    """Copy the run's trained adapter (peft format where it has one) and tokenizer to ``out``."""
    from ftlab.eval import read_run, trained_artifact
    from ftlab.models.loading import auto_class

    run_dir, out = Path(run_dir), Path(out)
    settings, _ = read_run(run_dir)
    artifact = trained_artifact(run_dir, settings, best)
    kind = adapter_kind(artifact)
    _check_out(out)
    base = _base_location(settings)

    def copy(directory: Path) -> None:
        shutil.copytree(artifact, directory, dirs_exist_ok=True)
        config_path = directory / "adapter_config.json"
        if kind.startswith("peft:") and base:
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = base
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    _write(out, copy)
    if kind == "full":
        how = f"transformers.{auto_class(settings.model).__name__}.from_pretrained({str(out)!r})"
    elif kind == "bottleneck":
        how = "ftlab (its own format: bottleneck_adapter.json + .safetensors)"
    else:
        peft_auto = "AutoPeftModelForSequenceClassification" if settings.model.task == "seq_cls" else "AutoPeftModelForCausalLM"
        how = (f"peft.{peft_auto}.from_pretrained({str(out)!r})" if base else
               f"peft.PeftModel.from_pretrained(<the base model>, {str(out)!r}) (the base was built "
               "in code, so no path to it is recorded)")
    say(f"ftlab.export: wrote {out} ({kind.replace('peft:', 'peft ')} adapter of method "
        f"{settings.method['name']!r}); load it with {how}")
    return out


def _base_location(settings) -> str | None:
    """Where a plain ``from_pretrained`` finds the base weights, if anywhere."""
    m = settings.model
    if m.path:  # a directory (its absolute path) or a hub id (as given)
        from ftlab.models.loading import shared_name

        return shared_name(m, m.path)
    if m.source == "hub":
        return m.hub_id
    if m.source == "package":
        from ftlab.models.loading import _package_dir

        return str(_package_dir(m))
    if m.source == "gguf_package":
        from ftlab.models.loading import _gguf_cache_dir

        try:
            return str(_gguf_cache_dir(m))
        except Exception:  # noqa: BLE001  not converted on this machine yet
            return None
    return None


def _labels(settings) -> list[str] | None:
    if settings.data.format != "classification":
        return None
    from ftlab.data import DataModule

    data = DataModule(settings.data, tokenizer=None)
    data.check_files()
    return data.labels


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; export into a new directory")


def _write(out: Path, save) -> None:
    """Fill a temporary directory next to ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        from ftlab.cli import fail

        fail(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> None:
    from ftlab.cli import fail

    parser = _Parser(prog="python -m ftlab.export",
                     description="Export a finished ftlab run: merged standalone model and/or adapter.")
    parser.add_argument("run_dir", help="the run directory (holds config.yaml and adapter/ or model/)")
    parser.add_argument("--merge", metavar="OUT", help="write a standalone model with the adapter merged")
    parser.add_argument("--adapter", metavar="OUT", help="write the adapter (peft format) and tokenizer")
    parser.add_argument("--best", action="store_true",
                        help="export the model of the run's best validation (best_adapter/) instead of the last")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.merge and not args.adapter:
        fail("python -m ftlab.export: give --merge OUT and/or --adapter OUT")
    try:
        if args.adapter:
            export_adapter(args.run_dir, args.adapter, best=args.best)
        if args.merge:
            merge(args.run_dir, args.merge, best=args.best)
    except UserError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
