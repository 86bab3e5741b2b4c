"""Splitting an axis into equal blocks (padded) for scans, and joining them back."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
