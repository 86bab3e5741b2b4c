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
