"""Kill a run with SIGKILL, or make a write fail, at a chosen write (test helper, not part of ftlab).

A run writes its directory in a fixed order (config, metrics, each checkpoint's temporary file
and rename, the adapter's scratch directory and rename, ...). A Python audit hook sees every
such operation before it happens (``open`` for writing, ``os.mkdir``, ``os.rename``,
``os.remove``, ``os.rmdir``), so "the k-th write under the run directory" names one moment of
the run exactly, and the hook can SIGKILL the process right there: before a checkpoint's
temporary file is renamed into place, in the middle of the adapter's save, before the final
``metrics.json`` lands. Writes done outside Python's file API (safetensors' Rust writer) are
not events; the directory they write into is.

The run happens in a forked child of the test process (imports already done: seconds, not the
half minute of a fresh interpreter), which installs the hook; audit hooks cannot be removed,
and the child exits with the run. The same hook can instead make a matching write fail with an
``OSError`` (disk full, read-only file system), as the kernel would.
"""

from __future__ import annotations

import errno as errnos
import fnmatch
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

ENOSPC, EROFS = errnos.ENOSPC, errnos.EROFS
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir")


def _write_event(event: str, args: tuple) -> str | None:
    """The path a write event touches (None for a read or another event)."""
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
    elif event in EVENTS:
        path, writing = args[0], True
    else:
        return None
    if not writing or not isinstance(path, (str, bytes, os.PathLike)):
        return None
    return os.fsdecode(path)


def watch(run_dir: Path, kill_at: int | None, log: list[tuple[str, str]],
          fail: tuple[str, int] | None = None) -> None:
    """Record every write under ``run_dir`` in ``log``; SIGKILL this process at write number
    ``kill_at`` (0-based), before it happens. ``fail=(glob, errno)``: every write to a path
    (relative to ``run_dir``) matching ``glob`` raises ``OSError(errno)`` instead."""
    root = os.path.realpath(run_dir)

    def hook(event: str, args: tuple) -> None:
        path = _write_event(event, args)
        if path is None:
            return
        full = os.path.realpath(path)
        if full != root and not full.startswith(root + os.sep):
            return
        rel = os.path.relpath(full, root)
        if kill_at is not None and len(log) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        log.append((event, rel))
        if fail is not None and fnmatch.fnmatch(rel, fail[0]):
            raise OSError(fail[1], os.strerror(fail[1]), full)

    sys.addaudithook(hook)


def fork(body: Callable[[], None], run_dir: Path | None = None, kill_at: int | None = None,
         events_file: Path | None = None, fail: tuple[str, int] | None = None) -> int:
    """Start ``body()`` in a forked child (watched as in :func:`watch` when ``run_dir`` is
    given); returns its pid (see :func:`wait`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            log: list[tuple[str, str]] = []
            if run_dir is not None:
                watch(run_dir, kill_at, log, fail)
            body()
            if events_file is not None:
                events_file.write_text(json.dumps(log))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001  reported by the parent through the exit code
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's end: ``-signal`` if a signal killed it, else its exit code."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_forked(run_dir: Path, body: Callable[[], None], kill_at: int | None = None,
               events_file: Path | None = None, fail: tuple[str, int] | None = None) -> int:
    """Run ``body()`` in a forked child watched as in :func:`watch`; returns how it ended
    (:func:`wait`). ``events_file``: the writes it made, as JSON."""
    return wait(fork(body, run_dir, kill_at, events_file, fail))
