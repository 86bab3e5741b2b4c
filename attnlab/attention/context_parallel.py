"""Context-parallel attention: the sequence axis sharded over a mesh axis, exact for every normalizer.

P devices on the mesh axis `axis_name` each hold T / P rows of query, key and value. Rows are
assigned to devices by a *layout* (a permutation of the positions, `layout_positions`):

    zigzag      the sequence cut into 2P chunks; device i holds chunks i and 2P - 1 - i, so under a
                causal mask every device has one early and one late chunk: the same work
    striped     device i holds positions i, i + P, i + 2P, ... (balanced too, but no block of keys
                is ever wholly hidden, so no block is skipped)
    contiguous  device i holds positions [i T / P, (i + 1) T / P) (causal work unbalanced: the last
                device does 2P - 1 times the first one's)

Three schemes, each exact (the same weights as the single-device call, up to rounding):

    ring               K/V blocks travel around the ring (`ppermute`, P - 1 hops); each device runs
                       the online pass (attention.online_softmax) of its queries against the block at
                       hand and merges the partial results by their log-sum-exp,
                           lse = log(e^lse_a + e^lse_b),  out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b;
                       a sink joins once at the end, out * sigmoid(lse - sink); sigmoid adds its parts.
                       The backward is a second ring: K/V travel again with their dk, dv accumulators,
                       each step the online pass's own block backward given the *global* out and lse
                       (p = e^(s - lse) is then the global weight). K/V are never gathered: memory
                       O(T / P) per device besides the blocks of logits.
                       Serves the softmax family (softmax, temperature, SSMax and the log-n maps folded
                       into q, softmax1 and learned sinks) and sigmoid.
    sharded_threshold  for alpha-entmax with one alpha in (1, 2] (sparsemax, 1.5-entmax, their log-n
                       versions, ASEntmax, Llama 4's scaled 1.5-entmax): keys stay on their device;
                       queries go a block at a time, gathered from every device (`all_gather` of
                       query_block rows each), and every device evaluates the logits of all those rows
                       against its own keys. The threshold tau of each row solves
                           sum_i [u_i - tau]_+^(1/(alpha-1)) = 1,   u = (alpha - 1) z,
                       and each Newton / closed-form step of attnlab.normalizers.thresholds needs only
                       sums over the row (|S|, sum g, sum g^2 or sum g^q, sum g^(q-1), and min_S u), so
                       each device reduces its part and the parts are `psum`-ed (the minimum `pmin`-ed):
                       every device takes the same step, and tau is exact. The output's parts p V are
                       `psum_scatter`-ed back to the rows' owners. The backward (closed-form entmax
                       Jacobian, dz = w dp - w sum(w dp) / sum(w), w = p^(2 - alpha) on the support)
                       psums its two row sums likewise. Memory O(T / P) per device besides the logits.
    all_gather         any normalizer: each device all-gathers K/V (Llama 3's context parallelism) and
                       runs the single-device memory-efficient backend (`dot_product_attention`,
                       implementation="chunked" by default) on its own queries against every key, with
                       a mask function that gives each local row its global position. Gradients come
                       from that backend's own custom VJP (all_gather transposes to a reduce-scatter).

The masks are the causal one (`is_causal`) and documents (`segment_ids`), both on global
positions; a scale policy's n (SSMax's s log n, ...) is each query's number of visible keys over
the whole sequence, as on one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from attnlab.attention import families, online_softmax
from attnlab.attention.api import _as_float, _check_shapes, dot_product_attention, resolve_normalizer
from attnlab.attention.blocks import grouped_key_product, grouped_scores, grouped_values, join, split
from attnlab.attention.masks import Visibility, group_queries, ungroup_queries
from attnlab.attention.online_softmax import DEFAULT_KEY_BLOCK, DEFAULT_QUERY_BLOCK
from attnlab.attention.sparse_blocked import _power
from attnlab.normalizers import Normalizer
from attnlab.normalizers._rows import align_param
from attnlab.normalizers.mappings import jacobian_weights
from attnlab.normalizers.recent import default_sigmoid_bias
from attnlab.normalizers.thresholds import CLOSED_FORMS, RESIDUAL_ULPS, _newton_closed_form, _row_pass

F32 = jnp.float32
LAYOUTS = ("zigzag", "striped", "contiguous")
SCHEMES = ("ring", "sharded_threshold", "all_gather")
"""implementation of the context-parallel pass; scheme=None takes the first that serves the normalizer."""
# sharded_threshold: each step holds about this many logits (gathered rows x local keys x batch x heads) ...
THRESHOLD_BLOCK_ELEMENTS = 1 << 20
# ... with at least this many rows from each device.
MIN_THRESHOLD_ROWS = 8
MAX_NEWTON_STEPS = 64

__all__ = [
    "LAYOUTS",
    "SCHEMES",
    "context_parallel_attention",
    "lay_out",
    "layout_positions",
    "restore_order",
    "scheme_reason",
]


# ---------------------------------------------------------------------------------------------- layouts


def _check_layout(length: int, shards: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; accepted: {', '.join(map(repr, LAYOUTS))}")
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"shards must be a positive int (the size of the mesh axis); got {shards!r}")
    parts = 2 * shards if layout == "zigzag" else shards
    if length < parts or length % parts:
        raise ValueError(
            f"sequence length {length} must be a positive multiple of {parts} "
            f"({'2 x ' if layout == 'zigzag' else ''}{shards} shards) for layout {layout!r}"
        )


def layout_positions(length: int, shards: int, layout: str = "zigzag") -> np.ndarray:
    """positions [length] int32: the natural position of each laid-out row; device i holds laid-out
    rows [i length / shards, (i + 1) length / shards).

    zigzag (chunks of C = length / (2 shards)): device i holds chunk i then chunk 2 shards - 1 - i;
    striped: device i holds i, i + shards, ...; contiguous: the identity.
    """
    _check_layout(length, shards, layout)
    if layout == "contiguous":
        return np.arange(length, dtype=np.int32)
    if layout == "striped":
        return np.arange(length, dtype=np.int32).reshape(-1, shards).T.reshape(-1)
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def lay_out(x: ArrayLike, shards: int, layout: str = "zigzag", *, axis: int = 1) -> jax.Array:
    """x with its sequence axis (`axis`, default 1 as in [B, T, ...]) in layout order:
    lay_out(x)[r] = x[layout_positions(...)[r]]. Lay tokens out once (with their positions and
    targets), run every layer on the laid-out sequence, and pass `laid_out=True`."""
    x = jnp.asarray(x)
    return jnp.take(x, jnp.asarray(layout_positions(x.shape[axis], shards, layout)), axis=axis)


def restore_order(x: ArrayLike, shards: int, layout: str = "zigzag", *, axis: int = 1) -> jax.Array:
    """The inverse of `lay_out`: natural order back from layout order."""
    x = jnp.asarray(x)
    inverse = np.argsort(layout_positions(x.shape[axis], shards, layout))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


# ---------------------------------------------------------------------------------------------- schemes


def scheme_reason(scheme: str, normalizer: Callable) -> str | None:
    """None if `scheme` can run `normalizer`, else the reason it cannot."""
    if scheme == "ring" and families.online_kind(normalizer) is None:
        return (
            "the ring runs the 'softmax' family (any sink), alpha-entmax at alpha = 1 and sigmoid; "
            f"{families.describe_family(normalizer)} is none of them (scheme='all_gather' runs any normalizer)"
        )
    if scheme == "sharded_threshold" and families.static_entmax_alpha(normalizer) is None:
        return (
            "the sharded threshold search runs the 'threshold' family with one concrete alpha in (1, 2]; "
            f"{families.describe_family(normalizer)} is not such a one (scheme='all_gather' runs any normalizer)"
        )
    return None


def _select_scheme(scheme: str | None, normalizer: Callable) -> str:
    if scheme is None:
        return next(s for s in SCHEMES if scheme_reason(s, normalizer) is None)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}; accepted: None, {', '.join(map(repr, SCHEMES))}")
    reason = scheme_reason(scheme, normalizer)
    if reason is not None:
        raise ValueError(f"scheme={scheme!r} cannot serve this call: {reason}")
    return scheme


def _check_parameters(normalizer: Callable) -> None:
    """A normalizer parameter with a query axis (one per query, [B, N, T, 1]) would need the query
    layout and sharding too: refused (one per head, [N, 1, 1], is fine)."""
    if not isinstance(normalizer, Normalizer):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(normalizer):
        shape = jnp.shape(leaf)
        padded = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else shape
        if len(padded) > 4 or padded[2] != 1 or padded[3] != 1:
            raise ValueError(
                f"normalizer {families.name(normalizer)!r}: parameter {jax.tree_util.keystr(path)} has shape "
                f"{shape}; context-parallel attention takes parameters that broadcast against [B, N, 1, 1] "
                "(a number, one per head [N, 1, 1]), not one per query"
            )


# ---------------------------------------------------------------------------------------------- masks


def _visible(q_pos: jax.Array, k_pos: jax.Array, segments: jax.Array | None, is_causal: bool) -> jax.Array:
    """bool [B|1, 1, 1, Tq, Sk]: query at global position q_pos [Tq] sees the key at k_pos [Sk]
    (a negative query position is a padding row: it sees nothing)."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    visible = jnp.broadcast_to(q >= 0, (q_pos.shape[0], k_pos.shape[0]))
    if is_causal:
        visible = visible & (k <= q)
    visible = visible[None, None, None]
    if segments is not None:
        length = segments.shape[1]
        q_ids = segments[:, jnp.clip(q_pos, 0, length - 1)]
        k_ids = segments[:, jnp.clip(k_pos, 0, length - 1)]
        visible = visible & (q_ids[:, None, None, :, None] == k_ids[:, None, None, None, :])
    return visible


