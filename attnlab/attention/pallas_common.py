"""What the Pallas kernels (attention.pallas_sparse, attention.pallas_online) check and choose alike:
their operands, their block sizes, and whether they run in the interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_operands(q, k, v, key_lengths) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H], k and v [B, S, K, H] with N a multiple of K, all float32 or all bfloat16, and
    key_lengths int [B] (None: every key, S); returned as arrays, key_lengths as int32. ValueError
    naming the bad shape, dtype or value otherwise."""
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k and v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    B, _, N, H = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != H:
        raise ValueError(
            f"k {k.shape} and v {v.shape} must equal each other and match q {q.shape} on batch and head_dim"
        )
    S, K = k.shape[1], k.shape[2]
    if K == 0 or N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; accepted: all float32 or all bfloat16")
    if key_lengths is None:
        key_lengths = jnp.full((B,), S, jnp.int32)
    key_lengths = jnp.asarray(key_lengths)
    if key_lengths.shape != (B,) or not jnp.issubdtype(key_lengths.dtype, jnp.integer):
        raise ValueError(
            f"key_lengths has shape {key_lengths.shape} and dtype {key_lengths.dtype}; "
            f"expected ints of shape ({B},), one length per batch row"
        )
    return q, k, v, key_lengths.astype(jnp.int32)


def block_size(requested, length: int, name: str) -> int:
    """`requested` (a power of two >= 16, as the Triton lowering needs), shrunk to the padded length
    when that is shorter."""
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)):
        raise ValueError(f"{name}={requested!r}; accepted: a power of two >= 16 (an int)")
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"{name}={requested}; accepted: a power of two >= 16 (the Triton lowering needs it)")
    return min(int(requested), max(16, pl.next_power_of_2(max(length, 1))))


def interpreted(interpret: bool | None) -> bool:
    """interpret=None: the Pallas interpreter unless JAX's default backend is a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)
