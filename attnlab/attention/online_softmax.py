"""Softmax attention by query blocks, each in one online pass over key blocks, with a recomputing backward.

The flash-attention recurrence (Milakov & Gimelshein 2018; Dao et al. 2022) over key blocks j:

    s_j = q k_j^T + b_j  (masked: -inf)        m' = max(m, max_s s_j)
    l   = l e^(m - m') + sum_s e^(s_j - m')    acc = acc e^(m - m') + e^(s_j - m') v_j
    out = acc / l,   lse = m + log l

Queries go a block at a time (an outer loop), so only O(query_block * key_block) logits live at
once and memory is linear in T and S. Each query block visits only the key blocks that its
causal / local-window rules can make visible (a loop with a data-dependent trip count), so a
causal call does about half the work of a full one. The backward recomputes
p_j = exp(s_j - lse) block by block over the same key blocks: with D = rowsum(dout * out),

    dv_j = p_j^T dout,   ds_j = p_j * (dout v_j^T - D),   dq += ds_j k_j,   dk_j = ds_j^T q,
    db_j = ds_j.

A row with no visible key has l = 0: its output is 0, lse = -inf, and its gradients are 0.
Scale policies (temperature, SSMax's s log n) arrive folded into q and the bias by the caller.
Infinite logits are taken as the dense reference takes them (attnlab.normalizers): -inf is a
hidden key; a row holding +inf is cut to its +inf keys (uniform over them), so once the running
maximum is +inf the earlier blocks are dropped and each +inf key counts 1: lse = +inf, and the
row's logits get zero gradient (its weights are a constant there).

Two more kinds of mapping take the same passes (attention.families):
- a sink (softmax1: p_i = e^{s_i} / (e^{sink} + sum_j e^{s_j}), sink 0) is one more logit with no
  value, i.e. the pass starts from m = sink, l = 1 instead of m = -inf, l = 0. Its Jacobian has
  the softmax form (dp_i/ds_k = p_i delta_ik - p_i p_k), so the backward is unchanged given
  lse = log(e^{sink} + sum_j e^{s_j}); a row with no visible key has output 0, lse = sink. A
  traced sink (learned, one per head) cannot be a static starting point: the pass runs without it
  and the result is rescaled, out * sigmoid(lse - sink), the same weights; the backward then takes
  lse's cotangent c as ds = p (dout v^T - D + c), since d lse / d s = p.
- "elementwise" (p_i = sigmoid(s_i), its bias folded into b by the caller) needs no running sum:
  out = sum_j p_j v_j, and the backward has ds_j = p_j (1 - p_j) (dout v_j^T) in place of
  p_j * (dout v_j^T - D). Its lse is returned as 0 (+inf for a row holding +inf) and not used.

A mask function (attention.mask_functions) replaces the key-block ranges by a block map derived
once per call: each query block visits only the key blocks holding a pair visible to some batch row
and head, evaluating the function on each one. A score function maps each block's logits,
s = score_fn(q k^T + b), in both passes; the backward takes ds through its pullback, which also
gives the cotangents of the float arrays it closes over (passed in explicitly: see
mask_functions.convert).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention.blocks import (
    fold_groups,
    grouped_key_product,
    grouped_scores,
    grouped_values,
    reduce_to,
    row_values,
)
from attnlab.attention.blocks import join as _join
from attnlab.attention.blocks import split as _split
from attnlab.attention.mask_functions import (
    add_cotangents,
    block_map,
    cast_cotangents,
    convert,
    zero_cotangents,
)
from attnlab.attention.masks import Visibility, mask_indices

F32 = jnp.float32
KINDS = ("softmax", "elementwise")
# Keys per block of the online pass, and queries per block: [B, N, 256, 512] logits per step. On
# this 2-core CPU (causal, B = 1, 8 heads, head dim 64, float32, interleaved runs, min of 20) 256
# queries took a forward at n = 2048 from 1.77x to 1.43x torch SDPA's time (75 -> 61 ms) and did
# as well as 512 at n = 4096 and 8192; 128 and 64 were slower again (the matmuls get thin).
DEFAULT_KEY_BLOCK = 512
DEFAULT_QUERY_BLOCK = 256


class _Static(NamedTuple):
    num_queries: int
    num_keys: int
    is_causal: bool
    local_window: tuple[int, int] | None
    key_block: int
    query_block: int
    only_structured: bool  # no lengths and no explicit mask: visibility is known block by block
    kind: str  # "softmax" or "elementwise" (sigmoid)
    sink: float | None  # softmax: one more logit in every row, with no value (softmax1: 0)
    heads: tuple[int, int, int] = (1, 1, 1)  # (B, K, G), the index ranges of mask_fn and score_fn
    mask_fn: object = None  # closure-converted mask_fn(b, h, q_idx, kv_idx, *consts), or None
    score_fn: object = None  # closure-converted score_fn(s, b, h, q_idx, kv_idx, *consts), or None
    listed: bool = False  # key blocks come from a BlockMap (a mask function), not from KeyBlockRanges


class KeyBlockRanges(NamedTuple):
    """Per query block i [num_query_blocks]: key blocks [first, stop) hold every key any of its
    queries may see; the blocks [full_first, full_stop) inside that range are visible to all of
    its queries, so they need no mask."""

    first: np.ndarray
    full_first: np.ndarray
    full_stop: np.ndarray
    stop: np.ndarray


def key_block_ranges(
    num_queries: int,
    num_keys: int,
    is_causal: bool,
    local_window: tuple[int, int] | None,
    query_block: int,
    key_block: int,
    *,
    only_structured: bool = True,
) -> KeyBlockRanges:
    """The key blocks each query block visits, from the data-independent rules (causal, window).

    With `only_structured` False (lengths or an explicit mask also apply) no block is taken as
    fully visible.
    """
    num_query_blocks = math.ceil(num_queries / query_block)
    ranges = KeyBlockRanges(*(np.zeros(num_query_blocks, np.int32) for _ in range(4)))
    for i in range(num_query_blocks):
        q_first, q_last = i * query_block, min((i + 1) * query_block, num_queries) - 1
        lo, hi = 0, num_keys  # keys some query of the block sees lie in [lo, hi)
        all_lo, all_hi = 0, (num_keys // key_block) * key_block  # keys every query sees (whole blocks)
        if is_causal:
            hi, all_hi = min(hi, q_last + 1), min(all_hi, q_first + 1)
        if local_window is not None:
            left, right = local_window
            lo, hi = max(lo, q_first - left), min(hi, q_last + right + 1)
            all_lo, all_hi = max(all_lo, q_last - left), min(all_hi, q_first + right + 1)
        if hi <= lo:
            continue
        first, stop = lo // key_block, math.ceil(hi / key_block)
        full_first, full_stop = math.ceil(all_lo / key_block), all_hi // key_block
        if not only_structured or full_stop <= full_first:
            full_first = full_stop = stop
        ranges.first[i], ranges.full_first[i], ranges.full_stop[i], ranges.stop[i] = first, full_first, full_stop, stop
    return ranges


def visit_key_blocks(step, ranges, init):
    """Run step(j, carry, masked) over the key blocks [first, stop) of one query block: the
    fully visible middle [full_first, full_stop) unmasked, the edges masked."""
    first, full_first, full_stop, stop = ranges
    carry = jax.lax.fori_loop(first, full_first, partial(step, masked=True), init)
    carry = jax.lax.fori_loop(full_first, full_stop, partial(step, masked=False), carry)
    return jax.lax.fori_loop(full_stop, stop, partial(step, masked=True), carry)


def visit_listed_blocks(step, count, indices, init):
    """Run step(j, carry, masked=True) over the key blocks indices[:count] of one query block (a BlockMap's)."""
    return jax.lax.fori_loop(0, count, lambda t, carry: step(indices[t], carry, masked=True), init)


def _keep(visible: jax.Array | None, x: jax.Array) -> jax.Array:
    """x where visible, 0 elsewhere (x itself when the whole block is visible)."""
    return x if visible is None else jnp.where(visible, x, 0.0)


def _pick(whole: jax.Array | None, blocks: jax.Array | None, j) -> jax.Array | None:
    """Block j of `blocks`, or `whole` when the operand is broadcast along the blocked axis."""
    return whole if blocks is None else blocks[j]


class _Functions(NamedTuple):
    """The arrays the mask and score functions close over (see attention.mask_functions.convert)."""

    mask: tuple = ()
    score: tuple = ()


def _block_logits(static, q_i, q_offset, k_j, bias_ij, mask_ij, q_lengths, kv_lengths, j, masked, functions):
    """Logits [B, K, G, Tq, Sk] of one (query block, key block) pair, their visibility (None when
    `masked` is False: the caller knows the whole block is visible) and, with a score function, the
    pullback of the scores to (raw logits, score consts): ds -> (ds_raw, d_consts)."""
    s = grouped_scores(q_i, k_j)
    if bias_ij is not None:
        s = s + bias_ij.astype(F32)
    key_pos = j * static.key_block + jnp.arange(static.key_block)
    query_pos = q_offset + jnp.arange(q_i.shape[3])
    indices = mask_indices(static.heads, query_pos, key_pos)
    pullback = None
    if static.score_fn is not None:
        s, pullback = jax.vjp(lambda raw, consts: static.score_fn(raw, *indices, *consts), s, functions.score)
    if not masked:
        return s, None, pullback
    visibility = Visibility(
        static.num_queries, static.num_keys, static.is_causal, static.local_window, q_lengths, kv_lengths
    )
    visible = visibility.structured(query_pos, key_pos)
    if static.mask_fn is not None:
        visible = visible & static.mask_fn(*indices, *functions.mask)
    if mask_ij is not None:
        visible = visible & mask_ij
    return s, jnp.broadcast_to(visible, s.shape), pullback


class _QueryBlocks(NamedTuple):
    """Per-query-block operands, stacked on axis 0 (None: broadcast over queries, use whole)."""

    q: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    offset: jax.Array
    ranges: KeyBlockRanges  # of jax arrays [num_query_blocks]


def _query_blocks(static, q, bias, mask) -> _QueryBlocks:
    num_blocks = math.ceil(q.shape[3] / static.query_block)
    block = static.query_block
    ranges = key_block_ranges(
        static.num_queries, static.num_keys, static.is_causal, static.local_window, block, static.key_block,
        only_structured=static.only_structured,
    )  # fmt: skip
    return _QueryBlocks(
        _split(q, block, num_blocks, 3, broadcast=False),
        _split(bias, block, num_blocks, 3),
        _split(mask, block, num_blocks, 3, fill=False),
        jnp.arange(num_blocks) * block,
        KeyBlockRanges(*(jnp.asarray(r) for r in ranges)),
    )


def _num_key_blocks(static) -> int:
    return math.ceil(static.num_keys / static.key_block)


def _split_keys(static, x: jax.Array | None, axis: int, **kwargs) -> jax.Array | None:
    return _split(x, static.key_block, _num_key_blocks(static), axis, **kwargs)


class _Row(NamedTuple):
    """One query block's view of the operands: its queries, bias and mask, whole and per key block,
    the key blocks it visits and the mask and score functions' arrays."""

    q: jax.Array
    offset: jax.Array
    ranges: KeyBlockRanges  # of scalars
    listing: tuple[jax.Array, jax.Array] | None  # (count, indices [num_key_blocks]) of a BlockMap
    bias: jax.Array | None
    bias_blocks: jax.Array | None
    mask: jax.Array | None
    mask_blocks: jax.Array | None
    functions: _Functions

    def logits(self, static, k_blocks, q_lengths, kv_lengths, j, masked):
        """(s, visible, pullback) of key block j: see _block_logits."""
        return _block_logits(
            static, self.q, self.offset, k_blocks[j], _pick(self.bias, self.bias_blocks, j),
            _pick(self.mask, self.mask_blocks, j), q_lengths, kv_lengths, j, masked, self.functions,
        )  # fmt: skip

    def visit(self, step, init):
        """step(j, carry, masked) over the key blocks this query block visits."""
        if self.listing is not None:
            return visit_listed_blocks(step, *self.listing, init)
        return visit_key_blocks(step, self.ranges, init)


def _row(static, blocks: _QueryBlocks, bias, mask, i, listing, functions) -> _Row:
    bias_i = _pick(bias, blocks.bias, i)
    mask_i = _pick(mask, blocks.mask, i)
    return _Row(
        blocks.q[i], blocks.offset[i], KeyBlockRanges(*(r[i] for r in blocks.ranges)),
        None if listing is None else (listing[0][i], listing[1][i]),
        bias_i, _split_keys(static, bias_i, -1), mask_i, _split_keys(static, mask_i, -1, fill=False), functions,
    )  # fmt: skip


def _forward_block(static, row: _Row, k_blocks, v_blocks, q_lengths, kv_lengths):
    """out [B, K, G, Tq, H], lse [B, K, G, Tq], the log-normaliser of the weights [B, K, G, Tq] (lse,
    except on a row holding +inf: log of its number of +inf keys) of one query block, and the number
    of key blocks the pass visited (int32)."""
    B, K, G, Tq, H = row.q.shape
    elementwise = static.kind == "elementwise"

    def step(j, carry, masked):
        (m, total, acc), visited = carry
        s, visible, _ = row.logits(static, k_blocks, q_lengths, kv_lengths, j, masked)
        # A hidden key is a -inf logit: exp and sigmoid give it weight 0 with no second mask.
        s = fold_groups(s if visible is None else jnp.where(visible, s, -jnp.inf))  # [B, K, G*Tq, Sk]
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # Once the maximum is +inf the row is cut to its +inf keys: they weigh 1 each, the rest 0.
        infinite = m_new == jnp.inf
        at_infinity = (s == jnp.inf).astype(F32)
        dropped = (m == jnp.inf).astype(F32)  # the earlier blocks count only if they were at +inf too
        if elementwise:
            p = jnp.where(infinite[..., None], at_infinity, jax.nn.sigmoid(s))
            correction = jnp.where(infinite, dropped, 1.0)
        else:
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(infinite[..., None], at_infinity, jnp.exp(s - m_safe[..., None]))
            correction = jnp.where(infinite, dropped, jnp.exp(m - m_safe))
        total = total * correction + jnp.sum(p, axis=-1)
        v_j = v_blocks[j]
        pv = row_values(p.astype(v_j.dtype), v_j)
        return (m_new, total, acc * correction[..., None] + pv), visited + 1

    # A sink is a logit already visited: m = sink, l = e^0.
    m0, total0 = (-jnp.inf, 0.0) if elementwise or static.sink is None else (static.sink, 1.0)
    rows = (B, K, G * Tq)  # the pass keeps a group's query heads folded into its rows (see blocks.fold_groups)
    init = (jnp.full(rows, m0, F32), jnp.full(rows, total0, F32), jnp.zeros((*rows, H), F32))
    (m, total, acc), visited = row.visit(step, (init, jnp.int32(0)))
    m, total, acc = m.reshape(B, K, G, Tq), total.reshape(B, K, G, Tq), acc.reshape(B, K, G, Tq, H)
    infinite = m == jnp.inf
    if elementwise:
        lse = jnp.where(infinite, jnp.inf, 0.0)
        return acc, lse, jnp.zeros_like(lse), visited
    has_keys = total > 0
    out = acc / jnp.where(has_keys, total, 1.0)[..., None]
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    norm = jnp.where(has_keys, m_safe + jnp.log(jnp.where(has_keys, total, 1.0)), -jnp.inf)
    return out, jnp.where(infinite, jnp.inf, norm), norm, visited


def _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions):
    blocks = _query_blocks(static, q, bias, mask)
    k_blocks = _split_keys(static, k, 2, broadcast=False)
    v_blocks = _split_keys(static, v, 2, broadcast=False)

    def one_block(i):
        row = _row(static, blocks, bias, mask, i, listing, functions)
        return _forward_block(static, row, k_blocks, v_blocks, q_lengths, kv_lengths)

    out, lse, norm, visited = jax.lax.map(one_block, jnp.arange(blocks.q.shape[0]))
    T = q.shape[3]
    return _join(out, 3, T), _join(lse, 3, T), _join(norm, 3, T), visited


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions):
    return _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions)