def _position_mask(q_pos: jax.Array, k_pos: jax.Array, segments: jax.Array | None, is_causal: bool) -> Callable | None:
    """mask_fn(b, h, q_idx, kv_idx) (attention.mask_functions) for rows whose global positions are
    q_pos [Tq] and keys at k_pos [Sk]; None when nothing is masked."""
    if not is_causal and segments is None:
        return None

    def mask_fn(b, h, q_idx, kv_idx):
        qp = q_pos[jnp.clip(q_idx, 0, q_pos.shape[0] - 1)]
        kp = k_pos[jnp.clip(kv_idx, 0, k_pos.shape[0] - 1)]
        visible = kp <= qp if is_causal else jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
        if segments is not None:
            rows = jnp.clip(b, 0, segments.shape[0] - 1)
            visible = visible & (segments[rows, qp] == segments[rows, kp])
        return visible

    return mask_fn


# ---------------------------------------------------------------------------------------------- row factors


def _per_query(value_of: Callable, counts: jax.Array, heads: tuple[int, int, int], queries: int, keys: int):
    """value_of(counts [B|1, N, Tq, 1], align) grouped [B|1, K, G, Tq, 1] (as attention.backends does
    for one device: counts are each query's visible keys over the whole sequence)."""
    B, K, G = heads
    counts = jnp.broadcast_to(counts, (counts.shape[0], K, G, queries, 1)).reshape(counts.shape[0], K * G, queries, 1)

    def align(value, name):
        return align_param(value, name, (B, K * G, queries, keys), 3)

    value = value_of(counts, align)
    value = jnp.broadcast_to(value, jnp.broadcast_shapes(value.shape, counts.shape))
    return value.reshape(value.shape[0], K, G, queries, 1)


