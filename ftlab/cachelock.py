"""One writer per shared cache entry under ``$FTLAB_CACHE``; readers never see half an entry.

Several runs may start at once on an empty cache (a sweep, a SLURM array, three terminals).
Each cache (the converted GGUF model, the tokenised data) follows the same protocol:

1. look for a complete entry without any lock (the common case, and cheap);
2. otherwise take the entry's lock (:func:`hold`), look again (another process may have
   finished it while this one waited), and only then build it;
3. build into a temporary directory next to the target (:func:`scratch_dir`) and move it into
   place with :func:`ftlab.io.replace_directory`, so the entry appears whole or not at all.

The lock is an OS-level ``flock`` on ``.<entry>.lock`` (the ``filelock`` package): the kernel
drops it when its holder exits, killed or not, so a crashed run never blocks the next one.
A filesystem without ``flock`` makes ``filelock`` fall back to a marker file, which a killed
process leaves behind; ``$FTLAB_CACHE`` belongs on a local disk or one that supports ``flock``.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from ftlab import io


def cache_root() -> Path:
    """``$FTLAB_CACHE`` (default ``~/.cache/ftlab``): converted models, tokenised data, scores."""
    return Path(os.environ.get("FTLAB_CACHE", Path.home() / ".cache" / "ftlab"))


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def hold(target: Path, what: str) -> Iterator[None]:
    """Hold the lock of cache entry ``target`` (waiting for it, however long, with one notice)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        # Waiting silently for a 30-second conversion looks like a hang.
        print(f"ftlab: waiting for another process that is {what} ({lock_path(target)})",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def scratch_dir(target: Path) -> Path:
    """A fresh temporary directory beside ``target`` (same filesystem, so the rename is atomic).

    Call with the entry's lock held: scratch directories of this entry left by a writer that
    was killed (a converted model is half a gigabyte) are removed first, since only a lock
    holder writes them and this process holds the lock now.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        for orphan in target.parent.glob(f".{target.name}-{kind}-*"):
            shutil.rmtree(orphan, ignore_errors=True)
    return io.scratch_dir(target)
