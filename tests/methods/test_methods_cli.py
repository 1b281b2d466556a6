"""Every registered method through the real command line, and every out-of-range value of the
peft-backed methods refused by it before any weight loads.

The runs are independent processes started together (as many at once as there are cores):
each spends most of its time (about 7 s of CPU) importing torch, transformers, peft and
Lightning. So every out-of-range value goes through the command line's own code in this
process (``ftlab.cli.main``: compose, validate, one line, exit 2), and a few also through a
real ``python -m ftlab`` process, which checks that nothing else reaches stderr: a range
error (raised before peft is imported) of each kind of method, and a target typo (raised by
the check on the meta model, after peft and bitsandbytes are imported).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftlab.methods import available

from .test_matrix import FORMULAS, Ctx, dims, layer_shapes
from .tiny import BAD_CONTEXT, BAD_VALUES, LLAMA, method_kwargs, run_many

METHODS = available()
SHORT = ["model=tiny-llama", "trainer.max_steps=2", "eval.before=false", "eval.max_examples=4",
         "data.batch_size=4", "logger=none"]


def _bad_args(name: str, key: str, value: str) -> list[str]:
    context = [f"method.{k}={v}" for k, v in BAD_CONTEXT.get((name, key), {}).items()]
    return ["model=tiny-llama", f"method={name}", *context, f"method.{key}={value}"]


# (method, key, value) for real processes: low-rank, AdaLoRA, prompt ranges and a target typo.
BAD_IN_A_PROCESS = [("dora", "r", "0"), ("adalora", "target_r", "12"), ("prompt_tuning", "num_virtual_tokens", "0"),
                    ("lokr", "target_modules", "[q_proj,vproj]")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cli")
    commands = {("run", name): [*SHORT, f"method={name}", f"hydra.run.dir={root / name}"] for name in METHODS}
    commands.update({("bad", n, k, v): _bad_args(n, k, v) for n, k, v in BAD_IN_A_PROCESS})
    return root, run_many(commands)


@pytest.mark.parametrize("name", METHODS)
def test_a_short_run_completes(name, results):
    root, procs = results
    proc = procs[("run", name)]
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((root / name / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 2
    # The trainable count the method matrix's formula gives for this method on the tiny Llama
    # (tests/methods/test_matrix.py: FORMULAS, from each method's math and the layer shapes).
    from conftest import TINY_LLAMA_PARAMS

    from ftlab.models import meta_model

    ctx = Ctx(layer_shapes(meta_model(LLAMA.settings())), TINY_LLAMA_PARAMS, dims(LLAMA), LLAMA.name)
    assert metrics["trainable_params"] == FORMULAS[name](method_kwargs(name), ctx)


@pytest.mark.parametrize("name,key,value", BAD_IN_A_PROCESS, ids=[f"{n}.{k}={v}" for n, k, v in BAD_IN_A_PROCESS])
def test_an_out_of_range_value_ends_the_process_with_one_line(name, key, value, results):
    proc = results[1][("bad", name, key, value)]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ftlab: error: ") and f"method.{key}" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,key,value", BAD_VALUES, ids=[f"{n}.{k}={v}" for n, k, v in BAD_VALUES])
def test_every_out_of_range_value_is_refused_by_the_cli_naming_its_key(name, key, value, capsys, monkeypatch):
    import ftlab.cli

    monkeypatch.setattr(ftlab.cli, "_hydra_entry", lambda: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exit_info:
        ftlab.cli.main(_bad_args(name, key, value))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftlab: error: ") and f"method.{key}" in lines[0], lines