def _attention_fwd(static, q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions):
    out, lse, norm, visited = _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions)
    residuals = (q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions, out, lse, norm)
    return (out, lse, norm, visited), residuals


def _weights(static, visible: jax.Array | None, s: jax.Array, lse: jax.Array, norm: jax.Array) -> jax.Array:
    """The weights of one block of logits [.., Tq, Sk] given its rows' lse and log-normaliser [.., Tq]:
    sigmoid(s) or e^(s - norm), and on a row holding +inf, 1 or e^(-norm) on its +inf keys; 0 where not visible."""
    infinite = (lse == jnp.inf)[..., None]
    norm = jnp.where(jnp.isfinite(norm), norm, 0.0)[..., None]
    at_infinity = s == jnp.inf
    if static.kind == "elementwise":
        p = jnp.where(infinite, at_infinity.astype(F32), jax.nn.sigmoid(s))
    else:
        p = jnp.where(infinite, jnp.where(at_infinity, jnp.exp(-norm), 0.0), jnp.exp(s - norm))
    return _keep(visible, p)


def _backward_block(
    static, row: _Row, k_blocks, v_blocks, q_lengths, kv_lengths, out_i, lse_i, norm_i, d_out_i, d_lse_i, dk, dv,
    d_score,
):  # fmt: skip
    """dq_i and d bias_i (shaped like bias_i) of one query block; adds its dk, dv into the key blocks
    and its cotangents of the score function's arrays into d_score.

    With a cotangent d_lse on the rows' lse (d lse / d s = p), ds = p (dp - D + d_lse): it enters
    as D - d_lse. The elementwise kind's lse is a constant."""
    delta = jnp.sum(d_out_i * out_i, axis=-1)[..., None]
    if static.kind == "softmax":
        delta = delta - d_lse_i[..., None]
    finite = (lse_i != jnp.inf)[..., None]  # a row cut to its +inf keys has constant weights
    keys_broadcast = row.bias is not None and row.bias_blocks is None
    q32 = row.q.astype(F32)

    def step(j, carry, masked):
        dq, dk, dv, dbias, d_score = carry
        s, visible, pullback = row.logits(static, k_blocks, q_lengths, kv_lengths, j, masked)
        p = _weights(static, visible, s, lse_i, norm_i)
        dv = dv.at[j].add(grouped_key_product(p, d_out_i))
        dp = grouped_scores(d_out_i, v_blocks[j].astype(F32))
        ds = p * (1.0 - p) * dp if static.kind == "elementwise" else jnp.where(finite, p * (dp - delta), 0.0)
        if pullback is not None:  # through the score function, to the raw logits and its arrays
            ds, d_consts = pullback(ds)
            d_score = add_cotangents(d_score, d_consts)
        dq = dq + grouped_values(ds, k_blocks[j].astype(F32))
        dk = dk.at[j].add(grouped_key_product(ds, q32))
        if keys_broadcast:
            dbias = dbias + reduce_to(ds, row.bias.shape)
        elif row.bias is not None:
            dbias = dbias.at[j].set(reduce_to(ds, row.bias_blocks.shape[1:]))
        return dq, dk, dv, dbias, d_score

    if row.bias is None:
        dbias = None
    elif keys_broadcast:
        dbias = jnp.zeros(row.bias.shape, F32)
    else:
        dbias = jnp.zeros(row.bias_blocks.shape, F32)
    dq, dk, dv, dbias, d_score = row.visit(step, (jnp.zeros(row.q.shape, F32), dk, dv, dbias, d_score))
    if dbias is not None and not keys_broadcast:
        dbias = _join(dbias, -1, static.num_keys)
    return dq, dbias, dk, dv, d_score


