"""The chunked paths' memory grows linearly in sequence length, the dense path's quadratically.

Two measurements at lengths n and 4n (forward and backward; 4x more memory is linear, 16x
quadratic):
  - XLA's own plan: the temporary buffer size of the compiled program (deterministic);
  - the real thing: peak resident memory of a fresh process running benchmarks/attention_memory.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from attnlab.attention import dot_product_attention

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "attention_memory.py"
SMALL, LARGE = 1024, 4096


def _compiled_temp_bytes(n: int, normalizer: str, implementation: str) -> int:
    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, is_causal=True, normalizer=normalizer, implementation=implementation, query_block=64
        )
        return jnp.sum(out**2)

    shape = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_compiled_memory_dense_quadratic_chunked_linear(normalizer):
    dense = [_compiled_temp_bytes(n, normalizer, "dense") for n in (SMALL, LARGE)]
    chunked = [_compiled_temp_bytes(n, normalizer, "chunked") for n in (SMALL, LARGE)]
    assert dense[1] / dense[0] > 10, f"dense {normalizer}: {dense} bytes at n={SMALL}, {LARGE}"
    assert chunked[1] / chunked[0] < 6, f"chunked {normalizer}: {chunked} bytes at n={SMALL}, {LARGE}"
    assert chunked[1] < dense[1] / 10


def _extra_rss(n: int, normalizer: str) -> int:
    command = [sys.executable, str(SCRIPT), "--n", str(n), "--heads", "2", "--head-dim", "16", "--backward"]
    command += ["--normalizer", normalizer, "--implementation", "chunked", "--query-block", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return record["peak_rss_bytes"] - record["rss_before_bytes"]


# The sparse path's memory is checked by default through its compiled temporaries (below); its
# measured RSS, which needs two fresh processes, runs with -m slow.
@pytest.mark.parametrize("normalizer", ["softmax", pytest.param("entmax15", marks=pytest.mark.slow)])
def test_chunked_peak_resident_memory_grows_linearly(normalizer):
    small, large = _extra_rss(SMALL, normalizer), _extra_rss(LARGE, normalizer)
    assert large / small < 6, f"{normalizer}: {small >> 20} MiB at n={SMALL}, {large >> 20} MiB at n={LARGE}"
