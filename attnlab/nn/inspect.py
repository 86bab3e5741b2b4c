"""Look inside a trained `TransformerLM`: the attention logits each layer hands to its normalizer.

For layer l with input h_{l-1} [B, T, D], x = rmsnorm(h_{l-1}) and the layer's own projections,

    q = rope(x W_q, t), k = rope(x W_k, s)                 [B, T, N, H], [B, T, K, H]
    logits[l, b, n, t, s] = (q[b, t, n] / sqrt(H)) . k[b, s, n // G]      G = N / K
                            (+ slope_n (s - t) for a model with positional="alibi"; no rope then)

which is exactly what `attnlab.nn.MultiHeadAttention` passes to `dot_product_attention` (scale on
the queries, float32 accumulation), before any scale policy of the normalizer (SSMax's s log n, a
temperature): those belong to the normalizer. Causal visibility is key s <= query t, so row t
has t + 1 valid keys; entries s > t are returned unmasked and must be masked by the caller
(`causal_mask`). The residual stream is advanced with each block's own `__call__`, so the inputs
of layer l are the model's, not a re-implementation of them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.nn.attention import MultiHeadAttention


def query_key_value(
    attention: MultiHeadAttention,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    rope_theta: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The layer's q [B, T, N, H] (not yet scaled), k and v [B, T, K, H] for self-attention on x [B, T, F],
    with the layer's RoPE (base `rope_theta` or the layer's) and optional q/k layer norms."""
    return attention.project(x, x, x, positions, None, rope_theta)


def head_logits(query: jax.Array, key: jax.Array) -> jax.Array:
    """(q / sqrt(H)) . k per head: q [B, T, N, H], k [B, S, K, H] -> float32 [B, N, T, S] (head n uses
    key head n // (N / K))."""
    B, T, N, H = query.shape
    K = key.shape[2]
    scaled = (query * (1.0 / math.sqrt(H))).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", scaled, key, preferred_element_type=jnp.float32)
    return logits.reshape(B, N, T, key.shape[1])


def causal_mask(length: int) -> jax.Array:
    """bool [T, T]: key s visible to query t iff s <= t (row t has t + 1 valid keys)."""
    return jnp.tril(jnp.ones((length, length), bool))


def attention_logits(
    model: Any, tokens: jax.Array, *, positions: jax.Array | None = None, rope_theta: Any = None
) -> jax.Array:
    """Pre-normalizer attention logits of every layer of a `TransformerLM` on tokens [B, T].

    Returns float32 [L, B, N, T, T]: logits[l, b, n, t, s] as in the module docstring, unmasked
    (apply `causal_mask(T)` as `where=`). `positions` and `rope_theta` mean what they mean in
    `TransformerLM.__call__`. Self-attention only, like the model; works under `nnx.jit`.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"attention_logits: tokens must be an int array [batch, seq]; got {tokens.dtype}{tokens.shape}"
        )
    h = model.embed(tokens)
    layers = []
    for block in model.blocks:
        query, key, _ = query_key_value(
            block.attention, block.attention_norm(h), positions=positions, rope_theta=rope_theta
        )
        logits = head_logits(query, key)
        score_fn = block.score_fn()
        if score_fn is not None:  # ALiBi's distance penalty, as the attention pass adds it
            T = logits.shape[-1]
            heads = jnp.arange(logits.shape[1])[:, None, None]
            logits = score_fn(logits, 0, heads, jnp.arange(T)[:, None], jnp.arange(T)[None, :])
        layers.append(logits)
        h, _ = block(h, positions=positions, rope_theta=rope_theta, statistics=False, mass_keys=None)
    return jnp.stack(layers)
