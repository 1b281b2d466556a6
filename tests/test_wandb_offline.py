"""W&B offline (README: "each job is its own W&B run, grouped by sweep, named by method, rank,
alpha and precision, with the resolved config, parameter counts, ... and tables of sample
generations"), read back from what wandb wrote under the run directory: the run's records in
``wandb/offline-run-*/run-*.wandb`` (what ``wandb sync`` uploads) and the table files beside it.

The ``.wandb`` file is a LevelDB-style log (32 KiB blocks; records of a 7-byte header: CRC32,
length, type FULL/FIRST/MIDDLE/LAST, then the bytes) after a 7-byte file header, each record a
``wandb_internal_pb2.Record`` protobuf: the format of wandb's own ``datastore`` reader."""

from __future__ import annotations

import json

import pytest

from tiny_runs import one_thread, train_run, wandb_records

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    import wandb

    run = tmp_path_factory.mktemp("wandb") / "run"
    result = train_run(run, "logger=wandb", "sweep_name=my-sweep", "method.r=4", "method.alpha=8", "eval.before=true",
                       "trainer.max_steps=2", "eval.show_samples=2", "eval.max_examples=2")
    yield run, result
    wandb.teardown()


def test_run_is_named_and_grouped(wandb_run):
    run_dir, result = wandb_run
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    records = wandb_records(run_dir)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs
    # README: named by method, rank, alpha and precision; the group is the sweep's name.
    assert runs[0].display_name == result["run_name"] == "lora-r4-a8-32-true"
    assert runs[0].run_group == "my-sweep" and runs[0].project == "ftlab"

    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update if u.key})
    # The resolved config, flattened: the comparison axes as top-level columns, the rest as group/key.
    assert config["method"] == "lora" and config["r"] == 4 and config["alpha"] == 8
    assert config["model"] == "tiny-llama" and config["method/target_modules"] == ["q_proj", "v_proj"]

    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
    assert summary["trainable_params"] == result["trainable_params"]
    assert summary["val_loss"] == pytest.approx(result["val_loss"])
    assert summary["peak_memory_mb"] == pytest.approx(result["peak_memory_mb"])


@pytest.mark.parametrize("key, samples", [("samples_initial", "samples_initial"), ("samples_final", "samples")])
def test_sample_generations_are_tables(wandb_run, key, samples):
    run_dir, result = wandb_run
    tables = list((run_dir / "wandb").glob(f"offline-run-*/files/media/table/{key}_*.table.json"))
    assert len(tables) == 1, tables
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "prediction", "reference"]
    assert table["data"] == [[s["prompt"], s["prediction"], s["reference"]] for s in result[samples]]
    assert len(table["data"]) == 2  # eval.show_samples