def _counts(q_pos, keys: int, segments, is_causal: bool, heads) -> jax.Array:
    """n [B|1, 1, 1, Tq, 1]: each local query's number of visible keys over all `keys` positions."""
    visibility = Visibility(
        num_queries=q_pos.shape[0],
        num_keys=keys,
        mask_fn=_position_mask(q_pos, jnp.arange(keys), segments, is_causal),
        heads=heads,
    )
    return visibility.visible_counts()


# ---------------------------------------------------------------------------------------------- ring


class _RingStatic(NamedTuple):
    axis_name: str
    shards: int
    kind: str  # "softmax" or "elementwise"
    is_causal: bool
    key_block: int
    query_block: int
    heads: tuple[int, int, int]


def _rotate(x: jax.Array, static) -> jax.Array:
    """Device i sends x to device i + 1 (mod P)."""
    return jax.lax.ppermute(x, static.axis_name, [(i, (i + 1) % static.shards) for i in range(static.shards)])


def _ring_pass(static: _RingStatic, q, k_block, q_pos, k_pos, segments) -> online_softmax._Pass:
    """The online pass of the local queries against one visiting K/V block (keys at k_pos)."""
    visibility = Visibility(
        num_queries=q.shape[3],
        num_keys=k_block.shape[2],
        mask_fn=_position_mask(q_pos, k_pos, segments, static.is_causal),
        heads=static.heads,
    )
    return online_softmax._prepare(
        visibility, q, k_block, static.key_block, static.query_block, static.kind, None, None
    )


