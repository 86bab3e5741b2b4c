"""The chunked paths' memory grows linearly in sequence length, the dense path's quadratically.

Each measurement runs benchmarks/attention_memory.py in a fresh process (peak RSS never goes
down) with forward and backward at lengths n and 4n: 4x more memory is linear, 16x quadratic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "attention_memory.py"
SMALL, LARGE = 1024, 4096


def _extra_memory(n: int, normalizer: str, implementation: str) -> int:
    command = [sys.executable, str(SCRIPT), "--n", str(n), "--heads", "2", "--head-dim", "16", "--backward"]
    command += ["--normalizer", normalizer, "--implementation", implementation, "--query-block", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return record["peak_rss_bytes"] - record["rss_before_bytes"]


def test_dense_memory_is_quadratic_so_the_measurement_can_see_it():
    growth = _extra_memory(LARGE, "softmax", "dense") / _extra_memory(SMALL, "softmax", "dense")
    assert growth > 8, f"dense softmax grew only {growth:.1f}x from n={SMALL} to n={LARGE}"


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_chunked_memory_is_linear(normalizer):
    small = _extra_memory(SMALL, normalizer, "chunked")
    large = _extra_memory(LARGE, normalizer, "chunked")
    assert large / small < 6, f"{normalizer}: {small >> 20} MiB at n={SMALL}, {large >> 20} MiB at n={LARGE}"
