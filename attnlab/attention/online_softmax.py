"""Softmax attention by query blocks, each in one online pass over key blocks, with a recomputing backward.

The flash-attention recurrence (Milakov & Gimelshein 2018; Dao et al. 2022) over key blocks j:

    s_j = q k_j^T + b_j  (masked: -inf)        m' = max(m, max_s s_j)
    l   = l e^(m - m') + sum_s e^(s_j - m')    acc = acc e^(m - m') + e^(s_j - m') v_j
    out = acc / l,   lse = m + log l

Queries go a block at a time (an outer loop), so only O(query_block * key_block) logits live at
once and memory is linear in T and S. The backward recomputes p_j = exp(s_j - lse) block by
block: with D = rowsum(dout * out),

    dv_j = p_j^T dout,   ds_j = p_j * (dout v_j^T - D),   dq += ds_j k_j,   dk_j = ds_j^T q,
    db_j = ds_j.

A row with no visible key has l = 0: its output is 0, lse = -inf, and its gradients are 0.
Scale policies (temperature, SSMax's s log n) arrive folded into q and the bias by the caller.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention.blocks import join as _join
from attnlab.attention.blocks import split as _split
from attnlab.attention.masks import Visibility

F32 = jnp.float32


class _Static(NamedTuple):
    num_queries: int
    num_keys: int
    is_causal: bool
    local_window: tuple[int, int] | None
    key_block: int
    query_block: int


def _pick(whole: jax.Array | None, block: jax.Array | None) -> jax.Array | None:
    return whole if block is None else block


def _block_logits(static, q_i, q_offset, k_j, bias_ij, mask_ij, q_lengths, kv_lengths, j):
    """Logits [B, K, G, Tq, Sk] of one (query block, key block) pair and their visibility."""
    key_pos = j * static.key_block + jnp.arange(static.key_block)
    query_pos = q_offset + jnp.arange(q_i.shape[3])
    visibility = Visibility(
        static.num_queries, static.num_keys, static.is_causal, static.local_window, q_lengths, kv_lengths
    )
    visible = visibility.structured(query_pos, key_pos)
    if mask_ij is not None:
        visible = visible & mask_ij
    s = jnp.einsum("bkgth,bksh->bkgts", q_i, k_j, preferred_element_type=F32)
    if bias_ij is not None:
        s = s + bias_ij.astype(F32)
    return s, jnp.broadcast_to(visible, s.shape)


def _key_blocks(static, k, v, bias_i, mask_i):
    num_blocks = math.ceil(k.shape[2] / static.key_block)
    block = static.key_block
    return (
        _split(k, block, num_blocks, 2, broadcast=False),
        _split(v, block, num_blocks, 2, broadcast=False),
        _split(bias_i, block, num_blocks, -1),
        _split(mask_i, block, num_blocks, -1, fill=False),
        jnp.arange(num_blocks),
    )


def _query_blocks(static, q, bias, mask):
    num_blocks = math.ceil(q.shape[3] / static.query_block)
    block = static.query_block
    return (
        _split(q, block, num_blocks, 3, broadcast=False),
        _split(bias, block, num_blocks, 3),
        _split(mask, block, num_blocks, 3, fill=False),
        jnp.arange(num_blocks) * block,
    )


def _forward_block(static, q_i, q_offset, k, v, bias_i, mask_i, q_lengths, kv_lengths):
    """out [B, K, G, Tq, H] and lse [B, K, G, Tq] of one query block, by the online recurrence."""
    B, K, G, Tq, H = q_i.shape

    def step(carry, x):
        m, total, acc = carry
        k_j, v_j, bias_j, mask_j, j = x
        s, visible = _block_logits(
            static, q_i, q_offset, k_j, _pick(bias_i, bias_j), _pick(mask_i, mask_j), q_lengths, kv_lengths, j
        )
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(visible, jnp.exp(jnp.where(visible, s, 0.0) - m_safe[..., None]), 0.0)
        correction = jnp.exp(m - m_safe)
        total = total * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bkgts,bksh->bkgth", p.astype(v_j.dtype), v_j, preferred_element_type=F32
        )
        return (m_new, total, acc), None

    init = (jnp.full((B, K, G, Tq), -jnp.inf, F32), jnp.zeros((B, K, G, Tq), F32), jnp.zeros((B, K, G, Tq, H), F32))
    (m, total, acc), _ = jax.lax.scan(step, init, _key_blocks(static, k, v, bias_i, mask_i))
    has_keys = total > 0
    out = acc / jnp.where(has_keys, total, 1.0)[..., None]
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, total, 1.0)), -jnp.inf)
    return out, lse


def _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths):
    def one_block(x):
        q_i, bias_i, mask_i, offset = x
        return _forward_block(
            static, q_i, offset, k, v, _pick(bias, bias_i), _pick(mask, mask_i), q_lengths, kv_lengths
        )

    out, lse = jax.lax.map(one_block, _query_blocks(static, q, bias, mask))
    T = q.shape[3]
    return _join(out, 3, T), _join(lse, 3, T)


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


def _backward_block(static, q_i, q_offset, k, v, bias_i, mask_i, q_lengths, kv_lengths, out_i, lse_i, d_out_i):
    """dq_i, this block's dk and dv contributions, and d bias_i (shaped like bias_i)."""
    S = k.shape[2]
    lse_safe = jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)[..., None]
    delta = jnp.sum(d_out_i * out_i, axis=-1)[..., None]
    xs = _key_blocks(static, k, v, bias_i, mask_i)
    keys_broadcast = bias_i is not None and xs[2] is None
    q32 = q_i.astype(F32)

    def step(carry, x):
        dq, dbias_acc = carry
        k_j, v_j, bias_j, mask_j, j = x
        s, visible = _block_logits(
            static, q_i, q_offset, k_j, _pick(bias_i, bias_j), _pick(mask_i, mask_j), q_lengths, kv_lengths, j
        )
        p = jnp.where(visible, jnp.exp(jnp.where(visible, s, 0.0) - lse_safe), 0.0)
        dv_j = jnp.einsum("bkgts,bkgth->bksh", p, d_out_i)
        dp = jnp.einsum("bkgth,bksh->bkgts", d_out_i, v_j.astype(F32))
        ds = p * (dp - delta)
        dq = dq + jnp.einsum("bkgts,bksh->bkgth", ds, k_j.astype(F32))
        dk_j = jnp.einsum("bkgts,bkgth->bksh", ds, q32)
        dbias_j = None
        if keys_broadcast:
            dbias_acc = dbias_acc + _reduce_to(ds, bias_i.shape)
        elif bias_i is not None:
            dbias_j = _reduce_to(ds, bias_j.shape)
        return (dq, dbias_acc), (dk_j, dv_j, dbias_j)

    dbias_init = jnp.zeros(bias_i.shape, F32) if keys_broadcast else None
    (dq, dbias_acc), (dk, dv, dbias) = jax.lax.scan(step, (jnp.zeros(q_i.shape, F32), dbias_init), xs)
    if bias_i is None:
        d_bias = None
    elif keys_broadcast:
        d_bias = dbias_acc
    else:
        d_bias = _join(dbias, -1, S)
    return dq, _join(dk, 2, S), _join(dv, 2, S), d_bias