def _ring_forward(static: _RingStatic, q, k, v, bias, q_pos, key_positions, segments):
    me = jax.lax.axis_index(static.axis_name)
    out = jnp.zeros(q.shape, F32)
    lse = jnp.full(q.shape[:4], -jnp.inf if static.kind == "softmax" else 0.0, F32)
    for step in range(static.shards):
        source = (me - step) % static.shards  # whose K/V block is here now
        prepared = _ring_pass(static, q, k, q_pos, key_positions[source], segments)
        out_s, lse_s, _, _ = online_softmax._forward(
            prepared.static, q, k, v, bias, None, None, None, prepared.listing, prepared.functions
        )
        if static.kind == "softmax":
            merged = jnp.logaddexp(lse, lse_s)
            safe = jnp.where(jnp.isfinite(merged), merged, 0.0)
            out = out * jnp.exp(lse - safe)[..., None] + out_s * jnp.exp(lse_s - safe)[..., None]
            lse = merged
        else:
            out = out + out_s
        if step < static.shards - 1:
            k, v = _rotate(k, static), _rotate(v, static)
    return out, lse


def _ring(static: _RingStatic, q, k, v, bias, q_pos, key_positions, segments):
    return _ring_forward(static, q, k, v, bias, q_pos, key_positions, segments)


_ring = jax.custom_vjp(_ring, nondiff_argnums=(0,))


def _ring_fwd(static, q, k, v, bias, q_pos, key_positions, segments):
    out, lse = _ring_forward(static, q, k, v, bias, q_pos, key_positions, segments)
    return (out, lse), (q, k, v, bias, q_pos, key_positions, segments, out, lse)


def _ring_bwd(static, residuals, cotangents):
    """The second ring: K/V travel with their dk, dv accumulators; each step is the online pass's
    block backward given the global out and lse, so its weights e^(s - lse) are the global ones."""
    q, k, v, bias, q_pos, key_positions, segments, out, lse = residuals
    d_out, d_lse = cotangents
    me = jax.lax.axis_index(static.axis_name)
    dq = jnp.zeros(q.shape, F32)
    dk, dv = jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)
    d_bias = None if bias is None else jnp.zeros(bias.shape, F32)
    norm = lse if static.kind == "softmax" else jnp.zeros_like(lse)
    for step in range(static.shards):
        source = (me - step) % static.shards
        prepared = _ring_pass(static, q, k, q_pos, key_positions[source], segments)
        saved = (q, k, v, bias, None, None, None, prepared.listing, prepared.functions, out, lse, norm)
        grads = online_softmax._attention_bwd(prepared.static, saved, (d_out, d_lse, None, None))
        dq = dq + grads[0].astype(F32)
        dk, dv = dk + grads[1].astype(F32), dv + grads[2].astype(F32)
        if bias is not None:
            d_bias = d_bias + grads[3].astype(F32)
        if step < static.shards - 1:
            k, v, dk, dv = (_rotate(x, static) for x in (k, v, dk, dv))
    # The accumulators of block i end on device i - 1 (P - 1 hops): one more hop takes them home.
    dk, dv = _rotate(dk, static), _rotate(dv, static)
    d_bias = None if bias is None else d_bias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_attention(normalizer, q, k, v, *, q_pos, key_positions, counts, segments, scale, options):
    """q [B, K, G, Tl, H], k/v [B, K, Sl, H] (this device's rows) -> out [B, K, G, Tl, H] float32."""
    kind, sink = families.online_kind(normalizer)
    B, K, G, Tl, _ = q.shape
    keys = key_positions.size
    factor = None
    if isinstance(normalizer, Normalizer) and normalizer.scale is not None:
        factor = _per_query(normalizer.scale.factor, counts(), (B, K, G), Tl, keys)
    q = q * scale if factor is None else q * (scale * factor)
    bias = None
    if kind == "elementwise":
        given = normalizer.mapping.bias

        def value_of(n, align):
            return default_sigmoid_bias(n) if given is None else align(given, "bias").astype(F32)

        bias = _per_query(value_of, counts() if given is None else jnp.ones((1, 1, 1, Tl, 1), F32), (B, K, G), Tl, keys)
    static = _RingStatic(
        options["axis_name"], options["shards"], kind, options["is_causal"],
        max(1, min(options["key_block"], k.shape[2])), max(1, min(options["query_block"] or DEFAULT_QUERY_BLOCK, Tl)),
        (B, K, G),
    )  # fmt: skip
    out, lse = _ring(static, q, k, v, bias, q_pos, key_positions, segments)
    if sink is not None:
        sink = _per_query(
            lambda n, align: align(normalizer.mapping.sink, "sink").astype(F32),
            jnp.ones((1, 1, 1, Tl, 1), F32),
            (B, K, G),
            Tl,
            keys,
        )
        out = out * jax.nn.sigmoid(lse - sink[..., 0])[..., None]
    return out


