"""Attention by query blocks: exact for any normalizer, memory linear in T.

Each block of `query_block` queries builds its [B, N, Tq, S] logits, normalises whole rows with
the same normalizer as the dense path (so sparse maps get their exact thresholds and their
closed-form gradients), and multiplies by the values. The block body is rematerialised in the
backward pass (`jax.checkpoint`), so neither pass ever holds more than one block of logits:
peak memory is O(Tq * S + (T + S) * H) per batch and head instead of O(T * S).

Under a causal mask the query blocks go in up to MAX_GROUPS groups, each computing only the keys
[0, extent) its last block can see (`attnlab.attention.blocks.plan_groups`): about 5/8 of the full
work with 4 groups. The keys cut off are hidden from every query of the group, so the rows are
exact for an attnlab Normalizer, whose hidden entries get 0 and take no part in the others'
weights (its n counts the visible keys); a callable of the user's, which may read hidden logits,
gets whole rows. Causal, B = 1, 8 heads x 64, float32, a 2-core CPU, through dot_product_attention
(min of 5): StableMax forward 266-302 -> 161-192 ms at n = 2048, 1007 -> 667 ms at 4096; forward +
backward 791 -> 432 ms at 2048, 2811 -> 1820 ms at 4096; MultiMax and stick-breaking alike (8
groups were no faster at 2048 and compile 1.5-2x longer than 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import statistics
from attnlab.attention.blocks import Group, grouped_values, join, plan_groups, split
from attnlab.attention.dense import grouped_logits, normalize_grouped
from attnlab.attention.masks import Visibility, apply_score
from attnlab.normalizers.normalizer import Normalizer

# Query blocks hold [B, N, query_block, S] logits: about this many (16 MiB in float32) ...
QUERY_BLOCK_ELEMENTS = 1 << 22
# ... or more, up to this many queries, while they stay under this many (64 MiB). Causal, 8 heads x
# 64, float32, on a 2-core CPU (StableMax and MultiMax forward): 128-256 queries were 1.05-1.7x
# faster than 512-1024 at n = 2048 and 4096 (the logits of fewer queries stay in cache through the
# normalizer's passes), and 64 queries 1.3-1.5x slower than 128-256 at n = 8192 (thin matmuls).
MIN_QUERY_BLOCK = 128
MAX_QUERY_BLOCK_ELEMENTS = 1 << 24
# Causal calls: query blocks in up to this many groups of one key extent each (see plan_groups).
MAX_GROUPS = 4


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
    query_block: int | None,
    want_stats: bool,
    mass_keys: jax.Array | None,
    score_fn: Callable | None = None,
    max_groups: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """q [B, K, G, T, H] (scaled), k/v [B, K, S, H] -> out [B, K, G, T, H] float32, statistics [B, K, G, T].

    A block holds `query_block` queries (None: `default_query_block`). A mask function (in
    `visibility`) and a score function are evaluated on each block's positions.
    Under a causal mask, and when `normalizer` ignores what it cannot see (`drops_hidden_keys`),
    the query blocks go in up to `max_groups` groups (None: MAX_GROUPS), each computing only the
    keys [0, extent) its queries can see (`attnlab.attention.blocks.plan_groups`)."""
    B, K, G, T = q.shape[:4]
    S = k.shape[2]
    if query_block is None:
        query_block = default_query_block(B, K * G, S)
    block = max(1, min(query_block, T))
    num_blocks = math.ceil(T / block)
    cut = visibility.is_causal and drops_hidden_keys(normalizer, S)
    groups = plan_groups(T, S, cut, block, MAX_GROUPS if max_groups is None else max_groups)
    q_blocks = split(q, block, num_blocks, 3, broadcast=False)
    bias_blocks = split(bias, block, num_blocks, 3)
    mask = visibility.mask
    mask_blocks = split(mask, block, num_blocks, 3, fill=False)
    rebuild, param_blocks = _per_query_parameters(normalizer, T, block, num_blocks)

    def group_scan(group: Group):
        extent = group.extent
        k_g, v_g = k[:, :, :extent], v[:, :, :extent]
        bias_g, mask_g, mass_g = (_keys_to(x, extent) for x in (bias, mask, mass_keys))
        key_pos = jnp.arange(extent)

        @jax.checkpoint
        def one_block(q_blk, bias_blk, mask_blk, index, params_blk):
            query_pos = index * block + jnp.arange(block)
            normalizer_blk = rebuild(params_blk)
            logits = grouped_logits(q_blk, k_g, bias_g if bias_blk is None else bias_blk)
            if score_fn is not None:
                logits = apply_score(score_fn, logits, visibility.heads, query_pos, key_pos)
            visible = visibility.rules(query_pos, key_pos)
            if mask is not None:
                visible = visible & (mask_g if mask_blk is None else mask_blk)
            p = normalize_grouped(normalizer_blk, logits, visible)
            out = grouped_values(p, v_g.astype(p.dtype))
            return out, statistics.from_weights(p, mass_g) if want_stats else {}

        def body(carry, xs):
            return carry, one_block(*xs)

        part = slice(group.first, group.first + group.count)
        xs = (
            q_blocks[part],
            None if bias_blocks is None else _keys_to(bias_blocks[part], extent),
            None if mask_blocks is None else _keys_to(mask_blocks[part], extent),
            jnp.arange(group.first, group.first + group.count),
            [x[part] for x in param_blocks],
        )
        return jax.lax.scan(body, None, xs)[1]

    parts = [group_scan(group) for group in groups]
    out, stats = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts) if len(parts) > 1 else parts[0]
    return join(out, 3, T), {name: join(value, 3, T) for name, value in stats.items()}


def drops_hidden_keys(normalizer: Callable, num_keys: int) -> bool:
    """Whether rows cut to their first keys give `normalizer` the same weights when every key cut
    off is hidden: an attnlab Normalizer (hidden entries get exactly 0 and take no part in the
    others', the row's n counts visible keys) with no parameter laid out along the keys. A
    callable of the user's may read hidden logits: its rows stay whole."""
    if not isinstance(normalizer, Normalizer):
        return False
    return not any(
        isinstance(leaf, jax.Array | np.ndarray)
        and jnp.ndim(leaf) >= 1
        and num_keys > 1
        and jnp.shape(leaf)[-1] == num_keys
        for leaf in jax.tree.leaves(normalizer)
    )


def _keys_to(x: jax.Array | None, extent: int) -> jax.Array | None:
    """x (None, or broadcasting against [..., S] logits) cut to the keys [0, extent)."""
    return x if x is None or x.shape[-1] == 1 else x[..., :extent]


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
