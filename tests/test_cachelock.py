"""Shared caches under $FTLAB_CACHE with several processes at once: one builds, the rest reuse,
and a lock left by a killed process does not block the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from ftlab.cachelock import hold, lock_path
from ftlab.data import cache

N = 3

# Every worker waits until all have started (their imports take seconds on a busy machine),
# so they really reach the empty cache together.
BARRIER = """
import os, sys, time
from pathlib import Path
ready = Path(os.environ["BARRIER"])
(ready / f"ready-{os.getpid()}").touch()
deadline = time.time() + 120
while len(list(ready.glob("ready-*"))) < int(os.environ["N"]) and time.time() < deadline:
    time.sleep(0.05)
"""

# The import comes before the barrier: on a busy machine it takes longer than the build, and a
# worker still importing would find the entry finished instead of waiting for it.
DATA_WORKER = "from ftlab.data import cache\n" + BARRIER + """
import json

def build():
    with open(os.environ["BUILDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(float(os.environ.get("BUILD_S", "1")))
    return {"train": [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}],
            "val": [{"input_ids": [4, 5], "labels": [4, 5]}]}, {"counts": {"train": [1, 0]}}

splits, meta, status = cache.load_or_build("k" * 32, build)
print(json.dumps({"status": status, "splits": splits, "counts": meta["counts"]}))
"""


def start(script: str, tmp_path: Path, n: int = N, **env) -> list[subprocess.Popen]:
    barrier = tmp_path / "barrier"
    barrier.mkdir(exist_ok=True)
    full_env = {**os.environ, "FTLAB_CACHE": str(tmp_path / "cache"), "BARRIER": str(barrier),
                "N": str(n), "BUILDS": str(tmp_path / "builds.txt"), **env}
    return [subprocess.Popen([sys.executable, "-c", script], env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_concurrent_processes_build_a_data_entry_once(tmp_path):
    outs = finish(start(DATA_WORKER, tmp_path), timeout=300)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    statuses = sorted(r["status"].split()[0] for r in results)
    assert statuses == ["reused", "reused", "saved"], statuses
    assert all(r["splits"] == results[0]["splits"] and r["counts"] == results[0]["counts"]
               for r in results)
    # The two that waited said why.
    assert sum("waiting for another process" in err for _, err in outs) >= 1
    # Nothing but the entry and its lock is left beside it (no scratch directories).
    left = {p.name for p in (tmp_path / "cache" / "data").iterdir()}
    assert left == {"k" * 32, f".{'k' * 32}.lock"}, left


def test_killed_lock_holder_does_not_block_the_next_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    # A builder that would take a minute, killed with SIGKILL halfway (no cleanup code runs).
    (proc,) = start(DATA_WORKER.replace("time.sleep(float", "print('building', flush=True); time.sleep(float"),
                    tmp_path, n=1, BUILD_S="600")
    try:
        assert proc.stdout.readline().strip() == "building", proc.stderr.read()
        target = cache.cache_dir("k" * 32)
        with pytest.raises(Timeout):  # it really holds the lock
            FileLock(str(lock_path(target))).acquire(timeout=0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert lock_path(target).exists()  # the lock file stays; the kernel's lock on it is gone
    # What a writer killed while saving leaves beside the entry.
    orphan = target.parent / f".{target.name}-tmp-abc123"
    orphan.mkdir()
    (orphan / "train.npz").write_bytes(b"half")

    start_t = time.perf_counter()
    built = []
    splits, _, status = cache.load_or_build(
        "k" * 32, lambda: built.append(1) or ({"train": [], "val": []}, {"counts": {}}))
    assert time.perf_counter() - start_t < 10
    assert built == [1] and status.startswith("saved to") and splits == {"train": [], "val": []}
    assert not orphan.exists()


def test_hold_is_exclusive_between_processes(tmp_path):
    target = tmp_path / "entry"
    with hold(target, "testing"):
        probe = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                from filelock import FileLock, Timeout
                try:
                    FileLock({str(lock_path(target))!r}).acquire(timeout=0.5)
                except Timeout:
                    print("busy")
                else:
                    print("free")""")], capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == "busy", probe.stderr
    with FileLock(str(lock_path(target))).acquire(timeout=1):
        pass  # released on exit


MODEL_WORKER = BARRIER + """
import hashlib, yaml
from ftlab.settings import config_dir
from ftlab.config import ModelSettings
from ftlab.models import load_model

settings = ModelSettings(**yaml.safe_load((config_dir() / "model" / "smollm2-135m.yaml").read_text()))
model, _ = load_model(settings)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_concurrent_first_loads_of_the_gguf_model_convert_once(tmp_path):
    outs = finish(start(MODEL_WORKER, tmp_path), timeout=900)
    conversions = sum(err.count("ftlab: converting") for _, err in outs)
    assert conversions == 1, [err[-1500:] for _, err in outs]
    digests = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(digests) == 1, digests
    left = {p.name for p in (tmp_path / "cache" / "models").iterdir()}
    assert left == {"smollm2-135m", ".smollm2-135m.lock"}, left