def _attention_bwd(static, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, listing, functions, out, lse, norm = residuals
    # lse has a cotangent when a traced sink is applied after the pass (online_softmax_attention);
    # norm feeds only the statistics, which are stop-gradient.
    d_out, d_lse = cotangents[0], cotangents[1]
    T, S = q.shape[3], k.shape[2]
    blocks = _query_blocks(static, q, bias, mask)
    num_blocks = blocks.q.shape[0]
    by_query = partial(_split, block=static.query_block, num_blocks=num_blocks, axis=3, broadcast=False)
    out_blocks, lse_blocks, norm_blocks = by_query(out), by_query(lse), by_query(norm)
    d_lse_blocks = by_query(d_lse.astype(F32))
    d_out_blocks = by_query(d_out.astype(F32))
    k_blocks = _split_keys(static, k, 2, broadcast=False)
    v_blocks = _split_keys(static, v, 2, broadcast=False)
    queries_broadcast = bias is not None and blocks.bias is None

    def step(carry, i):
        dk, dv, dbias_acc, d_score = carry
        row = _row(static, blocks, bias, mask, i, listing, functions)
        dq_i, dbias_i, dk, dv, d_score = _backward_block(
            static, row, k_blocks, v_blocks, q_lengths, kv_lengths,
            out_blocks[i], lse_blocks[i], norm_blocks[i], d_out_blocks[i], d_lse_blocks[i], dk, dv, d_score,
        )  # fmt: skip
        if queries_broadcast:
            dbias_acc = dbias_acc + reduce_to(dbias_i, bias.shape)
            dbias_i = None
        return (dk, dv, dbias_acc, d_score), (dq_i, dbias_i)

    zeros_like_blocks = lambda x: jnp.zeros(x.shape, F32)  # noqa: E731
    init = (
        zeros_like_blocks(k_blocks),
        zeros_like_blocks(v_blocks),
        jnp.zeros(bias.shape, F32) if queries_broadcast else None,
        zero_cotangents(functions.score),
    )
    (dk, dv, dbias_acc, d_score), (dq, dbias) = jax.lax.scan(step, init, jnp.arange(num_blocks))
    if bias is None:
        d_bias = None
    elif queries_broadcast:
        d_bias = dbias_acc.astype(bias.dtype)
    else:
        d_bias = reduce_to(_join(dbias, 3, T), bias.shape).astype(bias.dtype)
    dq = _join(dq, 3, T)
    dk, dv = _join(dk, 2, S), _join(dv, 2, S)
    d_functions = _Functions(tuple(None for _ in functions.mask), cast_cotangents(d_score, functions.score))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None, None, d_functions)


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Pass(NamedTuple):
    """What one call's passes need besides the operands: the static options, the key blocks each
    query block visits when a mask function decides them (else None: KeyBlockRanges) and the
    arrays the mask and score functions close over."""

    static: _Static
    listing: tuple[jax.Array, jax.Array] | None
    functions: _Functions


