"""``python -m ftlab`` on the user's own files, as README and docs/data.md promise: instruction
records in JSON Lines, Parquet, and CSV (with ``data.val_path`` and remapped ``data.fields``),
classification records with ``data.labels``; and a curated model config pointed at the user's
own weights with ``model.path=<dir>`` (``model=gpt2``, and ``model=falcon-7b``: fused
query_key_value, multi-query attention).

Three processes, started together in a module-scoped fixture and checked by several tests:
a two-job multirun (JSONL, Parquet; on a tiny Falcon directory), the CSV run (on a tiny GPT-2
directory) and the classification run (tiny BERT)."""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import TINY, run_cli
from hf_dirs import save_tiny_model

# Falcon-7B's layout (conf/model/falcon-7b.yaml) at tiny size: 4 query heads share one key/value head.
FALCON_ARCH = dict(model_type="falcon", vocab_size=272, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                   parallel_attn=True, bias=False, alibi=False, max_position_embeddings=256,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

# Record counts, chosen here; the held-out split without data.val_path is
# max(1, round(0.1 * n)) records (docs/data.md: data.val_fraction, default 0.1, at least one).
N_JSONL, N_PARQUET, N_CSV_TRAIN, N_CSV_VAL, N_REVIEWS = 20, 30, 24, 6, 20


def _pairs(kind: str, n: int) -> list[tuple[str, str]]:
    """n distinct (instruction, answer) pairs; each file gets its own kind."""
    return [(f"{kind}: what is {i} plus {i}?", str(2 * i)) for i in range(n)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def _write_csv(path: Path, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer", "source"])
        writer.writerows([q, a, "mine"] for q, a in pairs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("user-files")
    files = {
        "jsonl": _pairs("jsonl", N_JSONL), "parquet": _pairs("parquet", N_PARQUET),
        "csv_train": _pairs("csv-train", N_CSV_TRAIN), "csv_val": _pairs("csv-val", N_CSV_VAL),
    }
    _write_jsonl(d / "train.jsonl", [{"instruction": q, "output": a} for q, a in files["jsonl"]])
    _write_parquet(d / "train.parquet", [{"instruction": q, "output": a} for q, a in files["parquet"]])
    _write_csv(d / "train.csv", files["csv_train"])
    _write_csv(d / "val.csv", files["csv_val"])
    reviews = [{"text": f"review number {i} was {'great' if i % 2 else 'awful'}",
                "label": "good" if i % 2 else "bad"} for i in range(N_REVIEWS)]
    _write_parquet(d / "reviews.parquet", reviews)
    falcon = save_tiny_model(d / "my-falcon", arch=FALCON_ARCH)
    gpt2 = save_tiny_model(d / "my-gpt2", family="tiny-gpt2")

    tiny = [a for a in TINY if not a.startswith("model=")]
    commands = {
        "multirun": ["-m", *tiny, "model=falcon-7b", f"model.path={falcon}",
                     f"data.path={d / 'train.jsonl'},{d / 'train.parquet'}", f"hydra.sweep.dir={d / 'sweep'}"],
        "csv": [*tiny, "model=gpt2", f"model.path={gpt2}", f"data.path={d / 'train.csv'}",
                f"data.val_path={d / 'val.csv'}", "data.fields.instruction=question",
                "data.fields.output=answer", f"hydra.run.dir={d / 'csv-run'}"],
        "classification": [*tiny, "model=tiny-bert", "data=classification", f"data.path={d / 'reviews.parquet'}",
                           "data.labels=[good,bad,meh]", f"hydra.run.dir={d / 'cls-run'}"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(commands, pool.map(lambda args: run_cli(*args, env={"OMP_NUM_THREADS": "1"}),
                                            commands.values())))
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    jobs = {}
    for metrics in (d / "sweep").glob("*/metrics.json"):
        config = yaml.safe_load((metrics.parent / "config.yaml").read_text())
        jobs[Path(config["data"]["path"]).suffix[1:]] = metrics.parent
    return {"dir": d, "files": files, "jsonl": jobs.get("jsonl"), "parquet": jobs.get("parquet"),
            "csv": d / "csv-run", "classification": d / "cls-run", "falcon": falcon, "gpt2": gpt2}


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _adapter_config(run: Path) -> dict:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())


def _check_samples(m: dict, pairs: list[tuple[str, str]], n_val: int) -> None:
    """The answers scored before and after training are held-out records of the file: each
    sample's prompt and reference are one record's instruction and output."""
    expected = min(n_val, 4)  # TINY: eval.max_examples=4; eval.show_samples defaults to 4
    for key in ("samples_initial", "samples"):
        samples = m[key]
        assert len(samples) == expected, (key, samples)
        assert {(s["prompt"], s["reference"]) for s in samples} <= set(pairs), samples
        assert len({s["prompt"] for s in samples}) == expected


@pytest.mark.parametrize("kind, n", [("jsonl", N_JSONL), ("parquet", N_PARQUET)])
def test_instruction_records_from_jsonl_and_parquet(runs, kind, n):
    assert runs[kind] is not None, f"no job of the multirun read train.{kind}"
    m = _metrics(runs[kind])
    n_val = max(1, round(0.1 * n))
    assert m["status"] == "completed"
    assert (m["train_examples"], m["val_examples"]) == (n - n_val, n_val)
    _check_samples(m, runs["files"][kind], n_val)


def test_csv_with_a_validation_file_and_remapped_fields(runs):
    m = _metrics(runs["csv"])
    assert m["status"] == "completed"
    assert (m["train_examples"], m["val_examples"]) == (N_CSV_TRAIN, N_CSV_VAL)
    _check_samples(m, runs["files"]["csv_val"], N_CSV_VAL)  # held out: the val file's records only


def test_classification_records_with_data_labels(runs):
    """data.labels=[good,bad,meh] sets the classes, in that order, though the file has only two:
    the new head has one output per listed label."""
    from safetensors.torch import load_file

    m = _metrics(runs["classification"])
    n_val = max(1, round(0.1 * N_REVIEWS))
    assert m["status"] == "completed"
    assert (m["train_examples"], m["val_examples"]) == (N_REVIEWS - n_val, n_val)
    assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["val_f1"] <= 1
    saved = load_file(str(runs["classification"] / "adapter" / "adapter_model.safetensors"))
    heads = {k: v.shape for k, v in saved.items() if "classifier" in k}
    assert heads and all(shape[0] == 3 for shape in heads.values()), heads
    config = yaml.safe_load((runs["classification"] / "config.yaml").read_text())
    assert config["data"]["labels"] == ["good", "bad", "meh"]


@pytest.mark.parametrize("kind, model, targets", [("jsonl", "falcon", ["query_key_value"]),
                                                  ("csv", "gpt2", ["c_attn"])])
def test_a_model_config_with_model_path_trains_the_users_weights(runs, kind, model, targets):
    """model=falcon-7b / model=gpt2 with model.path=<a save_pretrained directory>: the weights
    and architecture come from the directory (a 2-layer, 64-wide model, not the 7B / 124M the
    config describes), the targets from the config."""
    m = _metrics(runs[kind])
    config = _adapter_config(runs[kind])
    assert config["base_model_name_or_path"] == str(runs[model].resolve())
    assert config["target_modules"] == targets
    arch = json.loads((runs[model] / "config.json").read_text())
    hidden = arch.get("hidden_size", arch.get("n_embd"))
    assert hidden == 64 and m["total_params"] < 200_000
    # LoRA r=8 on the fused attention layer of both layers: r * (in + out) each, with Falcon's
    # multi-query out = 64 + 2 * 16 (one key and one value head of 64 / 4) and GPT-2's 3 * 64.
    out = 64 + 2 * 16 if model == "falcon" else 3 * 64
    assert m["trainable_params"] == 2 * 8 * (64 + out)
