"""Statistics of probability rows: how focused a normalizer's output is.

All take p [..., n] (rows summing to 1, zeros allowed) and reduce `axis`, returning [...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_weight(p: jax.Array, axis: int = -1) -> jax.Array:
    """max_i p_i: 1 for a one-hot row, 1/n for a uniform row of n."""
    return jnp.max(p, axis=axis)


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy -sum_i p_i log p_i in nats, with 0 log 0 = 0."""
    positive = p > 0
    return -jnp.sum(jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0), axis=axis)


def support_size(p: jax.Array, axis: int = -1) -> jax.Array:
    """Number of exact non-zeros, #{i : p_i > 0}."""
    return jnp.sum(p > 0, axis=axis)


def effective_support(p: jax.Array, axis: int = -1) -> jax.Array:
    """1 / sum_i p_i^2 (the inverse participation ratio): n for a uniform row of n."""
    return 1.0 / jnp.sum(p * p, axis=axis)