def _prepare(
    visibility: Visibility, q: jax.Array, k: jax.Array, key_block: int, query_block: int, kind: str, sink, score_fn
) -> _Pass:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; accepted: {', '.join(map(repr, KINDS))}")
    if sink is not None and kind != "softmax":
        raise ValueError(f"a sink (sink={sink!r}) needs kind='softmax'; got kind={kind!r}")
    B, K, G = q.shape[:3]
    key_block, query_block = max(1, min(key_block, k.shape[2])), max(1, min(query_block, q.shape[3]))
    heads = (B, K, G)
    indices = mask_indices(heads, jnp.arange(query_block), jnp.arange(key_block))
    mask_fn = convert(visibility.mask_fn, *indices)
    score_fn = convert(score_fn, jnp.zeros((B, K, G, query_block, key_block), F32), *indices)
    listing = None
    if visibility.mask_fn is not None:
        blocks = block_map(dataclasses.replace(visibility, heads=heads), query_block, key_block)
        listing = (blocks.count, blocks.indices)
    static = _Static(
        visibility.num_queries,
        visibility.num_keys,
        visibility.is_causal,
        visibility.local_window,
        key_block,
        query_block,
        visibility.only_structured and visibility.query_lengths is None and visibility.key_lengths is None,
        kind,
        None if sink is None else float(sink),
        heads,
        None if mask_fn is None else mask_fn.call,
        None if score_fn is None else score_fn.call,
        listing is not None,
    )
    functions = _Functions(() if mask_fn is None else mask_fn.consts, () if score_fn is None else score_fn.consts)
    return _Pass(static, listing, functions)


