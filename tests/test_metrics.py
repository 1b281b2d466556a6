"""Peak memory is measured per run: the jobs of a multirun share one process."""

from __future__ import annotations

import sys

import pytest
import torch

from ftlab.metrics.memory import peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak resets through /proc")
def test_a_reset_forgets_the_peak_of_earlier_work():
    big = torch.ones(400 * 2**20 // 4)  # 400 MB, touched
    del big
    before = peak_memory_mb()
    assert reset_peak_memory()
    after = peak_memory_mb()
    assert after < before - 300, (before, after)
    kept = torch.ones(200 * 2**20 // 4)  # a new allocation raises the new peak again
    assert peak_memory_mb() > after + 150
    del kept