# ---------------------------------------------------------------------------------------------- sharded threshold


class _ThresholdStatic(NamedTuple):
    axis_name: str
    shards: int
    alpha: float
    is_causal: bool
    query_block: int
    max_iter: int


def _sharded_threshold(u: jax.Array, origin: jax.Array, static: _ThresholdStatic) -> jax.Array:
    """tau [..., 1] of rows split over the devices of the axis (u [..., n_local], shifted so that
    the row's global maximum is 0; -inf where hidden; origin [..., 1]: 0, or -inf for a row with
    nothing visible anywhere).

    The monotone Newton search of attnlab.normalizers.thresholds._newton_threshold from tau = -1,
    with each pass's row reductions summed over the axis: every device takes the same step.
    """
    axis, alpha = static.axis_name, static.alpha
    q = 1.0 / (alpha - 1.0)
    eps = jnp.finfo(u.dtype).eps
    closed_form = alpha if alpha in CLOSED_FORMS else None
    done = ~jnp.isfinite(origin)
    origin = jnp.where(done, 0.0, origin)

    def reduced(tau):
        sums = _row_pass(u, None, tau, q)
        lowest = jax.lax.pmin(sums.pop("lowest"), axis)
        names = sorted(sums)
        totals = jax.lax.psum(jnp.stack([sums[name] for name in names]), axis)
        return {"lowest": lowest, **{name: totals[i] for i, name in enumerate(names)}}

    def cond(state):
        it, _, _, going = state
        return (it < static.max_iter) & going

    def body(state):
        it, tau, done, _ = state
        sums = reduced(tau)
        if closed_form is not None:
            candidate, exact = _newton_closed_form(sums, tau, closed_form)
            finished = exact | (jnp.abs(candidate - tau) <= 2 * eps * jnp.maximum(1.0, jnp.abs(tau)))
        else:
            residual = sums["gq"] - 1.0
            candidate = tau + residual / jnp.maximum(q * sums["gq1"], jnp.finfo(u.dtype).tiny)
            small_step = jnp.abs(candidate - tau) <= 2 * eps * jnp.maximum(1.0, jnp.abs(tau))
            finished = (residual <= RESIDUAL_ULPS * eps) | small_step
            candidate = jnp.where(residual <= 0, tau, candidate)
        candidate = jnp.minimum(candidate, origin)
        tau = jnp.where(done, tau, candidate)
        done = done | finished
        # One decision for all devices (their rows are the same), so no device leaves the loop alone.
        going = jax.lax.pmax(jnp.any(~done).astype(jnp.int32), axis) > 0
        return it + 1, tau, done, going

    state = (jnp.asarray(0), origin - 1.0, done, jnp.asarray(True))
    _, tau, _, _ = jax.lax.while_loop(cond, body, state)
    return tau


def _gathered_rows(static: _ThresholdStatic, q_blocks, pos_blocks, index):
    """Query block `index` of every device, gathered: q [B, K, G, P Tq, H], positions [P Tq]."""
    q_i = q_blocks[index]
    pos_i = pos_blocks[index]
    axis = static.axis_name
    return jax.lax.all_gather(q_i, axis, axis=3, tiled=True), jax.lax.all_gather(pos_i, axis, axis=0, tiled=True)


