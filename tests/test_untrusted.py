"""Untrusted files: a checkpoint or model directory from elsewhere runs no code.

- Every ``torch.load`` in ftlab passes ``weights_only=True`` (checked on the source), and so does
  every load Lightning makes through ftlab's checkpoint plugin; a checkpoint whose pickle calls
  a function is refused with one line, and the function never runs.
- ``trust_remote_code`` is never passed by ftlab (transformers' default, off): a model directory
  whose config points at its own Python code is refused, and a known architecture loads
  without running the code its config names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ftlab import cli
from ftlab.errors import UserError
from ftlab.training.checkpoints import AtomicCheckpointIO, read_checkpoint
from tiny_runs import FAST, one_thread

PACKAGE = Path(__file__).resolve().parents[1] / "ftlab"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def test_every_torch_load_in_ftlab_is_weights_only_and_nothing_unpickles():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    loads = [(p, m) for p, text in sources.items() for m in re.finditer(r"torch\.load\(([^)]*)\)", text)]
    assert loads, "the audit found no torch.load at all"
    for path, match in loads:
        assert "weights_only=True" in match.group(1), (path, match.group(0))
    for path, text in sources.items():
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle=True|trust_remote_code\s*=\s*True", text), path


class Payload:
    """Unpickling this calls ``Path.touch``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"global_step": 1, "state_dict": {}, "ftlab": {}, "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match="refused, since loading it could run code"):
        read_checkpoint(path)
    with pytest.raises(Exception, match="Weights only load failed"):  # Lightning's loads: resume, ckpt_path=
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


CUSTOM_CODE = "from pathlib import Path\nPath({marker!r}).touch()\n"


def _custom_code_dir(directory: Path, marker: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for module in ("configuration_evil", "modeling_evil"):
        (directory / f"{module}.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    return directory


def test_a_model_that_needs_its_own_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    model_dir = _custom_code_dir(tmp_path / "evil", marker, {"model_type": "evil-arch"})
    with pytest.raises(SystemExit) as exc:
        cli.main(["model=auto", f"model.path={model_dir}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"model.path={model_dir}" in lines[0] and "trust_remote_code" in lines[0], lines[0]
    assert not marker.exists()


def test_a_known_architecture_with_code_in_its_config_loads_without_running_it(tmp_path):
    from hf_dirs import save_tiny_model

    marker = tmp_path / "code-ran"
    model_dir = save_tiny_model(tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    _custom_code_dir(model_dir, marker, config)
    run_dir = tmp_path / "run"
    cli.main([*FAST, "model=auto", f"model.path={model_dir}", "trainer.max_steps=1", "eval.generate=false",
              "eval.max_examples=2", f"hydra.run.dir={run_dir}"])
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert not marker.exists()
