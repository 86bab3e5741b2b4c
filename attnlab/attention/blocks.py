"""Splitting an axis into equal blocks (padded) for scans, and joining them back; the causal groups
of query blocks; the grouped-query products."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Key extents are rounded up to whole multiples of this (whole 128-key chunks for blocked entmax).
EXTENT_MULTIPLE = 128


def split(x: jax.Array | None, block: int, num_blocks: int, axis: int, *, fill=0, broadcast=True):
    """Pad `axis` to num_blocks * block and move the blocks to the front.

    None stays None; with `broadcast`, an axis of size 1 (a mask or bias broadcast along it)
    is not split and None is returned, telling the caller to use x whole for every block.
    """
    if x is None or (broadcast and x.shape[axis] == 1):
        return None
    axis = axis % x.ndim
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, num_blocks * block - x.shape[axis])
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(*x.shape[:axis], num_blocks, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def join(blocks: jax.Array, axis: int, length: int) -> jax.Array:
    """Inverse of split for an array whose split axis is `axis` after the join."""
    axis = axis % (blocks.ndim - 1)
    x = jnp.moveaxis(blocks, 0, axis)
    x = x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


class Group(NamedTuple):
    """Query blocks [first, first + count) that share one static key extent."""

    first: int
    count: int
    extent: int


def plan_groups(num_queries: int, num_keys: int, is_causal: bool, query_block: int, max_groups: int) -> tuple:
    """Contiguous groups of query blocks, each with the key extent its last block needs.

    Under a causal mask (query t sees keys s <= t) the blocks go in up to `max_groups` groups of
    about equal size, each computing keys [0, extent) only: about (groups + 1) / (2 groups) of the
    full work. Neighbouring groups whose extents come out equal (short rows: extents are rounded up
    to EXTENT_MULTIPLE and capped at num_keys) are one group, one program fewer to compile."""
    num_blocks = math.ceil(num_queries / query_block)
    if not is_causal:
        return (Group(0, num_blocks, num_keys),)
    num_groups = max(1, min(max_groups, num_blocks))
    bounds = [round(g * num_blocks / num_groups) for g in range(num_groups + 1)]
    groups: list[Group] = []
    for start, stop in itertools.pairwise(bounds):
        if stop > start:
            needed = min(num_keys, stop * query_block)
            extent = max(1, min(num_keys, EXTENT_MULTIPLE * math.ceil(needed / EXTENT_MULTIPLE)))
            if groups and groups[-1].extent == extent:
                groups[-1] = Group(groups[-1].first, groups[-1].count + stop - start, extent)
            else:
                groups.append(Group(start, stop - start, extent))
    return tuple(groups)


def reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the axes where `shape` has 1 (the transpose of broadcasting to x.shape)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


# Grouped-query products with the query heads of a group folded into the query axis: q [B, K, G, T, H]
# becomes [B, K, G*T, H], so each is one batched matmul over (B, K). Written as 5-D einsums, XLA:CPU
# gives the logits a layout with G and T swapped and copies them back every block (measured: a 4 MiB
# copy per key block at query block 256, key block 512, 8 heads); an online pass keeps its rows
# folded for the same reason.


def fold_groups(x: jax.Array) -> jax.Array:
    """[B, K, G, T, ...] -> [B, K, G*T, ...]: a group's query heads as more rows."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def row_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, K, R, S] (folded rows), v [B, K, S, H] -> p v [B, K, R, H], accumulated in float32."""
    return jnp.einsum("bkrs,bksh->bkrh", p, v, preferred_element_type=jnp.float32)


def grouped_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [B, K, G, T, H], k [B, K, S, H] -> q k^T [B, K, G, T, S], accumulated in float32."""
    s = jnp.einsum("bkrh,bksh->bkrs", fold_groups(q), k, preferred_element_type=jnp.float32)
    return s.reshape(*q.shape[:4], k.shape[2])


def grouped_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, K, G, T, S], v [B, K, S, H] -> p v [B, K, G, T, H], accumulated in float32."""
    return row_values(fold_groups(p), v).reshape(*p.shape[:4], v.shape[3])


def grouped_key_product(p: jax.Array, x: jax.Array) -> jax.Array:
    """p [B, K, G, T, S], x [B, K, G, T, H] -> p^T x [B, K, S, H] summed over the group's heads
    (dv = p^T dout, dk = ds^T q), accumulated in float32."""
    return jnp.einsum("bkrs,bkrh->bksh", fold_groups(p), fold_groups(x), preferred_element_type=jnp.float32)
