"""Which keys each query sees, without building a T x S matrix unless the caller gave one.

Attention runs internally on grouped heads: query [B, K, G, T, H] (N = K * G query heads, query
head n reads key/value head n // G, as in `jax.nn.dot_product_attention`), keys and values
[B, K, S, H], logits [B, K, G, T, S]. A caller's mask or bias in the [B, N, T, S] layout
(broadcastable) is brought to [B|1, K|1, G|1, T|1, S|1] by :func:`to_grouped`, a query-layout array
[B, T, N, H] to [B, K, G, T, H] by :func:`group_queries` (and back by :func:`ungroup_queries`).

Visibility combines four structured rules, evaluated on the fly for any block of query and
key positions, with an optional explicit boolean mask and an optional mask function:
  - is_causal: key s visible to query t iff s <= t (top-left aligned, like jax.nn);
  - local_window_size (left, right): t - left <= s <= t + right;
  - query_seq_lengths [B]: queries t >= length see nothing (their output is 0);
  - key_value_seq_lengths [B]: keys s >= length are hidden;
  - mask_fn(b, h, q_idx, kv_idx) -> bool (attention.mask_functions), evaluated, like the rules,
    only on the block of positions at hand: never as a T x S array outside the dense path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp


def group_queries(query: jax.Array, num_kv_heads: int) -> jax.Array:
    """query [B, T, N, H] -> [B, K, G, T, H] (query head n = k * G + g reads key/value head k)."""
    return einops.rearrange(query, "b t (k g) h -> b k g t h", k=num_kv_heads)


def ungroup_queries(x: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H], the inverse of `group_queries`."""
    return einops.rearrange(x, "b k g t h -> b t (k g) h")