def _threshold_logits(static, qg, k, pos_g, k_pos, segments):
    """u [B, K, G, R, Sl]: the gathered rows' logits against this device's keys, -inf where hidden."""
    u = grouped_scores(qg, k)
    return jnp.where(_visible(pos_g, k_pos, segments, static.is_causal), u, -jnp.inf)


def _own_rows(static, x: jax.Array) -> jax.Array:
    """This device's query_block rows of gathered rows [..., P Tq] (axis 3)."""
    me = jax.lax.axis_index(static.axis_name)
    return jax.lax.dynamic_slice_in_dim(x, me * static.query_block, static.query_block, axis=3)


def _split_rows(static, x, fill):
    """[B, K, G, Tl, ...] -> [blocks, B, K, G, Tq, ...] (rows padded with `fill`)."""
    blocks = math.ceil(x.shape[3] / static.query_block)
    return split(x, static.query_block, blocks, 3, fill=fill, broadcast=False)


def _threshold_forward(static: _ThresholdStatic, q, k, v, q_pos, k_pos, segments):
    Tl = q.shape[3]
    num_blocks = math.ceil(Tl / static.query_block)
    q_blocks = _split_rows(static, q, 0.0)
    pos_blocks = split(q_pos, static.query_block, num_blocks, 0, fill=-1, broadcast=False)
    exponent = 1.0 / (static.alpha - 1.0)

    def one(index):
        qg, pos_g = _gathered_rows(static, q_blocks, pos_blocks, index)
        u = _threshold_logits(static, qg, k, pos_g, k_pos, segments)
        peak = jax.lax.pmax(jnp.max(u, axis=-1, keepdims=True), static.axis_name)
        shift = jnp.where(jnp.isfinite(peak), peak, 0.0)
        u = u - shift
        tau = _sharded_threshold(u, peak - shift, static)
        weights = _power(jnp.maximum(u - tau, 0.0), exponent)
        total = jax.lax.psum(jnp.sum(weights, axis=-1, keepdims=True), static.axis_name)
        total = jnp.where(total > 0, total, 1.0)  # a row with no visible key: weights and output 0
        part = grouped_values(weights.astype(v.dtype), v) / total
        out = jax.lax.psum_scatter(part, static.axis_name, scatter_dimension=3, tiled=True)
        rows = jnp.concatenate([tau, total, shift], axis=-1)  # [B, K, G, R, 3]
        return out, _own_rows(static, rows)

    out, rows = jax.lax.map(one, jnp.arange(num_blocks))
    return join(out, 3, Tl), join(rows, 3, Tl)


def _threshold(static, q, k, v, q_pos, k_pos, segments):
    return _threshold_forward(static, q, k, v, q_pos, k_pos, segments)[0]


_threshold = jax.custom_vjp(_threshold, nondiff_argnums=(0,))


def _threshold_fwd(static, q, k, v, q_pos, k_pos, segments):
    out, rows = _threshold_forward(static, q, k, v, q_pos, k_pos, segments)
    return out, (q, k, v, q_pos, k_pos, segments, rows)