def _attention_bwd(static, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, out, lse = residuals
    d_out, _ = cotangents  # lse is not differentiated (statistics are stop-gradient)
    T = q.shape[3]
    q_blocks, bias_blocks, mask_blocks, offsets = _query_blocks(static, q, bias, mask)
    split = functools.partial(_split, block=static.query_block, num_blocks=q_blocks.shape[0], broadcast=False)
    xs = (q_blocks, bias_blocks, mask_blocks, offsets, split(out, axis=3), split(lse, axis=3))
    xs = (*xs, split(d_out.astype(F32), axis=3))
    queries_broadcast = bias is not None and bias_blocks is None

    def step(carry, x):
        dk, dv, dbias_acc = carry
        q_i, bias_i, mask_i, offset, out_i, lse_i, d_out_i = x
        dq_i, dk_i, dv_i, dbias_i = _backward_block(
            static, q_i, offset, k, v, _pick(bias, bias_i), _pick(mask, mask_i), q_lengths, kv_lengths,
            out_i, lse_i, d_out_i,
        )  # fmt: skip
        if queries_broadcast:
            dbias_acc = dbias_acc + _reduce_to(dbias_i, bias.shape)
            dbias_i = None
        return (dk + dk_i, dv + dv_i, dbias_acc), (dq_i, dbias_i)

    init = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32), jnp.zeros(bias.shape, F32) if queries_broadcast else None)
    (dk, dv, dbias_acc), (dq, dbias) = jax.lax.scan(step, init, xs)
    if bias is None:
        d_bias = None
    elif queries_broadcast:
        d_bias = dbias_acc.astype(bias.dtype)
    else:
        d_bias = _reduce_to(_join(dbias, 3, T), bias.shape).astype(bias.dtype)
    dq = _join(dq, 3, T)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _static(visibility: Visibility, q: jax.Array, k: jax.Array, key_block: int, query_block: int) -> _Static:
    return _Static(
        visibility.num_queries,
        visibility.num_keys,
        visibility.is_causal,
        visibility.local_window,
        max(1, min(key_block, k.shape[2])),
        max(1, min(query_block, q.shape[3])),
    )


