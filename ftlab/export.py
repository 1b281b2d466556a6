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

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from ftlab.console import CommandParser, fail, quiet_third_party, say
from ftlab.errors import UserError
from ftlab.io import atomic_directory
from ftlab.rundir import RunDir, class_labels


def _peft_type(artifact: Path) -> str:
    config = artifact / "adapter_config.json"
    return json.loads(config.read_text()).get("peft_type", "?") if config.is_file() else "?"


def merge(run_dir: str | Path, out: str | Path, best: bool = False) -> Path:
    """Write the run's model, adapter merged, as a standalone Hugging Face directory ``out``."""
    from ftlab.methods.quantized import base_quantization
    from ftlab.models import check_available, load_model
    from ftlab.models.loading import auto_class

    out = Path(out)
    run = RunDir.open(run_dir)
    settings, method = run.settings, run.method()
    name, traits = settings.method["name"], method.traits
    artifact = run.artifact(best)
    if not traits.mergeable:
        raise UserError(f"method {name!r} cannot be merged into the base weights: {traits.merge_note}")
    _check_out(out)
    check_available(settings.model)
    quantization = base_quantization(method, settings.model.quantization)

    if traits.artifact_format == "model":
        from transformers import AutoTokenizer

        merged = auto_class(settings.model).from_pretrained(str(artifact))
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        say(f"ftlab.export: {traits.merge_note}")
    else:
        from peft import PeftModel
        from transformers import AutoTokenizer

        labels = class_labels(settings)
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
        say(f"ftlab.export: {traits.merge_note or f'merged the {name} adapter into the base weights'}")
    merged.config._name_or_path = ""  # where it was loaded from says nothing about the export
    _write(out, lambda d: (merged.save_pretrained(str(d)), tokenizer.save_pretrained(str(d))))
    n = sum(p.numel() for p in merged.parameters())
    say(f"ftlab.export: wrote {out} ({n:,} parameters, safetensors); load it with "
        f"transformers.{auto_class(settings.model).__name__}.from_pretrained({str(out)!r})")
    return out


def export_adapter(run_dir: str | Path, out: str | Path, best: bool = False) -> Path:
    """Copy the run's trained adapter (peft format where it has one) and tokenizer to ``out``."""
    from ftlab.models.loading import auto_class

    out = Path(out)
    run = RunDir.open(run_dir)
    settings, fmt = run.settings, run.method().traits.artifact_format
    artifact = run.artifact(best)
    _check_out(out)
    base = _base_location(settings)

    def copy(directory: Path) -> None:
        shutil.copytree(artifact, directory, dirs_exist_ok=True)
        config_path = directory / "adapter_config.json"
        if fmt == "peft" and base:
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = base
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    _write(out, copy)
    if fmt == "model":
        how = f"transformers.{auto_class(settings.model).__name__}.from_pretrained({str(out)!r})"
    elif fmt == "own":
        how = "ftlab (its own format; python -m ftlab.eval reads it)"
    else:
        peft_auto = ("AutoPeftModelForSequenceClassification" if settings.model.task == "seq_cls"
                     else "AutoPeftModelForCausalLM")
        how = (f"peft.{peft_auto}.from_pretrained({str(out)!r})" if base else
               f"peft.PeftModel.from_pretrained(<the base model>, {str(out)!r}) (the base was built "
               "in code, so no path to it is recorded)")
    kind = {"model": "full model", "own": "ftlab-format adapter"}.get(fmt, f"peft {_peft_type(artifact)} adapter")
    say(f"ftlab.export: wrote {out} ({kind} of method "
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


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; export into a new directory")


def _write(out: Path, save) -> None:
    """Fill a temporary directory next to ``out``, then rename it into place (checked empty)."""
    atomic_directory(out, save, replace=False)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    parser = CommandParser(prog="python -m ftlab.export",
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
