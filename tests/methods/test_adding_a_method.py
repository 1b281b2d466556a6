"""A new method from this file alone: registered from outside ftlab, run through the CLI,
a sweep, the report and export, without touching any file of the package or its configs.

The method is norm tuning (only the normalisation weights train), written below as a plugin
module and a ``conf/method`` YAML in a temporary directory; the runs find them through
``plugins=[...]`` and Hydra's ``hydra.searchpath`` (docs/methods.md, "Adding a method").
"""

from __future__ import annotations

import csv
import json
import os
import textwrap

import pytest
from conftest import assert_usage_error, run_cli

PLUGIN = textwrap.dedent('''
    """Norm tuning: only the weights of the normalisation layers train."""
    from dataclasses import dataclass
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from ftlab.methods import Traits, register
    from ftlab.methods.base import PlainHooks, freeze


    @dataclass
    class NormTuning(PlainHooks):
        name: str = "toy_norms"
        traits = Traits(artifact_format="own", mergeable=False,
                        merge_note="norm tuning rescales activations, not a weight delta here")

        def check(self, model):
            pass

        def apply(self, model, total_steps):
            freeze(model)
            for n, p in model.named_parameters():
                p.requires_grad_("norm" in n)
            return model

        def save(self, model, directory):
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(Path(directory) / "norms.safetensors"))

        def load(self, model, directory):
            model.load_state_dict(load_file(str(Path(directory) / "norms.safetensors")), strict=False)
            return self.apply(model, 0)


    @register("toy_norms")
    def toy_norms() -> NormTuning:
        return NormTuning()
''')
FAST = ["model=tiny-llama", "trainer.max_steps=2", "trainer.val_check_interval=2", "eval.max_examples=2",
        "data.batch_size=4", "logger=none", "eval.before=false", "checkpoint.every_n_steps=null"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_norms.py").write_text(PLUGIN)
    (root / "conf" / "method").mkdir(parents=True)
    (root / "conf" / "method" / "toy_norms.yaml").write_text("name: toy_norms\n")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    args = [f"hydra.searchpath=[file://{root / 'conf'}]", "plugins=[toy_norms]"]
    return root, env, args


def norm_params() -> int:
    """Norm weights of tiny-llama (conf/model/tiny-llama.yaml): two per layer plus the final one."""
    import yaml

    from ftlab.settings import config_dir

    arch = yaml.safe_load((config_dir() / "model" / "tiny-llama.yaml").read_text())["arch"]
    return (2 * arch["num_hidden_layers"] + 1) * arch["hidden_size"]


def test_a_plugin_method_runs_in_a_sweep_reports_and_exports(plugin, tmp_path):
    root, env, args = plugin
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=toy_norms,lora", *args, *FAST, f"hydra.sweep.dir={sweep}", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {json.loads(p.read_text())["method"]: p.parent for p in sweep.rglob("metrics.json")}
    assert set(jobs) == {"toy_norms", "lora"}
    toy = json.loads((jobs["toy_norms"] / "metrics.json").read_text())
    assert toy["status"] == "completed" and toy["trainable_params"] == norm_params()
    assert (jobs["toy_norms"] / "adapter" / "norms.safetensors").is_file()

    report = run_cli(str(sweep), module="ftlab.report", env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    with open(sweep / "report.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert int(rows["toy_norms"]["trainable_params"]) == norm_params()

    out = tmp_path / "exported"
    exported = run_cli(str(jobs["toy_norms"]), "--adapter", str(out), module="ftlab.export", env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    saved = jobs["toy_norms"] / "adapter" / "norms.safetensors"
    assert (out / "norms.safetensors").read_bytes() == saved.read_bytes()
    merged = run_cli(str(jobs["toy_norms"]), "--merge", str(tmp_path / "merged"), module="ftlab.export", env=env)
    assert_usage_error(merged, "cannot be merged", "not a weight delta here")


def test_a_plugin_that_cannot_be_imported_is_refused(plugin):
    root, env, args = plugin
    proc = run_cli("method=toy_norms", f"hydra.searchpath=[file://{root / 'conf'}]", "plugins=[no_such_plugin]",
                   *FAST, env=env)
    assert_usage_error(proc, "plugins", "no_such_plugin")
