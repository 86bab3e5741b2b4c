"""Dense attention: the reference path, building the [B, N, T, S] logits once."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnlab.attention import statistics
from attnlab.attention.masks import Visibility

GROUPED_LOGITS = "bkgth,bksh->bkgts"
GROUPED_OUTPUT = "bkgts,bksh->bkgth"


def grouped_logits(q: jax.Array, k: jax.Array, bias: jax.Array | None) -> jax.Array:
    """q [B, K, G, T, H] (already scaled), k [B, K, S, H] -> float32 logits [B, K, G, T, S]."""
    logits = jnp.einsum(GROUPED_LOGITS, q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return logits


def to_heads(x: jax.Array) -> jax.Array:
    """[B, K, G, T, S] -> [B, N, T, S] (N = K * G), broadcasting size-1 axes first."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def normalize_grouped(normalizer: Callable, logits: jax.Array, visible: jax.Array) -> jax.Array:
    """Apply `normalizer` over keys on the [B, N, T, S] view of grouped logits [B, K, G, T, S]."""
    visible = jnp.broadcast_to(visible, logits.shape)
    p = normalizer(to_heads(logits), axis=-1, where=to_heads(visible))
    return p.reshape(logits.shape)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    normalizer: Callable,
    *,
    want_stats: bool,
    mass_keys: jax.Array | None,
    want_weights: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns out [B, K, G, T, H] (float32) and aux (statistics [B, K, G, T], weights [B, K, G, T, S])."""
    p = normalize_grouped(normalizer, grouped_logits(q, k, bias), visibility.dense())
    out = jnp.einsum(GROUPED_OUTPUT, p, v.astype(p.dtype), preferred_element_type=jnp.float32)
    aux = statistics.from_weights(p, mass_keys) if want_stats else {}
    if want_weights:
        aux["weights"] = p
    return out, aux
