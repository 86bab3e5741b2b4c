"""Attention with the entmax family (sparsemax, 1.5-entmax, alpha-entmax) by query blocks, fast.

For a static alpha in (1, 2] the weights of query t are

    p_t = [u_t - tau_t]_+^(1/(alpha-1)) / Z_t,     u_t = (alpha - 1) s_t,     s_t = q_t K^T + b_t,

with tau_t the exact threshold (attnlab.normalizers.thresholds, of u shifted so that its maximum is
0) and Z_t = sum p (1 up to rounding). The factor alpha - 1 rides on the queries
and the bias, so the logits come out of the matmul as u. Queries go `query_block` at a time, of
every head or (split heads, the choice on a CPU) of one batch row and key-value head at a time;
each block builds only the logits of the keys its queries can see: under a causal mask the query
blocks are gathered into a few groups, each with one static key extent (the largest end among
its blocks), so a causal call does about (groups + 1) / (2 groups) of the full work.

Per block: one pass takes the maxima of 128-key chunks (their maximum is the row's), whose own
threshold is a lower bound that starts the row's Newton search close to its root; then a few
passes (one per Newton step) find tau; one more forms the weights, and out = (w V) / Z.

The forward keeps tau, Z, the shift and the +inf flag per query (O(T) memory), so the backward
rebuilds p in one elementwise pass, with no threshold search, and applies the entmax Jacobian in
closed form:

    dp = dout V^T,   w = p^(2 - alpha) on the support,   dz = w * dp - w * sum(w dp) / sum(w),
    du = dz / (alpha - 1),   dv = p^T dout,   dq = du K,   dk = du^T q,   db = du.

Infinite logits are taken as the dense reference takes them: -inf is a hidden key, and a row
holding +inf is cut to its +inf keys (uniform weights over them, zero gradient to its logits).

Memory is O(query_block * S) per batch and head in both passes.

A mask function (attention.mask_functions) joins each block's mask; a score function maps each
block's logits, u = (alpha - 1) score_fn(s), and the backward takes du through its pullback (its
float arrays get their gradients there). Rows are whole here: no key block is skipped.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention import statistics
from attnlab.attention.blocks import Group, grouped_key_product, grouped_scores, grouped_values, plan_groups, reduce_to
from attnlab.attention.mask_functions import add_cotangents, cast_cotangents, convert, zero_cotangents
from attnlab.attention.masks import Visibility, mask_indices
from attnlab.normalizers.mappings import jacobian_weights
from attnlab.normalizers.thresholds import entmax_threshold

F32 = jnp.float32
# Keys per chunk whose maxima seed the threshold search (see _shifted).
CHUNK = 128
# Default query blocks (see default_query_block). Blocks of every head hold about this many logits
# ([B N, query_block, S]): small enough that the threshold passes over a block stay in cache ...
QUERY_BLOCK_ELEMENTS = 1 << 20
# ... but never fewer queries than this (thinner blocks make the matmuls inefficient).
MIN_QUERY_BLOCK = 32
# Blocks of one head (split heads, on a CPU) hold about this many logits, and at least this many
# queries: causal, 8 heads x 64, float32 on a 2-core CPU, the forward was fastest at 256 queries
# for n = 2048 and 128 for n = 4096 and 8192 (sparsemax 69 / 293 / 1186 ms; 512 queries at 2048
# and 256 at 8192 were 1.2-1.4x slower, 64 at 4096 and 8192 1.3x).
SPLIT_QUERY_BLOCK_ELEMENTS = 1 << 19
SPLIT_MIN_QUERY_BLOCK = 128


def default_query_block(heads: int, keys: int, *, split_heads: bool = False) -> int:
    """Queries per block when the caller gives none, for blocks of `heads` query heads (all B N of
    the call, or a key-value head's G with split heads) over `keys` keys."""
    if split_heads:
        return max(SPLIT_MIN_QUERY_BLOCK, SPLIT_QUERY_BLOCK_ELEMENTS // max(1, heads * keys))
    return max(MIN_QUERY_BLOCK, QUERY_BLOCK_ELEMENTS // max(1, heads * keys))


class _Static(NamedTuple):
    alpha: float
    num_queries: int
    num_keys: int
    is_causal: bool
    local_window: tuple[int, int] | None
    query_block: int
    groups: tuple[Group, ...]
    heads: tuple[int, int, int] = (1, 1, 1)  # (B, K, G), the index ranges of mask_fn and score_fn
    functions: tuple = ()  # per group: (mask_fn, score_fn), closure-converted at its extent, or None
    split_heads: bool = False  # a block holds one batch row and key-value head (its G query heads), not all

    @property
    def block_heads(self) -> tuple[int, int, int]:
        return _block_heads(self.heads, self.split_heads)


def _block_heads(heads: tuple[int, int, int], split_heads: bool) -> tuple[int, int, int]:
    """(B, K, G) of one block of a call over `heads` (B, K, G)."""
    return (1, 1, heads[2]) if split_heads else heads


def _power(gap: jax.Array, exponent: float) -> jax.Array:
    """gap^exponent for gap >= 0 (0 where gap is 0; NaN stays NaN)."""
    if exponent == 1.0:
        return gap
    if exponent == 2.0:
        return gap * gap
    inside = gap > 0
    return jnp.where(inside, jnp.exp(exponent * jnp.log(jnp.where(inside, gap, 1.0))), gap)


class _Block(NamedTuple):
    """One query block's operands, keys cut to its group's extent."""

    q: jax.Array  # [B, K, G, Tq, H]
    k: jax.Array  # [B, K, E, H]
    v: jax.Array
    bias: jax.Array | None  # [.., Tq|1, E|1]
    visible: jax.Array  # [.., Tq, E] bool (broadcastable)
    score: object = None  # (score_fn, its arrays) -> u = score_fn(s, b, h, q_idx, kv_idx, *arrays), or None
    indices: tuple = ()  # the block's (b, h, q_idx, kv_idx) index arrays


def _slice_block(static, q, k, v, bias, mask, q_lengths, kv_lengths, position, extent, group=None, consts=None):
    """The _Block at position (batch row, key-value head, query block), keys cut to `extent`."""
    block = static.query_block
    b, kv, index = position
    start = index * block
    q, k, v, bias, mask = (_at_heads(static, position, x) for x in (q, k, v, bias, mask))
    q_lengths, kv_lengths = (_at_heads(static, position, x, axes=(0,)) for x in (q_lengths, kv_lengths))

    def rows(x):
        if x is None or x.shape[3] == 1:
            return x
        return jax.lax.dynamic_slice_in_dim(x, start, block, axis=3)

    def keys(x):
        return x if x is None or x.shape[-1] == 1 else x[..., :extent]

    visibility = Visibility(
        static.num_queries, static.num_keys, static.is_causal, static.local_window, q_lengths, kv_lengths
    )
    query_pos = start + jnp.arange(block)
    visible = visibility.structured(query_pos, jnp.arange(extent))
    if mask is not None:
        visible = visible & keys(rows(mask))
    mask_fn, score_fn = (None, None) if group is None else static.functions[group]
    indices = mask_indices(static.block_heads, query_pos, jnp.arange(extent), head_offset=(b, kv))
    if mask_fn is not None:
        visible = visible & mask_fn(*indices, *consts[0])
    score = None if score_fn is None else (score_fn, consts[1])
    return _Block(rows(q), k[:, :, :extent], v[:, :, :extent], keys(rows(bias)), visible, score, indices)


def _raw_logits(blk: _Block) -> jax.Array:
    """q k^T + bias of the block, float32 [B, K, G, Tq, E]."""
    s = grouped_scores(blk.q, blk.k)
    return s if blk.bias is None else s + blk.bias.astype(F32)


def _scored(blk: _Block, s: jax.Array, score_consts=None) -> jax.Array:
    """The block's score function on its raw logits (the identity without one)."""
    if blk.score is None:
        return s
    score_fn, consts = blk.score
    return score_fn(s, *blk.indices, *(consts if score_consts is None else score_consts))


def _visible_logits(blk: _Block, s: jax.Array | None = None) -> jax.Array:
    """u [B, K, G, Tq, E]: the (already (alpha - 1)-scaled) logits (given as s, or computed), -inf
    where invisible."""
    s = _scored(blk, _raw_logits(blk)) if s is None else s
    return jnp.where(blk.visible, s, -jnp.inf)


def _cut_at_infinity(u: jax.Array, infinite: jax.Array) -> jax.Array:
    """u, with each row that holds a visible +inf ([..., 1] True) cut to its +inf keys, each at 0:
    uniform weights over them, as in the dense reference (a NaN in such a row is dropped too)."""
    return jnp.where(infinite, jnp.where(u == jnp.inf, 0.0, -jnp.inf), u)


def _unnormalised(alpha: float, u: jax.Array, tau: jax.Array) -> jax.Array:
    """[u - tau]_+^(1/(alpha-1)); a NaN logit stays NaN (so its row's output is NaN, as in the dense path)."""
    return _power(jnp.maximum(u - tau[..., None], 0.0), 1.0 / (alpha - 1.0))


def _shifted(alpha: float, u: jax.Array):
    """(u shifted, shift, origin, start, infinite) of visible logits u [..., n]: u cut at +inf (see
    _cut_at_infinity) with each row's maximum moved to 0; the shift [..., 1] (0 for a row with
    nothing visible); the rows' origin for the threshold search (0; -inf for a row with nothing
    visible); a lower bound of the shifted rows' thresholds (or None); whether each row holds a
    visible +inf [..., 1].

    Shifting first keeps the gaps u - tau exact for large logits (at |u| = 1e4 float32 rounds
    them to 1e-3). One pass takes the maximum of every chunk of CHUNK keys (their maximum is the
    row's, and +inf exactly when the row holds a +inf: NaN is left out of these maxima so that it
    cannot hide one); the threshold of the chunk maxima alone (a small problem) is a lower bound
    of the row's threshold, since dropping entries only lowers it, and it is usually close: Newton
    on the whole row then starts near the root and needs about half the passes it needs from max - 1.
    A NaN logit stays in u: its row's output is NaN, as in the dense path.
    """
    n = u.shape[-1]
    chunked = n % CHUNK == 0 and n >= 2 * CHUNK
    finite = jnp.where(jnp.isnan(u), -jnp.inf, u)
    if chunked:
        chunk_max = jnp.max(finite.reshape(*u.shape[:-1], n // CHUNK, CHUNK), axis=-1)
        m = jnp.max(chunk_max, axis=-1, keepdims=True)
    else:
        m = jnp.max(finite, axis=-1, keepdims=True)
    infinite = m == jnp.inf
    m = jnp.where(infinite, 0.0, m)  # the cut row's maximum
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    origin = m - shift
    start = None
    if chunked:
        start = entmax_threshold(_cut_at_infinity(chunk_max, infinite) - shift, None, alpha, origin=origin)
    return _cut_at_infinity(u, infinite) - shift, shift, origin, start, infinite


def _forward_block(static, blk: _Block, mass_keys, want_stats: bool):
    """out [B, K, G, Tq, H], the row constants (tau, Z, shift, infinite) [B, K, G, Tq] and statistics."""
    alpha = static.alpha
    u, shift, origin, start, infinite = _shifted(alpha, _visible_logits(blk))
    tau = entmax_threshold(u, None, alpha, origin=origin, start=start)[..., 0]
    weights = _unnormalised(alpha, u, tau)
    total = jnp.sum(weights, axis=-1)
    total = jnp.where(total > 0, total, 1.0)  # a row with no visible key: weights and output 0
    out = grouped_values(weights.astype(blk.v.dtype), blk.v)
    out = out / total[..., None]
    stats = {}
    if want_stats:
        p = weights / total[..., None]
        stats = statistics.from_weights(p, None if mass_keys is None else mass_keys[..., : u.shape[-1]])
    return out, (tau, total, shift[..., 0], infinite[..., 0]), stats


def _positions(static, group: Group) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(batch row, key-value head, query block) of each block of a group, in loop order: with split
    heads, one head's query blocks after another (its keys stay in cache); else (0, 0, block)."""
    blocks = group.first + jnp.arange(group.count)
    if not static.split_heads:
        zeros = jnp.zeros(group.count, jnp.int32)
        return zeros, zeros, blocks
    B, K, _ = static.heads
    b, kv, index = jnp.meshgrid(jnp.arange(B), jnp.arange(K), blocks, indexing="ij")
    return b.ravel(), kv.ravel(), index.ravel()


def _by_block(static, x: jax.Array, count: int) -> jax.Array:
    """A group's per-block results in loop order ([blocks, B|1, K|1, ...]) -> [count, B, K, ...]."""
    if not static.split_heads:
        return x
    B, K, _ = static.heads
    return jnp.moveaxis(x.reshape(B, K, count, *x.shape[3:]), 2, 0)


def _at_heads(static, position, x: jax.Array | None, axes=(0, 1)) -> jax.Array | None:
    """x [B|1, K|1, ...] at the block's batch row and key-value head (axes of size 1 broadcast and
    stay; everything stays without split heads); axes=(0,) for arrays over batch rows alone."""
    if x is None or not static.split_heads:
        return x
    for axis, i in zip(axes, position[:2], strict=False):
        if x.shape[axis] != 1:
            x = jax.lax.dynamic_slice_in_dim(x, i, 1, axis)
    return x


def _accumulate(total: jax.Array, update: jax.Array, start: tuple) -> jax.Array:
    """total with update added to its slice at `start` (the slice has update's shape)."""
    current = jax.lax.dynamic_slice(total, start, update.shape)
    return jax.lax.dynamic_update_slice(total, current + update.astype(total.dtype), start)


def _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths, mass_keys, functions, want_stats):
    pad = partial(_pad_queries, static)
    q, bias, mask = pad(q), pad(bias), pad(mask)
    outs, rows, stats = [], [], []
    for g, group in enumerate(static.groups):

        def one(position, extent=group.extent, g=g):
            blk = _slice_block(static, q, k, v, bias, mask, q_lengths, kv_lengths, position, extent, g, functions[g])
            return _forward_block(static, blk, _at_heads(static, position, mass_keys), want_stats)

        out, row, stat = jax.tree.map(
            partial(_by_block, static, count=group.count), jax.lax.map(one, _positions(static, group))
        )
        outs.append(out)
        rows.append(row)
        stats.append(stat)
    join = partial(_join_blocks, static.num_queries)
    row = tuple(join([r[i] for r in rows]) for i in range(len(rows[0])))
    return join(outs), row, {name: join([s[name] for s in stats]) for name in stats[0]}


def _join_blocks(num_queries: int, parts: list[jax.Array]) -> jax.Array:
    """Per-group [blocks, B, K, G, Tq, ...] -> [B, K, G, T, ...]."""
    x = jnp.moveaxis(jnp.concatenate(parts, axis=0), 0, 3)
    x = x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], *x.shape[5:])
    return x[:, :, :, :num_queries]


def _pad_queries(static, x):
    """Pad axis 3 (queries) to whole blocks; size-1 (broadcast) axes stay."""
    if x is None or x.shape[3] == 1:
        return x
    total = sum(g.count for g in static.groups) * static.query_block
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, total - x.shape[3])
    return jnp.pad(x, pad)


@partial(jax.custom_vjp, nondiff_argnums=(0, 10))
def _attention(static, q, k, v, bias, mask, q_lengths, kv_lengths, mass_keys, functions, want_stats):
    out, _, stats = _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths, mass_keys, functions, want_stats)
    return out, stats


