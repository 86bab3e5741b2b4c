"""Softmax attention in one online pass over key blocks, with a recomputing backward.

The flash-attention recurrence (Milakov & Gimelshein 2018; Dao et al. 2022) over key blocks j:

    s_j = q k_j^T + b_j  (masked: -inf)        m' = max(m, max_s s_j)
    l   = l e^(m - m') + sum_s e^(s_j - m')    acc = acc e^(m - m') + e^(s_j - m') v_j
    out = acc / l,   lse = m + log l

Only O(T * key_block) logits live at once. The backward recomputes p_j = exp(s_j - lse) block by
block: with D = rowsum(dout * out),

    dv_j = p_j^T dout,   ds_j = p_j * (dout v_j^T - D),   dq += ds_j k_j,   dk_j = ds_j^T q,
    db_j = ds_j.

A row with no visible key has l = 0: its output is 0, lse = -inf, and its gradients are 0.
Scale policies (temperature, SSMax's s log n) arrive folded into q and the bias by the caller.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention.masks import Visibility

F32 = jnp.float32


class _Static(NamedTuple):
    num_queries: int
    num_keys: int
    is_causal: bool
    local_window: tuple[int, int] | None
    key_block: int


def _split_keys(x: jax.Array | None, block: int, num_blocks: int, axis: int, fill=0) -> jax.Array | None:
    """Pad `axis` (length S) to num_blocks * block and move the blocks to the front; None if broadcast."""
    if x is None or x.shape[axis] == 1:
        return None
    axis = axis % x.ndim
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, num_blocks * block - x.shape[axis])
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(*x.shape[:axis], num_blocks, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _join_keys(blocks: jax.Array, axis: int, length: int) -> jax.Array:
    """Inverse of _split_keys for an array whose key axis is `axis` after the join."""
    x = jnp.moveaxis(blocks, 0, axis)
    x = x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _block_logits(static, q, k_j, bias, bias_j, mask, mask_j, q_lengths, kv_lengths, j):
    key_pos = j * static.key_block + jnp.arange(static.key_block)
    visibility = Visibility(
        static.num_queries, static.num_keys, static.is_causal, static.local_window, q_lengths, kv_lengths
    )
    visible = visibility.structured(jnp.arange(static.num_queries), key_pos)
    if mask is not None:
        visible = visible & (mask if mask_j is None else mask_j)
    s = jnp.einsum("bkgth,bksh->bkgts", q, k_j, preferred_element_type=F32)
    if bias is not None:
        s = s + (bias if bias_j is None else bias_j).astype(F32)
    return s, visible


def _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths):
    B, K, G, T, H = q.shape
    block = static.key_block
    num_blocks = math.ceil(k.shape[2] / block)
    xs = (
        _split_keys(k, block, num_blocks, axis=2),
        _split_keys(v, block, num_blocks, axis=2),
        _split_keys(bias, block, num_blocks, axis=-1),
        _split_keys(mask, block, num_blocks, axis=-1, fill=False),
        jnp.arange(num_blocks),
    )

    def step(carry, x):
        m, total, acc = carry
        k_j, v_j, bias_j, mask_j, j = x
        s, visible = _block_logits(static, q, k_j, bias, bias_j, mask, mask_j, q_lengths, kv_lengths, j)
        visible = jnp.broadcast_to(visible, s.shape)
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(visible, jnp.exp(jnp.where(visible, s, 0.0) - m_safe[..., None]), 0.0)
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m, -jnp.inf) - m_safe)
        total = total * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bkgts,bksh->bkgth", p.astype(v_j.dtype), v_j, preferred_element_type=F32
        )
        return (m_new, total, acc), None

    init = (jnp.full((B, K, G, T), -jnp.inf, F32), jnp.zeros((B, K, G, T), F32), jnp.zeros((B, K, G, T, H), F32))
    (m, total, acc), _ = jax.lax.scan(step, init, xs)
    has_keys = total > 0
    out = acc / jnp.where(has_keys, total, 1.0)[..., None]
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, total, 1.0)), -jnp.inf)
    return out, lse


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, bias, mask, q_lengths, kv_lengths):
    return _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths)


def _attention_fwd(static, q, k, v, bias, mask, q_lengths, kv_lengths):
    out, lse = _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths)
    return (out, lse), (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse)


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the axes where `shape` has 1 (the transpose of broadcasting to x.shape)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _attention_bwd(static, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, out, lse = residuals
    d_out, _ = cotangents  # lse is not differentiated (statistics are stop-gradient)
    d_out = d_out.astype(F32)
    block = static.key_block
    S = k.shape[2]
    num_blocks = math.ceil(S / block)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    delta = jnp.sum(d_out * out, axis=-1)[..., None]
    bias_blocks = _split_keys(bias, block, num_blocks, axis=-1)
    xs = (
        _split_keys(k, block, num_blocks, axis=2),
        _split_keys(v, block, num_blocks, axis=2),
        bias_blocks,
        _split_keys(mask, block, num_blocks, axis=-1, fill=False),
        jnp.arange(num_blocks),
    )
    q32 = q.astype(F32)

    def step(carry, x):
        dq, dbias_acc = carry
        k_j, v_j, bias_j, mask_j, j = x
        s, visible = _block_logits(static, q, k_j, bias, bias_j, mask, mask_j, q_lengths, kv_lengths, j)
        visible = jnp.broadcast_to(visible, s.shape)
        p = jnp.where(visible, jnp.exp(jnp.where(visible, s, 0.0) - lse_safe), 0.0)
        dv_j = jnp.einsum("bkgts,bkgth->bksh", p, d_out)
        dp = jnp.einsum("bkgth,bksh->bkgts", d_out, v_j.astype(F32))
        ds = p * (dp - delta)
        dq = dq + jnp.einsum("bkgts,bksh->bkgth", ds, k_j.astype(F32))
        dk_j = jnp.einsum("bkgts,bkgth->bksh", ds, q32)
        dbias_j = None
        if bias is not None:
            if bias_j is None:  # bias broadcast over keys: accumulate
                dbias_acc = dbias_acc + _reduce_to(ds, bias.shape)
            else:
                dbias_j = _reduce_to(ds, bias_j.shape)
        return (dq, dbias_acc), (dk_j, dv_j, dbias_j)

    dbias_init = jnp.zeros(bias.shape, F32) if bias is not None and bias_blocks is None else None
    (dq, dbias_acc), (dk, dv, dbias) = jax.lax.scan(step, (jnp.zeros(q.shape, F32), dbias_init), xs)
    dk = _join_keys(dk, 2, S)
    dv = _join_keys(dv, 2, S)
    if bias is None:
        d_bias = None
    elif bias_blocks is None:
        d_bias = dbias_acc.astype(bias.dtype)
    else:
        d_bias = _join_keys(dbias, bias.ndim - 1, S).astype(bias.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def online_softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    *,
    key_block: int,
) -> tuple[jax.Array, jax.Array]:
    """q [B, K, G, T, H] (scale and any scale-policy factor folded in), k/v [B, K, S, H].

    Returns out [B, K, G, T, H] float32 and lse [B, K, G, T] (log-sum-exp of the visible logits,
    -inf for a row with no visible key).
    """
    block = max(1, min(key_block, k.shape[2]))
    static = _Static(visibility.num_queries, visibility.num_keys, visibility.is_causal, visibility.local_window, block)
    return _attention(static, q, k, v, bias, visibility.mask, visibility.query_lengths, visibility.key_lengths)


def softmax_statistics(
    q: jax.Array,
    k: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    lse: jax.Array,
    mass_keys: jax.Array | None,
    *,
    key_block: int,
) -> dict[str, jax.Array]:
    """max weight, entropy, exact support size and key mass from a second pass with the final lse."""
    q, k, lse = (jax.lax.stop_gradient(x) for x in (q, k, lse))
    bias = None if bias is None else jax.lax.stop_gradient(bias)
    block = max(1, min(key_block, k.shape[2]))
    static = _Static(visibility.num_queries, visibility.num_keys, visibility.is_causal, visibility.local_window, block)
    num_blocks = math.ceil(k.shape[2] / block)
    mask = visibility.mask
    xs = (
        _split_keys(k, block, num_blocks, axis=2),
        _split_keys(bias, block, num_blocks, axis=-1),
        _split_keys(mask, block, num_blocks, axis=-1, fill=False),
        _split_keys(mass_keys, block, num_blocks, axis=-1, fill=False),
        jnp.arange(num_blocks),
    )
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]

    def step(carry, x):
        k_j, bias_j, mask_j, mass_j, j = x
        s, visible = _block_logits(
            static, q, k_j, bias, bias_j, mask, mask_j, visibility.query_lengths, visibility.key_lengths, j
        )
        visible = jnp.broadcast_to(visible, s.shape)
        log_p = jnp.where(visible, s, 0.0) - lse_safe
        p = jnp.where(visible, jnp.exp(log_p), 0.0)
        update = {
            "max_weight": jnp.maximum(carry["max_weight"], jnp.max(p, axis=-1)),
            "entropy": carry["entropy"] - jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1),
            "support_size": carry["support_size"] + jnp.sum(p > 0, axis=-1, dtype=F32),
        }
        if mass_keys is not None:
            keys = mass_keys if mass_j is None else mass_j
            update["key_mass"] = carry["key_mass"] + jnp.sum(jnp.where(keys, p, 0.0), axis=-1)
        return update, None

    zeros = jnp.zeros(lse.shape, F32)
    init = {"max_weight": zeros, "entropy": zeros, "support_size": zeros}
    if mass_keys is not None:
        init["key_mass"] = zeros
    totals, _ = jax.lax.scan(step, init, xs)
    return totals
