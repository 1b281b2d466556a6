"""Measurements shared by training and evaluation: peak memory (generation scores live in
ftlab.evaluate)."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA's max allocated when on a GPU, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