def _attention_fwd(static, q, k, v, bias, mask, q_lengths, kv_lengths, mass_keys, functions, want_stats):
    out, row, stats = _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths, mass_keys, functions, want_stats)
    return (out, stats), (q, k, v, bias, mask, q_lengths, kv_lengths, functions, row)


def _add_bias_grad(d_bias: jax.Array, ds: jax.Array, position, query_block: int) -> jax.Array:
    """d bias [B|1, K|1, G|1, T|1 (padded), S|1] plus the block's ds [B|1, K|1, G, Tq, E] (its
    heads, queries and first E keys), summed over the axes the bias broadcasts along."""
    b, kv, index = position
    share = reduce_to(ds, tuple(1 if n == 1 else m for n, m in zip(d_bias.shape, ds.shape, strict=True)))
    starts = (b, kv, 0, index * query_block, 0)
    return _accumulate(d_bias, share, tuple(s if n != 1 else 0 for s, n in zip(starts, d_bias.shape, strict=True)))


def _attention_bwd(static, want_stats, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, functions, (tau, total, shift, infinite) = residuals
    alpha = static.alpha
    block = static.query_block
    pad = partial(_pad_queries, static)
    q_p, bias_p, mask_p = pad(q), pad(bias), pad(mask)
    d_out_p = pad(cotangents[0].astype(F32))
    tau_p, total_p, shift_p, infinite_p = (pad(x[..., None]) for x in (tau, total, shift, infinite))
    dk, dv = jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)
    d_bias = None if bias is None else jnp.zeros(bias_p.shape, F32)
    dq_parts, d_functions = [], []
    for g, group in enumerate(static.groups):
        score_consts = functions[g][1]

        def step(carry, position, extent=group.extent, g=g, score_consts=score_consts):
            dk, dv, d_bias, d_score = carry
            blk = _slice_block(
                static, q_p, k, v, bias_p, mask_p, q_lengths, kv_lengths, position, extent, g, functions[g]
            )
            b, kv, index = position

            def rows(x):  # the block's heads and queries of x [B, K, G, T (padded), ...]
                return jax.lax.dynamic_slice_in_dim(_at_heads(static, position, x), index * block, block, axis=3)

            total_i = rows(total_p)  # 0 on padding rows, whose weights are all 0
            s, pullback = jax.vjp(partial(_scored, blk), _raw_logits(blk), score_consts)
            infinite_i = rows(infinite_p)
            u = _cut_at_infinity(_visible_logits(blk, s), infinite_i) - rows(shift_p)
            p = _unnormalised(alpha, u, rows(tau_p)[..., 0]) / jnp.where(total_i > 0, total_i, 1.0)
            d_out_i = rows(d_out_p)
            keys_at = (b, kv, 0, 0)  # the block's head and first `extent` keys in dk, dv
            dv = _accumulate(dv, grouped_key_product(p, d_out_i), keys_at)
            dp = grouped_scores(d_out_i, blk.v.astype(F32))
            w = jacobian_weights(p, alpha)
            w_total = jnp.sum(w, axis=-1, keepdims=True)
            # The entmax Jacobian w.r.t. z, divided by (alpha - 1): the logits here are (alpha - 1) z.
            ds = w * (dp - jnp.sum(w * dp, axis=-1, keepdims=True) / jnp.where(w_total > 0, w_total, 1.0))
            ds = jnp.where(infinite_i, 0.0, ds / (alpha - 1.0))  # a row cut to its +inf keys is constant
            if blk.score is not None:  # through the score function, to the raw logits and its arrays
                ds, d_consts = pullback(ds)
                d_score = add_cotangents(d_score, d_consts)
            dq_i = grouped_values(ds, blk.k.astype(F32))
            dk = _accumulate(dk, grouped_key_product(ds, blk.q.astype(F32)), keys_at)
            if bias is not None:
                d_bias = _add_bias_grad(d_bias, ds, position, block)
            return (dk, dv, d_bias, d_score), dq_i

        init = (dk, dv, d_bias, zero_cotangents(score_consts))
        (dk, dv, d_bias, d_score), dq_g = jax.lax.scan(step, init, _positions(static, group))
        dq_parts.append(_by_block(static, dq_g, group.count))
        d_functions.append((tuple(None for _ in functions[g][0]), cast_cotangents(d_score, score_consts)))

    if d_bias is not None:
        d_bias = d_bias[:, :, :, : bias.shape[3]].astype(bias.dtype)
    return (
        _join_blocks(static.num_queries, dq_parts).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias,
        None, None, None, None, tuple(d_functions),
    )  # fmt: skip


