"""Export: what a run saves loads outside ftlab, with plain transformers and peft, and gives
ftlab's outputs.

The loading side runs in a separate Python process that never imports ftlab (it checks), so
nothing of ftlab's can leak into what "plain peft" means.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ftlab import export
from ftlab.rundir import RunDir, load_run
from ftlab.models import load_model
from tiny_runs import DELTA_LORA, ENV, LORA, NATIVE_VERA, cached_run, cli, one_thread, tree_digest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


NATIVE_LORA = ["method.backend=native", "trainer.max_steps=3", "optimizer.lr=2e-2", "eval.generate=false"]
PROMPT = ["method=prompt_tuning", "method.num_virtual_tokens=4", "trainer.max_steps=2",
          "optimizer.lr=5e-2", "eval.generate=false"]
QLORA = ["method=qlora", "method.r=4", "method.dropout=0.0", "method.gradient_checkpointing=false",
         "trainer.max_steps=2", "optimizer.lr=2e-2", "eval.generate=false"]
IDS = [[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100],
       [1, 50, 32, 43, 32, 51, 32, 61, 32, 53, 2, 0, 0]]

PLAIN_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = json.load(open(sys.argv[1]))
    ids = torch.tensor(spec["ids"])
    logits = {}
    for name, item in spec["models"].items():
        if "adapter" in item:
            base = AutoModelForCausalLM.from_pretrained(item["base"])
            model = PeftModel.from_pretrained(base, item["adapter"])
        else:
            model = AutoModelForCausalLM.from_pretrained(item["model"])
        model.eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    assert not [m for m in sys.modules if m == "ftlab" or m.startswith("ftlab.")], "ftlab was imported"
    torch.save(logits, spec["out"])
""")


def ftlab_logits(run: Path, train_mode: bool = False) -> torch.Tensor:
    model = load_run(run).model
    model.train(train_mode)  # train mode: the 4-bit layers' exact dequantize-then-matmul path
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def plain_logits(models: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ids": IDS, "models": models, "out": str(tmp_path / "logits.pt")}))
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(spec)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt", weights_only=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny base model every run starts from (built in code), saved for plain loading."""
    run = cached_run(tmp_path_factory, *LORA)
    settings = RunDir.open(run).settings
    model, tokenizer = load_model(settings.model, seed=settings.seed)
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    return out


def test_adapters_and_merged_models_load_in_plain_transformers_and_peft(tmp_path_factory, tmp_path, base_dir):
    runs = {"peft lora": cached_run(tmp_path_factory, *LORA),
            "native lora": cached_run(tmp_path_factory, *NATIVE_LORA),
            "native vera": cached_run(tmp_path_factory, *NATIVE_VERA),
            "delta lora": cached_run(tmp_path_factory, *DELTA_LORA),
            "prompt tuning": cached_run(tmp_path_factory, *PROMPT)}
    # the merge of one run through the real command line, the others in this process
    merged_lora = tmp_path / "merged-lora"
    proc = cli(str(runs["peft lora"]), "--merge", str(merged_lora), module="ftlab.export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in merged_lora.iterdir()}
    merged_delta = tmp_path / "merged-delta"
    export.main([str(runs["delta lora"]), "--merge", str(merged_delta)])

    models = {name: {"base": str(base_dir), "adapter": str(run / "adapter")} for name, run in runs.items()}
    models["merged lora"] = {"model": str(merged_lora)}
    models["merged delta lora"] = {"model": str(merged_delta)}
    models["base"] = {"model": str(base_dir)}
    plain = plain_logits(models, tmp_path)

    expected = {name: ftlab_logits(run) for name, run in runs.items()}
    expected["merged lora"], expected["merged delta lora"] = expected["peft lora"], expected["delta lora"]
    base_only = plain.pop("base")
    for name, logits in expected.items():
        # (prompt tuning's logits start with its virtual tokens)
        changed = (logits[:, -base_only.shape[1]:] - base_only).abs().max()
        assert changed > 1e-4, f"{name}: training changed nothing"
        torch.testing.assert_close(plain[name], logits, atol=1e-5, rtol=0, msg=name)


def test_delta_lora_exports_its_full_weights(tmp_path_factory, tmp_path, capsys, base_dir):
    run = cached_run(tmp_path_factory, *DELTA_LORA)
    export.main([str(run), "--merge", str(tmp_path / "out")])
    assert "full weights" in capsys.readouterr().out
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    assert merged.keys() == base.keys()  # a complete model, no adapter tensors
    moved = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert moved and all("q_proj" in k or "v_proj" in k for k in moved)


def test_prompt_tuning_cannot_merge_and_says_why(tmp_path_factory, tmp_path, capsys):
    run = cached_run(tmp_path_factory, *PROMPT)
    with pytest.raises(SystemExit) as exc:
        export.main([str(run), "--merge", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot be merged" in err and "virtual tokens" in err and "--adapter" in err
    assert not (tmp_path / "out").exists()
    export.main([str(run), "--adapter", str(tmp_path / "adapter")])  # what it offers instead
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_qlora_merge_dequantizes_first_and_says_so(tmp_path_factory, tmp_path, capsys):
    run = cached_run(tmp_path_factory, *QLORA)
    out = tmp_path / "out"
    export.main([str(run), "--merge", str(out)])
    said = capsys.readouterr().out
    assert "quantized (nf4)" in said and "dequantizing" in said
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    plain = plain_logits({"merged": {"model": str(out)}}, tmp_path)["merged"]
    # ftlab's QLoRA model (4-bit base + adapter) in the exact path (no CPU bf16 inference kernel)
    torch.testing.assert_close(plain, ftlab_logits(run, train_mode=True), atol=1e-5, rtol=0)


def test_bad_export_requests(tmp_path_factory, tmp_path, capsys):
    run = cached_run(tmp_path_factory, *LORA)
    before = tree_digest(run)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    for args, needle in (([str(run), "--merge", str(taken)], "not empty"),
                         ([str(tmp_path), "--merge", str(tmp_path / "o")], "not an ftlab run directory"),
                         ([str(run)], "--merge OUT and/or --adapter OUT")):
        with pytest.raises(SystemExit) as exc:
            export.main(args)
        assert exc.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
        assert len(errors) == 1 and needle in errors[0], errors
    assert tree_digest(run) == before