def to_grouped(x: jax.Array | None, num_kv_heads: int, groups: int, name: str) -> jax.Array | None:
    """[B, N, T, S]-broadcastable -> [B|1, K|1, G|1, T|1, S|1]."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name} must broadcast against [B, N, T, S]; got shape {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    heads = x.shape[1]
    if heads == num_kv_heads * groups:
        return x.reshape(x.shape[0], num_kv_heads, groups, *x.shape[2:])
    if heads == 1:
        return x.reshape(x.shape[0], 1, 1, *x.shape[2:])
    raise ValueError(f"{name} has {heads} heads on axis 1; expected {num_kv_heads * groups} (query heads) or 1")


@dataclasses.dataclass(frozen=True)
class Visibility:
    """The visible (query, key) pairs of one attention call; see the module docstring."""

    num_queries: int
    num_keys: int
    is_causal: bool = False
    local_window: tuple[int, int] | None = None
    query_lengths: jax.Array | None = None
    key_lengths: jax.Array | None = None
    mask: jax.Array | None = None  # grouped [B|1, K|1, G|1, T|1, S|1] bool
    mask_fn: Callable | None = None  # mask_fn(b, h, q_idx, kv_idx) -> bool, see attention.mask_functions
    heads: tuple[int, int, int] = (1, 1, 1)  # (B, K, G): the index ranges mask_fn is evaluated over

    def structured(self, query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:
        """bool [B|1, 1, 1, Tq, Sk] for query positions [Tq] and key positions [Sk] (no explicit mask).

        Positions past the true sizes (block padding) are never visible.
        """
        t = query_pos[:, None]
        s = key_pos[None, :]
        visible = (t < self.num_queries) & (s < self.num_keys)
        if self.is_causal:
            visible = visible & (s <= t)
        if self.local_window is not None:
            left, right = self.local_window
            visible = visible & (s >= t - left) & (s <= t + right)
        visible = visible[None, None, None]
        if self.query_lengths is not None:
            visible = visible & (t < self.query_lengths[:, None, None, None, None])
        if self.key_lengths is not None:
            visible = visible & (s < self.key_lengths[:, None, None, None, None])
        return visible

    def rules(self, query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:
        """bool [B|1, K|1, G|1, Tq, Sk]: the structured rules and mask_fn (not the explicit mask)."""
        visible = self.structured(query_pos, key_pos)
        if self.mask_fn is not None:
            visible = visible & evaluate_mask(self.mask_fn, self.heads, query_pos, key_pos)
        return visible

    def dense(self) -> jax.Array:
        """The full visibility, bool broadcastable to [B, K, G, T, S] (for the dense path)."""
        visible = self.rules(jnp.arange(self.num_queries), jnp.arange(self.num_keys))
        if self.mask is not None:
            visible = visible & self.mask
        return visible

    @property
    def only_structured(self) -> bool:
        return self.mask is None and self.mask_fn is None

    def visible_counts(self) -> jax.Array:
        """n [B|1, 1|K, 1|G, T, 1]: the number of keys each query sees (float32).

        Closed form for the structured rules; with an explicit mask, a sum over it (the caller's
        mask is already materialised, so this adds no quadratic memory); with a mask function, a
        sum by query blocks (memory linear in T).
        """
        if self.mask_fn is not None:
            return self._counted_by_query_blocks()
        if self.mask is not None:
            return jnp.sum(self.dense(), axis=-1, keepdims=True, dtype=jnp.float32)
        t = jnp.arange(self.num_queries)
        hi = jnp.full_like(t, self.num_keys)  # exclusive upper end of the visible range
        lo = jnp.zeros_like(t)
        if self.is_causal:
            hi = jnp.minimum(hi, t + 1)
        if self.local_window is not None:
            left, right = self.local_window
            lo = jnp.maximum(lo, t - left)
            hi = jnp.minimum(hi, t + right + 1)
        lo = lo[None, :]
        hi = hi[None, :]
        if self.key_lengths is not None:
            hi = jnp.minimum(hi, self.key_lengths[:, None])
        count = jnp.maximum(hi - lo, 0)
        if self.query_lengths is not None:
            count = jnp.where(t[None, :] < self.query_lengths[:, None], count, 0)
        return count.astype(jnp.float32)[:, None, None, :, None]

    def _counted_by_query_blocks(self) -> jax.Array:
        """visible_counts with a mask function: the visible keys of COUNT_ELEMENTS queries x keys at a time."""
        T, S = self.num_queries, self.num_keys
        block = max(1, min(T, COUNT_ELEMENTS // max(1, S * math.prod(self.heads))))
        num_blocks = math.ceil(T / block)
        key_pos = jnp.arange(S)

        def count(index):
            query_pos = index * block + jnp.arange(block)
            visible = self.rules(query_pos, key_pos)
            if self.mask is not None:
                mask = self.mask
                if mask.shape[3] != 1:
                    mask = jnp.pad(mask, [(0, 0)] * 3 + [(0, num_blocks * block - T), (0, 0)])
                    mask = jax.lax.dynamic_slice_in_dim(mask, index * block, block, axis=3)
                visible = visible & mask
            return jnp.sum(visible, axis=-1, keepdims=True, dtype=jnp.float32)

        counts = jax.lax.map(count, jnp.arange(num_blocks))  # [blocks, B|1, K|1, G|1, block, 1]
        counts = jnp.moveaxis(counts, 0, 3)
        counts = counts.reshape(*counts.shape[:3], num_blocks * block, 1)
        return counts[:, :, :, :T]


# Mask-function counts evaluate about this many (query, key, head) triples per step.
COUNT_ELEMENTS = 1 << 22


def mask_indices(
    heads: tuple[int, int, int], query_pos: jax.Array, key_pos: jax.Array, head_offset: tuple = (0, 0)
) -> tuple[jax.Array, ...]:
    """(b, h, q_idx, kv_idx), int32 index arrays that broadcast to the grouped [B, K, G, Tq, Sk]:
    b [B, 1, 1, 1, 1], h [1, K, G, 1, 1] (query head n = k G + g), q_idx [1, 1, 1, Tq, 1],
    kv_idx [1, 1, 1, 1, Sk]. With head_offset (b0, k0) (traced or not) they index the batch rows
    b0 .. b0 + B - 1 and key-value heads k0 .. k0 + K - 1 of a larger call (a block of its heads)."""
    B, K, G = heads
    b0, k0 = head_offset
    b = (b0 + jnp.arange(B, dtype=jnp.int32)).reshape(B, 1, 1, 1, 1)
    h = (k0 * G + jnp.arange(K * G, dtype=jnp.int32)).reshape(1, K, G, 1, 1)
    q = jnp.asarray(query_pos, jnp.int32).reshape(1, 1, 1, -1, 1)
    kv = jnp.asarray(key_pos, jnp.int32).reshape(1, 1, 1, 1, -1)
    return b, h, q, kv


def evaluate_mask(mask_fn: Callable, heads: tuple[int, int, int], query_pos: jax.Array, key_pos: jax.Array):
    """mask_fn on the index arrays of `mask_indices`: bool, broadcastable to [B, K, G, Tq, Sk]."""
    visible = jnp.asarray(mask_fn(*mask_indices(heads, query_pos, key_pos)))
    if visible.dtype != jnp.bool_:
        raise ValueError(f"mask_fn must return booleans (True = visible); it returned {visible.dtype}")
    if visible.ndim > 5:
        raise ValueError(
            f"mask_fn returned shape {visible.shape}: it must broadcast against the index arrays "
            "b [B,1,1,1,1], h [1,K,G,1,1], q_idx [1,1,1,Tq,1], kv_idx [1,1,1,1,Sk] (write it with jnp operations)"
        )
    return visible


def apply_score(score_fn: Callable, logits: jax.Array, heads: tuple[int, int, int], query_pos, key_pos) -> jax.Array:
    """score_fn on logits [B, K, G, Tq, Sk] at these positions, float32 of the logits' shape."""
    scores = jnp.asarray(score_fn(logits, *mask_indices(heads, query_pos, key_pos)))
    if scores.shape != logits.shape:
        scores = jnp.broadcast_to(scores, logits.shape)
    return scores.astype(jnp.float32)