_attention.defvjp(_attention_fwd, _attention_bwd)


def sparse_blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    alpha: float,
    *,
    query_block: int | None = None,
    max_groups: int = 8,
    want_stats: bool = False,
    mass_keys: jax.Array | None = None,
    score_fn=None,
    split_heads: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """alpha-entmax attention, alpha a Python float in (1, 2].

    q [B, K, G, T, H] (scale and any scale-policy factor folded in), k/v [B, K, S, H], bias
    broadcasting against the grouped logits [B, K, G, T, S]. Returns out [B, K, G, T, H] float32
    and, with `want_stats`, statistics [B, K, G, T] (not differentiated). A mask function
    (visibility.mask_fn) and a score function (logits = score_fn(q k^T + bias, ...)) apply per block.

    A block holds `query_block` queries (None: `default_query_block`) of every head, or with
    `split_heads` of one batch row and key-value head (its G query heads), the blocks going one
    head after another. On a CPU the
    split blocks are the fast choice: for the same logits per block they take more queries per
    head, so the matmuls are thicker, and the block's logits and keys stay in cache over the
    threshold passes (causal, B = 1, 8 heads x 64, float32, n = 4096, a 2-core CPU, through
    dot_product_attention: the sparsemax forward took 504-641 ms in blocks of 32 queries of every
    head, 293-356 ms in blocks of 128-256 queries of one head). On an accelerator one block over
    all heads keeps it busy.
    """
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"sparse_blocked_attention needs 1 < alpha <= 2; got alpha={alpha}")
    B, K, G, T = q.shape[:4]
    S = k.shape[2]
    block_heads = _block_heads((B, K, G), split_heads)
    if query_block is None:
        query_block = default_query_block(math.prod(block_heads), S, split_heads=split_heads)
    query_block = max(1, min(query_block, T))
    groups = plan_groups(T, S, visibility.is_causal, query_block, max_groups)
    if score_fn is None:
        # Work on u = (alpha - 1) s directly: the factor rides on the queries and the bias.
        q, bias = q * (alpha - 1.0), None if bias is None else bias * (alpha - 1.0)
    else:
        given = score_fn

        def score_fn(s, b, h, q_idx, kv_idx):
            return (alpha - 1.0) * given(s, b, h, q_idx, kv_idx)

    converted, functions = [], []
    for group in groups:
        indices = mask_indices(block_heads, jnp.arange(query_block), jnp.arange(group.extent))
        mask_c = convert(visibility.mask_fn, *indices)
        score_c = convert(score_fn, jnp.zeros((*block_heads, query_block, group.extent), F32), *indices)
        converted.append(tuple(None if c is None else c.call for c in (mask_c, score_c)))
        functions.append(tuple(() if c is None else c.consts for c in (mask_c, score_c)))
    static = _Static(
        float(alpha), T, S, visibility.is_causal, visibility.local_window, query_block, groups, (B, K, G),
        tuple(converted), split_heads,
    )  # fmt: skip
    out, stats = _attention(
        static, q, k, v, bias, visibility.mask, visibility.query_lengths, visibility.key_lengths,
        mass_keys, tuple(functions), want_stats,
    )  # fmt: skip
    stats = {name: jax.lax.stop_gradient(value) for name, value in stats.items()}
    return out, stats