class Rows(NamedTuple):
    """Per query [B, K, G, T], from the forward pass (not differentiated).

    lse: log(e^sink + sum over the visible keys of e^s) (softmax kind; -inf for a row with nothing
      visible and no sink, +inf for a row holding +inf); 0 for the elementwise kind (+inf likewise).
    norm: what the weights are normalised by, e^(s - norm): lse, except on a row holding +inf, where
      it is the log of its number of +inf keys (0 for the elementwise kind).
    """

    lse: jax.Array
    norm: jax.Array
    key_blocks_visited: jax.Array | None = None  # [num_query_blocks] int32: the forward pass's key-block steps


def online_softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    *,
    key_block: int,
    query_block: int,
    kind: str = "softmax",
    sink: float | jax.Array | None = None,
    score_fn=None,
) -> tuple[jax.Array, Rows]:
    """q [B, K, G, T, H] (scale and any scale-policy factor folded in), k/v [B, K, S, H].

    Queries go `query_block` at a time, each through an online pass over the `key_block`-sized
    key blocks it can see, so at most [B, N, query_block, key_block] logits exist at once, in
    both passes. kind="softmax" weighs the keys e^s / (e^sink + sum e^s) (no sink: None;
    softmax1: 0); kind="elementwise" weighs them sigmoid(s) (any bias, e.g. -log n, folded into
    `bias`). Returns out [B, K, G, T, H] float32 and the rows' `Rows`.

    A Python-number sink is a logit the pass starts from. An array sink (traced, learned, one per
    head: anything broadcasting against [B, K, G, T]) is applied after a pass without it, with the
    same weights: out * sigmoid(lse - sink) and lse' = log(e^lse + e^sink); its gradient, and the
    logits', flow through lse (the pass's backward takes lse's cotangent).

    A mask function (visibility.mask_fn) decides, once per call, which key blocks each query block
    visits (attention.mask_functions.block_map) and joins the mask of every block it visits; a
    score function maps each block's logits (s = score_fn(q k^T + bias, b, h, q_idx, kv_idx)) in
    both passes, its float arrays getting their gradients through the backward.
    """
    applied_after = sink is not None and not isinstance(sink, (int, float))
    prepared = _prepare(visibility, q, k, key_block, query_block, kind, None if applied_after else sink, score_fn)
    if applied_after and kind != "softmax":
        raise ValueError(f"a sink needs kind='softmax'; got kind={kind!r}")
    out, lse, norm, visited = _attention(
        prepared.static, q, k, v, bias, visibility.mask, visibility.query_lengths, visibility.key_lengths,
        prepared.listing, prepared.functions,
    )  # fmt: skip
    if applied_after:
        sink = jnp.asarray(sink, F32)
        out = out * jax.nn.sigmoid(lse - sink)[..., None]
        # A row holding +inf keeps its weights (and lse); every other row gains the sink's mass.
        with_sink = jnp.logaddexp(jax.lax.stop_gradient(lse), jax.lax.stop_gradient(sink))
        at_infinity = lse == jnp.inf
        lse, norm = jnp.where(at_infinity, lse, with_sink), jnp.where(at_infinity, norm, with_sink)
    return out, Rows(jax.lax.stop_gradient(lse), jax.lax.stop_gradient(norm), visited)


