"""Attention by query blocks: exact for any normalizer, memory linear in T.

Each block of `query_block` queries builds its [B, N, Tq, S] logits, normalises whole rows with
the same normalizer as the dense path (so sparse maps get their exact thresholds and their
closed-form gradients), and multiplies by the values. The block body is rematerialised in the
backward pass (`jax.checkpoint`), so neither pass ever holds more than one block of logits:
peak memory is O(Tq * S + (T + S) * H) per batch and head instead of O(T * S).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import statistics
from attnlab.attention.blocks import grouped_values, join, split
from attnlab.attention.dense import grouped_logits, normalize_grouped
from attnlab.attention.masks import Visibility, apply_score

# Query blocks hold [B, N, query_block, S] logits: about this many (16 MiB in float32) ...
QUERY_BLOCK_ELEMENTS = 1 << 22
# ... or more, up to this many queries, while they stay under this many (64 MiB). Causal, 8 heads x
# 64, float32, on a 2-core CPU (StableMax and MultiMax forward): 128-256 queries were 1.05-1.7x
# faster than 512-1024 at n = 2048 and 4096 (the logits of fewer queries stay in cache through the
# normalizer's passes), and 64 queries 1.3-1.5x slower than 128-256 at n = 8192 (thin matmuls).
MIN_QUERY_BLOCK = 128
MAX_QUERY_BLOCK_ELEMENTS = 1 << 24


def default_query_block(batch: int, heads: int, keys: int) -> int:
    """Queries per block when the caller gives none: about QUERY_BLOCK_ELEMENTS logits, or up to
    MIN_QUERY_BLOCK queries while under MAX_QUERY_BLOCK_ELEMENTS logits; at least 1."""
    per_query = max(1, batch * heads * keys)
    return max(1, QUERY_BLOCK_ELEMENTS // per_query, min(MIN_QUERY_BLOCK, MAX_QUERY_BLOCK_ELEMENTS // per_query))


def query_blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    normalizer: Callable,
    *,
    query_block: int,
    want_stats: bool,
    mass_keys: jax.Array | None,
    score_fn: Callable | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """q [B, K, G, T, H] (scaled), k/v [B, K, S, H] -> out [B, K, G, T, H] float32, statistics [B, K, G, T].

    A mask function (in `visibility`) and a score function are evaluated on each block's positions."""
    T = q.shape[3]
    block = max(1, min(query_block, T))
    num_blocks = math.ceil(T / block)
    q_blocks = split(q, block, num_blocks, 3, broadcast=False)
    bias_blocks = split(bias, block, num_blocks, 3)
    mask = visibility.mask
    mask_blocks = split(mask, block, num_blocks, 3, fill=False)
    key_pos = jnp.arange(k.shape[2])
    rebuild, param_blocks = _per_query_parameters(normalizer, T, block, num_blocks)

    @jax.checkpoint
    def one_block(q_blk, bias_blk, mask_blk, index, params_blk):
        query_pos = index * block + jnp.arange(block)
        normalizer_blk = rebuild(params_blk)
        blk_bias = bias if bias_blk is None and bias is not None else bias_blk
        logits = grouped_logits(q_blk, k, blk_bias)
        if score_fn is not None:
            logits = apply_score(score_fn, logits, visibility.heads, query_pos, key_pos)
        visible = visibility.rules(query_pos, key_pos)
        if mask is not None:
            visible = visible & (mask if mask_blk is None else mask_blk)
        p = normalize_grouped(normalizer_blk, logits, visible)
        out = grouped_values(p, v.astype(p.dtype))
        return out, statistics.from_weights(p, mass_keys) if want_stats else {}

    def body(carry, xs):
        return carry, one_block(*xs)

    xs = (q_blocks, bias_blocks, mask_blocks, jnp.arange(num_blocks), param_blocks)
    _, (out, stats) = jax.lax.scan(body, None, xs)
    return join(out, 3, T), {name: join(value, 3, T) for name, value in stats.items()}


def _per_query_parameters(normalizer: Callable, T: int, block: int, num_blocks: int):
    """Split the normalizer's per-query parameters by query block.

    A parameter broadcasting against the [B, N, T, S] logits with its query axis of size T > 1
    (e.g. a beta [B, N, T, 1] computed from each query) must be cut like the queries; the others
    are used whole. Returns rebuild(blocks) -> the block's normalizer, and those blocks (a list of
    arrays [num_blocks, ..., block, 1], padded with the last query's value)."""
    leaves, treedef = jax.tree.flatten(normalizer)
    per_query = [
        i for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array | np.ndarray) and T > 1 and 2 <= jnp.ndim(leaf) <= 4 and jnp.shape(leaf)[-2] == T
    ]  # fmt: skip
    blocks = [
        split(_pad_edge(leaves[i], num_blocks * block), block, num_blocks, -2, broadcast=False) for i in per_query
    ]

    def rebuild(params_blk: list) -> Callable:
        if not per_query:
            return normalizer
        out = list(leaves)
        for i, value in zip(per_query, params_blk, strict=True):
            out[i] = value
        return jax.tree.unflatten(treedef, out)

    return rebuild, blocks


def _pad_edge(x: jax.Array, length: int) -> jax.Array:
    """x padded along axis -2 to `length` with its last row (padding queries see no key anyway)."""
    pad = [(0, 0)] * (jnp.ndim(x) - 2) + [(0, length - jnp.shape(x)[-2]), (0, 0)]
    return jnp.pad(jnp.asarray(x), pad, mode="edge")