def _threshold_bwd(static, residuals, d_out):
    """Per gathered query block: p rebuilt from the saved (tau, Z, shift), then the closed-form
    entmax Jacobian with its two row sums psum-ed; dq's parts psum_scatter-ed to their owners."""
    q, k, v, q_pos, k_pos, segments, rows = residuals
    alpha, axis = static.alpha, static.axis_name
    Tl = q.shape[3]
    num_blocks = math.ceil(Tl / static.query_block)
    q_blocks = _split_rows(static, q, 0.0)
    pos_blocks = split(q_pos, static.query_block, num_blocks, 0, fill=-1, broadcast=False)
    d_out_blocks = _split_rows(static, d_out.astype(F32), 0.0)
    row_blocks = _split_rows(static, rows, 1.0)
    exponent = 1.0 / (alpha - 1.0)

    def step(carry, index):
        dk, dv = carry
        qg, pos_g = _gathered_rows(static, q_blocks, pos_blocks, index)
        d_out_g = jax.lax.all_gather(d_out_blocks[index], axis, axis=3, tiled=True)
        tau, total, shift = jnp.split(jax.lax.all_gather(row_blocks[index], axis, axis=3, tiled=True), 3, axis=-1)
        u = _threshold_logits(static, qg, k, pos_g, k_pos, segments) - shift
        p = _power(jnp.maximum(u - tau, 0.0), exponent) / total
        dv = dv + grouped_key_product(p, d_out_g)
        dp = grouped_scores(d_out_g, v.astype(F32))
        w = jacobian_weights(p, alpha)
        sums = jax.lax.psum(
            jnp.concatenate([jnp.sum(w, -1, keepdims=True), jnp.sum(w * dp, -1, keepdims=True)], -1), axis
        )
        w_total, w_dp = sums[..., :1], sums[..., 1:]
        # The entmax Jacobian w.r.t. z, divided by (alpha - 1): the logits here are (alpha - 1) z.
        ds = w * (dp - w_dp / jnp.where(w_total > 0, w_total, 1.0)) / (alpha - 1.0)
        dk = dk + grouped_key_product(ds, qg.astype(F32))
        dq_g = grouped_values(ds, k.astype(F32))
        return (dk, dv), jax.lax.psum_scatter(dq_g, axis, scatter_dimension=3, tiled=True)

    init = (jnp.zeros_like(k, F32), jnp.zeros_like(v, F32))
    (dk, dv), dq = jax.lax.scan(step, init, jnp.arange(num_blocks))
    dq = join(dq, 3, Tl)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_threshold.defvjp(_threshold_fwd, _threshold_bwd)