def softmax_statistics(
    q: jax.Array,
    k: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    rows: Rows,
    mass_keys: jax.Array | None,
    *,
    key_block: int,
    query_block: int,
    kind: str = "softmax",
    sink: float | None = None,
    score_fn=None,
) -> dict[str, jax.Array]:
    """max weight, entropy (-sum p log p), exact support size and key mass from a second pass, with
    the weights of `online_softmax_attention` given its `rows`."""
    q, k = (jax.lax.stop_gradient(x) for x in (q, k))
    bias = None if bias is None else jax.lax.stop_gradient(bias)
    prepared = _prepare(visibility, q, k, key_block, query_block, kind, sink, score_fn)
    static, listing = prepared.static, prepared.listing
    functions = jax.tree.map(jax.lax.stop_gradient, prepared.functions)
    mask = visibility.mask
    T = q.shape[3]
    blocks = _query_blocks(static, q, bias, mask)
    by_query = partial(_split, block=static.query_block, num_blocks=blocks.q.shape[0], axis=3, broadcast=False)
    lse_blocks, norm_blocks = by_query(rows.lse), by_query(rows.norm)
    k_blocks = _split_keys(static, k, 2, broadcast=False)
    mass_blocks = _split_keys(static, mass_keys, -1, fill=False)

    def one_query_block(i):
        row = _row(static, blocks, bias, mask, i, listing, functions)
        infinite = (lse_blocks[i] == jnp.inf)[..., None]
        norm = jnp.where(jnp.isfinite(norm_blocks[i]), norm_blocks[i], 0.0)[..., None]

        def step(j, totals, masked):
            s, visible, _ = row.logits(static, k_blocks, visibility.query_lengths, visibility.key_lengths, j, masked)
            p = _weights(static, visible, s, lse_blocks[i], norm_blocks[i])
            # log p where p > 0, exact (not log of a rounded p)
            if static.kind == "elementwise":
                log_p = jnp.where(infinite, 0.0, jax.nn.log_sigmoid(jnp.where(p > 0, s, 0.0)))
            else:
                log_p = jnp.where(infinite, -norm, jnp.where(p > 0, s, 0.0) - norm)
            update = {
                "max_weight": jnp.maximum(totals["max_weight"], jnp.max(p, axis=-1)),
                "entropy": totals["entropy"] - jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1),
                "support_size": totals["support_size"] + jnp.sum(p > 0, axis=-1, dtype=F32),
            }
            if mass_keys is not None:
                on_keys = _pick(mass_keys, mass_blocks, j)
                update["key_mass"] = totals["key_mass"] + jnp.sum(jnp.where(on_keys, p, 0.0), axis=-1)
            return update

        zeros = jnp.zeros(lse_blocks.shape[1:], F32)
        init = {"max_weight": zeros, "entropy": zeros, "support_size": zeros}
        if mass_keys is not None:
            init["key_mass"] = zeros
        return row.visit(step, init)

    totals = jax.lax.map(one_query_block, jnp.arange(blocks.q.shape[0]))
    return {name: _join(value, 3, T) for name, value in totals.items()}