def online_softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    *,
    key_block: int,
    query_block: int,
) -> tuple[jax.Array, jax.Array]:
    """q [B, K, G, T, H] (scale and any scale-policy factor folded in), k/v [B, K, S, H].

    Queries go `query_block` at a time, each through an online pass over `key_block` keys, so at
    most [B, N, query_block, key_block] logits exist at once, in both passes.
    Returns out [B, K, G, T, H] float32 and lse [B, K, G, T] (log-sum-exp of the visible logits,
    -inf for a row with no visible key).
    """
    static = _static(visibility, q, k, key_block, query_block)
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
    query_block: int,
) -> dict[str, jax.Array]:
    """max weight, entropy, exact support size and key mass from a second pass with the final lse."""
    q, k, lse = (jax.lax.stop_gradient(x) for x in (q, k, lse))
    bias = None if bias is None else jax.lax.stop_gradient(bias)
    static = _static(visibility, q, k, key_block, query_block)
    mask = visibility.mask
    T = q.shape[3]
    q_blocks, bias_blocks, mask_blocks, offsets = _query_blocks(static, q, bias, mask)
    lse_blocks = _split(lse, static.query_block, q_blocks.shape[0], 3, broadcast=False)

    def one_query_block(x):
        q_i, bias_i, mask_i, offset, lse_i = x
        bias_i, mask_i = _pick(bias, bias_i), _pick(mask, mask_i)
        k_blocks, _, bias_ij, mask_ij, j = _key_blocks(static, k, k, bias_i, mask_i)
        mass_blocks = _split(mass_keys, static.key_block, k_blocks.shape[0], -1, fill=False)
        lse_safe = jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)[..., None]

        def step(carry, x):
            k_j, bias_j, mask_j, mass_j, j = x
            s, visible = _block_logits(
                static, q_i, offset, k_j, _pick(bias_i, bias_j), _pick(mask_i, mask_j),
                visibility.query_lengths, visibility.key_lengths, j,
            )  # fmt: skip
            log_p = jnp.where(visible, s, 0.0) - lse_safe
            p = jnp.where(visible, jnp.exp(log_p), 0.0)
            update = {
                "max_weight": jnp.maximum(carry["max_weight"], jnp.max(p, axis=-1)),
                "entropy": carry["entropy"] - jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1),
                "support_size": carry["support_size"] + jnp.sum(p > 0, axis=-1, dtype=F32),
            }
            if mass_keys is not None:
                update["key_mass"] = carry["key_mass"] + jnp.sum(jnp.where(_pick(mass_keys, mass_j), p, 0.0), axis=-1)
            return update, None

        zeros = jnp.zeros(lse_i.shape, F32)
        init = {"max_weight": zeros, "entropy": zeros, "support_size": zeros}
        if mass_keys is not None:
            init["key_mass"] = zeros
        totals, _ = jax.lax.scan(step, init, (k_blocks, bias_ij, mask_ij, mass_blocks, j))
        return totals

    totals = jax.lax.map(one_query_block, (q_blocks, bias_blocks, mask_blocks, offsets, lse_blocks))
    return {name: _join(value, 3, T) for name, value in totals.items()}