def _threshold_attention(normalizer, q, k, v, *, q_pos, k_pos, counts, segments, scale, options):
    """q [B, K, G, Tl, H], k/v [B, K, Sl, H] (this device's rows) -> out [B, K, G, Tl, H] float32."""
    alpha = families.static_entmax_alpha(normalizer)
    B, K, G, Tl, _ = q.shape
    keys = options["keys"]
    factor = scale
    if isinstance(normalizer, Normalizer) and normalizer.scale is not None:
        factor = scale * _per_query(normalizer.scale.factor, counts(), (B, K, G), Tl, keys)
    # Each step evaluates P query_block gathered rows against S / P keys: query_block x S logits per (batch, head).
    rows = options["query_block"] or max(MIN_THRESHOLD_ROWS, THRESHOLD_BLOCK_ELEMENTS // max(1, B * K * G * keys))
    static = _ThresholdStatic(
        options["axis_name"], options["shards"], alpha, options["is_causal"], max(1, min(rows, Tl)), MAX_NEWTON_STEPS
    )
    # u = (alpha - 1) z rides on the queries: the custom backward sees u's own logits.
    return _threshold(static, q * (factor * (alpha - 1.0)), k, v, q_pos, k_pos, segments)


# ---------------------------------------------------------------------------------------------- the entry point


def context_parallel_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    normalizer: str | Callable = "softmax",
    mesh: Mesh,
    axis_name: str = "context",
    is_causal: bool = False,
    segment_ids: ArrayLike | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    laid_out: bool = False,
    scheme: str | None = None,
    implementation: str | None = "chunked",
    key_block: int = DEFAULT_KEY_BLOCK,
    query_block: int | None = None,
):
    """Self-attention with the sequence axis sharded over the mesh axis `axis_name`, exact for every
    normalizer (see the module docstring for the schemes).

        out[b, t, n] = sum_s p[b, n, t, s] value[b, s, n // G],
        p[b, n, t, :] = normalizer(scale query[b, t, n] . key[b, :, n // G], where=visible[b, t, :])

    the same as `dot_product_attention(query, key, value, normalizer=..., is_causal=...,
    mask_fn=mask_functions.document_mask(segment_ids))` on one device.

    Args:
      query: [B, T, N, H] (or [T, N, H]); key, value: [B, T, K, H] with N a multiple of K. T must be
        a multiple of 2P (zigzag) or P (striped, contiguous), P the size of the mesh axis.
      normalizer: a registry name, a `Normalizer` (parameters: a number or one per head, [N, 1, 1]),
        or any callable f(logits, *, axis, where) (scheme "all_gather").
      mesh: a `jax.sharding.Mesh` holding `axis_name`; other axes see the inputs replicated.
      is_causal: key s visible to query t iff s <= t (global positions).
      segment_ids: ints [B, T] (same order as the inputs): documents, a query sees only its own.
      layout: "zigzag" (default), "striped" or "contiguous": which positions each device holds.
      laid_out: False (default): inputs and output in natural order, laid out here and back;
        True: the inputs are already in layout order (`lay_out`), and so is the output.
      scheme: "ring", "sharded_threshold", "all_gather", or None: the first that serves the
        normalizer (ring for the softmax family and sigmoid, the sharded threshold for entmax,
        all-gather for the rest).
      implementation, key_block, query_block: the single-device backend of the all-gather scheme
        and its blocks; key_block and query_block size the ring's online pass too, and query_block
        the rows each device contributes per step of the sharded threshold search.

    Returns:
      out, shaped and ordered as `query`, in its dtype.
    """
    query, key, value = (_as_float(x) for x in (query, key, value))
    unbatched = query.ndim == 3
    query, key, value = (x[None] if x.ndim == 3 else x for x in (query, key, value))
    B, T, N, H, S, K = _check_shapes(query, key, value)
    if S != T:
        raise ValueError(f"context-parallel attention is self-attention: key length {S} != query length {T}")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh; its axes: {mesh.axis_names}")
    shards = mesh.shape[axis_name]
    _check_layout(T, shards, layout)
    normalizer = resolve_normalizer(normalizer)
    scheme = _select_scheme(scheme, normalizer)
    _check_parameters(normalizer)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    segments = None
    if segment_ids is not None:
        segments = jnp.asarray(segment_ids)
        if segments.ndim == 1 and unbatched:
            segments = segments[None]
        if segments.shape != (B, T) or not jnp.issubdtype(segments.dtype, jnp.integer):
            raise ValueError(
                f"segment_ids must be ints [B, T] = ({B}, {T}); got {segments.dtype} of shape {segments.shape}"
            )
        segments = restore_order(segments, shards, layout) if laid_out else segments  # natural order
    if not laid_out:
        query, key, value = (lay_out(x, shards, layout) for x in (query, key, value))
    positions = layout_positions(T, shards, layout).reshape(shards, T // shards)
    options = {
        "axis_name": axis_name, "shards": shards, "is_causal": bool(is_causal), "keys": T,
        "key_block": int(key_block), "query_block": query_block, "implementation": implementation,
    }  # fmt: skip

    def local(q, k, v):
        me = jax.lax.axis_index(axis_name)
        table = jnp.asarray(positions)
        q_pos = table[me]
        if scheme == "all_gather":
            return _all_gather_attention(normalizer, q, k, v, q_pos=q_pos, positions=positions, segments=segments,
                                         scale=scale, options=options)  # fmt: skip
        qg, kg, vg = group_queries(q, K), jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)

        def counts():
            return _counts(q_pos, T, segments, bool(is_causal), (B, K, N // K))

        if scheme == "ring":
            out = _ring_attention(normalizer, qg, kg, vg, q_pos=q_pos, key_positions=table, counts=counts,
                                  segments=segments, scale=scale, options=options)  # fmt: skip
        else:
            out = _threshold_attention(normalizer, qg, kg, vg, q_pos=q_pos, k_pos=q_pos, counts=counts,
                                       segments=segments, scale=scale, options=options)  # fmt: skip
        return ungroup_queries(out).astype(q.dtype)

    spec = P(None, axis_name)
    # check_vma off: the single-device passes start their loop carries from zeros that do not say
    # they vary over the axis (they are written for one device).
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    out = sharded(query, key, value)
    if not laid_out:
        out = restore_order(out, shards, layout)
    return out[0] if unbatched else out


def _all_gather_attention(normalizer, q, k, v, *, q_pos, positions, segments, scale, options):
    """Every key gathered (in natural order), the local queries at their global positions."""
    inverse = jnp.asarray(np.argsort(positions.reshape(-1)))
    k, v = (jnp.take(jax.lax.all_gather(x, options["axis_name"], axis=1, tiled=True), inverse, axis=1) for x in (k, v))
    mask_fn = _position_mask(q_pos, jnp.arange(k.shape[1]), segments, options["is_causal"])
    return dot_product_attention(
        q, k, v, normalizer=normalizer, scale=scale, mask_fn=mask_fn, implementation=options["implementation"],
        key_block=options["key_block"], query_block=options["query_block"],
    )  # fmt: skip
