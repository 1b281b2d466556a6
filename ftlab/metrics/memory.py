"""Measurements of a run's cost: peak memory, and the age of the process (the start-up part
of a job's wall time). Generation scores live in :mod:`ftlab.metrics.generation`.

Peak memory is per run, not per process: the jobs of a Hydra multirun share one process, so
each run starts a new peak with :func:`reset_peak_memory`. On a GPU that is CUDA's allocator
peak (``torch.cuda.reset_peak_memory_stats``). On the CPU it is the resident set's high-water
mark, ``VmHWM`` in ``/proc/self/status``, which Linux resets to the current resident size when
``5`` is written to ``/proc/self/clear_refs`` (Linux 4.0+); the heap that earlier jobs freed is
handed back to the system first (``malloc_trim``), so it does not count again. Where neither
exists (macOS), the process peak (``getrusage``) is all there is, and a later job of a multirun
reports at least the peak of the jobs before it.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import os
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _on_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak_memory() -> bool:
    """Start a new peak from what the process holds now; False where the CPU peak cannot be
    reset (see the module docstring)."""
    gc.collect()
    if _on_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: return freed heap pages to the system
    except (OSError, AttributeError):
        pass
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_kib() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_mb() -> float:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA's max allocated when on a
    GPU, else the peak resident set of this process."""
    if _on_cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    hwm = _vm_hwm_kib()
    if hwm is not None:
        return hwm / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: ``/proc/self/stat``), or None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
