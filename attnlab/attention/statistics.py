"""Per-query statistics of attention weights, reduced where the weights are made.

Each statistic is [B, K, G, T] in the grouped layout (reshaped to [B, N, T] by the API):
  max_weight   max_s p[t, s]
  entropy      -sum_s p log p (nats)
  support_size #{s : p[t, s] > 0} (exact non-zeros)
  key_mass     sum_s p[t, s] * mass_keys[s]   (only when mass_keys is given)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.normalizers import stats as row_stats

NAMES = ("max_weight", "entropy", "support_size", "key_mass")


def from_weights(p: jax.Array, mass_keys: jax.Array | None) -> dict[str, jax.Array]:
    """Statistics of weights p [..., S]; mass_keys broadcasts against p (bool or weights)."""
    p = jax.lax.stop_gradient(p.astype(jnp.float32))
    out = {
        "max_weight": row_stats.max_weight(p),
        "entropy": row_stats.entropy(p),
        "support_size": row_stats.support_size(p).astype(jnp.float32),
    }
    if mass_keys is not None:
        out["key_mass"] = jnp.sum(jnp.where(mass_keys, p, 0.0), axis=-1)
    return out
