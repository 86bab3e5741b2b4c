"""Flash attention as Pallas kernels for the maps cuDNN cannot run: softmax with a sink, and sigmoid.

For query t of head n and its visible keys s, with z_s = q_t . k_s (q already scaled):

    softmax      p_s = e^{z_s} / (e^{sink_n} + sum_r e^{z_r}),   lse_t = log(e^{sink_n} + sum_r e^{z_r})
                 one sink logit per query head (gpt-oss's learnable sinks, softmax1 = a sink of 0) that
                 takes weight but carries no value; no sink is plain softmax (e^{sink} = 0).
    elementwise  p_s = sigmoid(z_s + b_t),   b [B, N, T] a per-row bias from the caller (sigmoid
                 attention's -log n, n = the row's visible keys); not normalised.

and out_t = sum_s p_s v_s in both. The same two kinds as attention.online_softmax (the XLA version),
as kernels.

Forward: grid (batch, query head, query block); each program makes one pass over the key blocks up to
the causal diagonal and the key length, with the flash-attention recurrence (Milakov & Gimelshein
2018; Dao et al. 2022)

    m' = max(m, max_s z_s),   l = l e^{m - m'} + sum_s e^{z_s - m'},   acc = acc e^{m - m'} + sum_s e^{z_s - m'} v_s,

started from m = sink, l = 1 (the sink is a logit already seen) or, without a sink, from a finite
m = _NO_MAX, l = 0; out = acc / l and lse = m + log l. The elementwise kind needs no running
statistics: acc = sum_s sigmoid(z_s + b_t) v_s.

Backward (FlashAttention-2, Dao 2023): p is recomputed from lse (softmax) or from b (elementwise);
with D_t = sum_h dout_th out_th (in XLA) and dp = dout v^T,

    softmax      ds = p (dp - D)            elementwise   ds = p (1 - p) dp
    dq = ds k,   dk = ds^T q,   dv = p^T dout,   db_t = sum_s ds_ts,   d sink_n = -sum_{b,t} e^{sink_n - lse} D.

One kernel over query blocks gives dq (and db), one over key blocks gives dk and dv, looping over
the query blocks from the causal diagonal on. The dk/dv kernel runs per query head; the G query
heads that share a key/value head are summed in XLA. d sink is a sum over lse and D in XLA.

Visibility: key s is visible to query t iff s < key_lengths[b] (and s <= t when causal, top-left
aligned). Hidden scores are removed with `where`, never through -inf arithmetic, so no inf - inf
arises. A query that sees no key gets output 0 and zero gradients, exactly; its lse is -inf without
a sink and the sink with one (all its weight is on the sink). Logits are assumed finite (+inf
logits, which attention.online_softmax handles, do not come out of finite q and k).

Precision: the dots accumulate in float32 at `Precision.HIGHEST` (IEEE fp32, not TF32, for float32
inputs); for bfloat16 inputs the weights p (and ds) are rounded to bfloat16 before their dots with
v, dout, k and q, as flash-attention kernels do, so bfloat16 results agree with a float32 reference
to about bfloat16's resolution rather than float32's.

Status: checked in Pallas interpret mode on CPU, and lowered to Triton IR for CUDA on CPU
(tests/attention/test_pallas_online.py); not yet compiled by Triton nor run on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from attnlab.attention.pallas_common import DTYPES, block_size, check_operands, interpreted

F32 = jnp.float32
KINDS = ("softmax", "elementwise")
_HIGHEST = lax.Precision.HIGHEST
# The running maximum of a row that has seen no key and has no sink: finite, so e^{m - m'} is e^0 = 1
# (not e^{-inf + inf}) while the row has seen nothing, and e^{_NO_MAX - m'} = 0 once it has.
_NO_MAX = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call: each kernel is traced once per distinct config."""

    kind: str  # "softmax" or "elementwise"
    is_causal: bool
    has_sink: bool
    block_q: int
    block_k: int
    num_queries: int  # T before padding
    num_keys: int  # S before padding
    head_dim: int  # H before padding
    groups: int  # query heads per key/value head
    interpret: bool

    @property
    def softmax(self) -> bool:
        return self.kind == "softmax"

    def compiler_params(self, padded_head_dim: int):
        if self.interpret:
            return None
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4 if padded_head_dim <= 64 else 8, num_stages=2)


# ---------------------------------------------------------------------------------------------- in-kernel


def _dot(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """a @ b, with a^T or b^T where asked, accumulated in float32 (2-D operands)."""
    contracting = ((0 if transpose_a else 1,), (1 if transpose_b else 0,))
    return lax.dot_general(a, b, (contracting, ((), ())), precision=_HIGHEST, preferred_element_type=F32)


def _key_end(config: _Config, lengths_ref) -> jax.Array:
    """Keys [0, key_end) exist for this batch row."""
    return jnp.clip(lengths_ref[0], 0, config.num_keys)


def _visible(config: _Config, query_start, key_start, key_end, shape) -> jax.Array:
    """bool [block_q, block_k]: key (key_start + column) visible to query (query_start + row)."""
    key_pos = key_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    visible = key_pos < key_end
    if config.is_causal:
        visible = visible & (key_pos <= query_start + lax.broadcasted_iota(jnp.int32, shape, 0))
    return visible


def _weights(config: _Config, z: jax.Array, visible: jax.Array, row: jax.Array) -> jax.Array:
    """p [block_q, block_k] from the scores z, given each row's lse (softmax) or bias (elementwise)."""
    if config.softmax:
        # lse >= max z over the visible keys, so e^{z - lse} <= 1 wherever it is kept.
        return jnp.where(visible, jnp.exp(z - row[:, None]), 0.0)
    return jnp.where(visible, jax.nn.sigmoid(z + row[:, None]), 0.0)


def _score_grad(config: _Config, p: jax.Array, dp: jax.Array, delta: jax.Array | None) -> jax.Array:
    """ds = dL/dz [block_q, block_k] from p and dp = dout v^T."""
    if config.softmax:
        return p * (dp - delta[:, None])
    return p * (1.0 - p) * dp


def _forward_kernel(*refs, config: _Config):
    q_ref, k_ref, v_ref, lengths_ref, *rest = refs
    if config.softmax:
        sink_ref = rest.pop(0) if config.has_sink else None
        o_ref, lse_ref = rest
    else:
        bias_ref, o_ref = rest
    bq, bk = config.block_q, config.block_k
    query_block = pl.program_id(2)
    query_start = query_block * bq
    q = q_ref[...]
    key_end = _key_end(config, lengths_ref)
    num_blocks = lax.div(key_end + (bk - 1), bk)
    if config.is_causal:
        num_blocks = jnp.minimum(num_blocks, lax.div(query_start + bq + (bk - 1), bk))

    def block(j):
        start = pl.multiple_of(j * bk, bk)
        z = _dot(q, k_ref[pl.ds(start, bk), :], transpose_b=True)
        return z, _visible(config, query_start, start, key_end, (bq, bk)), v_ref[pl.ds(start, bk), :]

    acc0 = jnp.zeros(o_ref.shape, F32)
    if config.softmax:

        def body(j, carry):
            m, total, acc = carry
            z, visible, v = block(j)
            m_new = jnp.maximum(m, jnp.max(jnp.where(visible, z, _NO_MAX), axis=1))
            p = jnp.where(visible, jnp.exp(z - m_new[:, None]), 0.0)
            correction = jnp.exp(m - m_new)
            acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
            return m_new, total * correction + jnp.sum(p, axis=1), acc

        if config.has_sink:
            m0, total0 = jnp.full((bq,), sink_ref[0], F32), jnp.ones((bq,), F32)
        else:
            m0, total0 = jnp.full((bq,), _NO_MAX, F32), jnp.zeros((bq,), F32)
        m, total, acc = lax.fori_loop(0, num_blocks, body, (m0, total0, acc0))
        has_weight = total > 0  # always, with a sink
        safe_total = jnp.where(has_weight, total, 1.0)
        out = acc / safe_total[:, None]
        lse_ref[...] = jnp.where(has_weight, m + jnp.log(safe_total), -jnp.inf)
    else:
        bias = bias_ref[...]

        def body(j, acc):
            z, visible, v = block(j)
            p = _weights(config, z, visible, bias)
            return acc + _dot(p.astype(v.dtype), v)

        out = lax.fori_loop(0, num_blocks, body, acc0)
    o_ref[...] = out.astype(o_ref.dtype)


def _dq_kernel(*refs, config: _Config):
    if config.softmax:
        q_ref, k_ref, v_ref, lengths_ref, do_ref, row_ref, delta_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, lengths_ref, do_ref, row_ref, dq_ref, db_ref = refs
    bq, bk = config.block_q, config.block_k
    query_start = pl.program_id(2) * bq
    q, do, row = q_ref[...], do_ref[...], row_ref[...]
    delta = delta_ref[...] if config.softmax else None
    key_end = _key_end(config, lengths_ref)
    num_blocks = lax.div(key_end + (bk - 1), bk)
    if config.is_causal:
        num_blocks = jnp.minimum(num_blocks, lax.div(query_start + bq + (bk - 1), bk))

    def body(j, carry):
        dq, db = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        p = _weights(config, _dot(q, k, transpose_b=True), _visible(config, query_start, start, key_end, (bq, bk)), row)
        ds = _score_grad(config, p, _dot(do, v, transpose_b=True), delta)
        dq = dq + _dot(ds.astype(k.dtype), k)
        return dq, (None if db is None else db + jnp.sum(ds, axis=1))

    init = (jnp.zeros(dq_ref.shape, F32), None if config.softmax else jnp.zeros((bq,), F32))
    dq, db = lax.fori_loop(0, num_blocks, body, init)
    dq_ref[...] = dq
    if db is not None:
        db_ref[...] = db


def _dkv_kernel(*refs, config: _Config):
    if config.softmax:
        q_ref, k_ref, v_ref, lengths_ref, do_ref, row_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, lengths_ref, do_ref, row_ref, dk_ref, dv_ref = refs
        delta_ref = None
    bq, bk = config.block_q, config.block_k
    key_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]
    key_end = _key_end(config, lengths_ref)
    num_query_blocks = q_ref.shape[0] // bq
    # Query blocks before the one holding query key_start see none of these keys when causal.
    first = lax.div(key_start, bq) if config.is_causal else 0
    stop = jnp.where(key_start < key_end, num_query_blocks, first)  # no visible key in this block: no work

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        delta = None if delta_ref is None else delta_ref[pl.ds(start, bq)]
        z = _dot(q, k, transpose_b=True)
        p = _weights(config, z, _visible(config, start, key_start, key_end, (bq, bk)), row_ref[pl.ds(start, bq)])
        dv = dv + _dot(p.astype(do.dtype), do, transpose_a=True)
        ds = _score_grad(config, p, _dot(do, v, transpose_b=True), delta)
        dk = dk + _dot(ds.astype(q.dtype), q, transpose_a=True)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, F32)
    dk, dv = lax.fori_loop(first, stop, body, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


# ---------------------------------------------------------------------------------------------- pallas calls
# All on padded operands: q, dout [B, Tp, N, Hp], k, v [B, Sp, K, Hp], rows (lse, bias, D) [B, N, Tp].


def _query_block_spec(config: _Config, head_dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, config.block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))


def _whole_keys_spec(config: _Config, num_keys: int, head_dim: int) -> pl.BlockSpec:
    G = config.groups
    return pl.BlockSpec((None, num_keys, None, head_dim), lambda b, h, i: (b, 0, lax.div(h, G), 0))


def _row_block_spec(config: _Config) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, config.block_q), lambda b, h, i: (b, h, i))


_LENGTHS_SPEC = pl.BlockSpec((None, 1), lambda b, h, i: (b, 0))


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(q, k, v, lengths, sink, bias, config: _Config):
    """out [B, Tp, N, Hp] (q's dtype) and, for the softmax kind, lse [B, N, Tp] float32."""
    B, Tp, N, Hp = q.shape
    Sp = k.shape[1]
    operands = [q, k, v, lengths]
    in_specs = [_query_block_spec(config, Hp), _whole_keys_spec(config, Sp, Hp), _whole_keys_spec(config, Sp, Hp)]
    in_specs.append(_LENGTHS_SPEC)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [_query_block_spec(config, Hp)]
    if config.softmax:
        if config.has_sink:
            operands.append(sink.reshape(N, 1))
            in_specs.append(pl.BlockSpec((None, 1), lambda b, h, i: (h, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, N, Tp), F32))
        out_specs.append(_row_block_spec(config))
    else:
        operands.append(bias)
        in_specs.append(_row_block_spec(config))
    results = pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        out_shape=out_shape,
        grid=(B, N, Tp // config.block_q),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=config.compiler_params(Hp),
        interpret=config.interpret,
        name=f"online_attention_{config.kind}_forward",
    )(*operands)
    return results[0], (results[1] if config.softmax else None)


@functools.partial(jax.jit, static_argnames=("config",))
def _backward(q, k, v, lengths, d_out, row, delta, config: _Config):
    """dq [B, Tp, N, Hp], dk and dv per query head [B, Sp, N, Hp] (all float32) and, for the
    elementwise kind, db [B, N, Tp]; `row` is lse (softmax, -inf replaced) or the bias."""
    B, Tp, N, Hp = q.shape
    Sp = k.shape[1]
    bq, bk, G = config.block_q, config.block_k, config.groups
    rows = [row] if delta is None else [row, delta]

    dq_out_shape = [jax.ShapeDtypeStruct(q.shape, F32)]
    dq_out_specs = [_query_block_spec(config, Hp)]
    if not config.softmax:
        dq_out_shape.append(jax.ShapeDtypeStruct((B, N, Tp), F32))
        dq_out_specs.append(_row_block_spec(config))
    dq_results = pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        out_shape=dq_out_shape,
        grid=(B, N, Tp // bq),
        in_specs=[
            _query_block_spec(config, Hp),
            _whole_keys_spec(config, Sp, Hp),
            _whole_keys_spec(config, Sp, Hp),
            _LENGTHS_SPEC,
            _query_block_spec(config, Hp),
            *[_row_block_spec(config)] * len(rows),
        ],
        out_specs=dq_out_specs,
        compiler_params=config.compiler_params(Hp),
        interpret=config.interpret,
        name=f"online_attention_{config.kind}_dq",
    )(q, k, v, lengths, d_out, *rows)

    whole_queries = pl.BlockSpec((None, Tp, None, Hp), lambda b, h, j: (b, 0, h, 0))
    key_block = pl.BlockSpec((None, bk, None, Hp), lambda b, h, j: (b, j, lax.div(h, G), 0))
    per_query_head = pl.BlockSpec((None, bk, None, Hp), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, config=config),
        out_shape=[jax.ShapeDtypeStruct((B, Sp, N, Hp), F32)] * 2,
        grid=(B, N, Sp // bk),
        in_specs=[
            whole_queries,
            key_block,
            key_block,
            _LENGTHS_SPEC,
            whole_queries,
            *[pl.BlockSpec((None, None, Tp), lambda b, h, j: (b, h, 0))] * len(rows),
        ],
        out_specs=[per_query_head, per_query_head],
        compiler_params=config.compiler_params(Hp),
        interpret=config.interpret,
        name=f"online_attention_{config.kind}_dkv",
    )(q, k, v, lengths, d_out, *rows)
    return dq_results[0], dk, dv, (None if config.softmax else dq_results[1])


# ---------------------------------------------------------------------------------------------- custom_vjp


def _padded(config: _Config, q, k, v, bias):
    """q [B, Tp, N, Hp], k, v [B, Sp, K, Hp], bias [B, N, Tp] (or None), zero-padded."""
    T, S, H = config.num_queries, config.num_keys, config.head_dim
    Tp = max(1, pl.cdiv(T, config.block_q)) * config.block_q
    Sp = max(1, pl.cdiv(S, config.block_k)) * config.block_k
    Hp = max(16, pl.next_power_of_2(H))
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Hp - H)))
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    bias = None if bias is None else jnp.pad(bias, ((0, 0), (0, 0), (0, Tp - T)))
    return q, k, v, bias


def _run_forward(config: _Config, q, k, v, lengths, sink, bias):
    q_p, k_p, v_p, bias_p = _padded(config, q, k, v, bias)
    out_p, lse_p = _forward(q_p, k_p, v_p, lengths.reshape(-1, 1), sink, bias_p, config=config)
    T, H = config.num_queries, config.head_dim
    out = out_p[:, :T, :, :H]
    lse = None if lse_p is None else lse_p[:, :, :T]
    return (out, lse), (q_p, k_p, v_p, lengths, sink, bias_p, out_p, lse_p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: _Config, q, k, v, lengths, sink, bias):
    return _run_forward(config, q, k, v, lengths, sink, bias)[0]


def _attention_bwd(config: _Config, residuals, cotangents):
    q, k, v, lengths, sink, bias, out, lse = residuals
    d_out = cotangents[0]  # lse is returned stop-gradient: its cotangent is ignored
    B, Tp, _, Hp = q.shape
    T, S, H, G = config.num_queries, config.num_keys, config.head_dim, config.groups
    d_out = jnp.pad(d_out.astype(q.dtype), ((0, 0), (0, Tp - T), (0, 0), (0, Hp - H)))
    if config.softmax:
        delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(F32), out.astype(F32))
        row = jnp.where(jnp.isneginf(lse), 0.0, lse)  # a row that sees nothing: p = 0 whatever lse is
    else:
        delta, row = None, bias
    dq, dk, dv, db = _backward(q, k, v, lengths.reshape(-1, 1), d_out, row, delta, config=config)
    Sp, K = k.shape[1], k.shape[2]
    dk, dv = (x.reshape(B, Sp, K, G, Hp).sum(axis=3) for x in (dk, dv))
    d_sink = None
    if config.has_sink:
        sink_weight = jnp.exp(sink[None, :, None] - lse[:, :, :T])  # lse >= sink: at most 1
        d_sink = -jnp.sum(sink_weight * delta[:, :, :T], axis=(0, 2))
    d_bias = None if db is None else db[:, :, :T]
    return (
        dq[:, :T, :, :H].astype(q.dtype),
        dk[:, :S, :, :H].astype(k.dtype),
        dv[:, :S, :, :H].astype(v.dtype),
        None,
        d_sink,
        d_bias,
    )


_attention.defvjp(_run_forward, _attention_bwd)


# ---------------------------------------------------------------------------------------------- public


def _check_sink(sink, N: int) -> jax.Array:
    if not isinstance(sink, jax.core.Tracer):
        values = np.asarray(sink)
        if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
            raise ValueError(f"sink={sink!r}; accepted: finite sink logits (a float, or an array [N] = [{N}])")
    sink = jnp.asarray(sink, F32)
    if sink.shape not in ((), (N,)):
        raise ValueError(
            f"sink has shape {sink.shape}; accepted: () (one sink for every head) or ({N},) (one per query head)"
        )
    return jnp.broadcast_to(sink, (N,))


def _check_row_bias(row_bias, B: int, N: int, T: int) -> jax.Array:
    row_bias = jnp.asarray(row_bias, F32)
    try:
        return jnp.broadcast_to(row_bias, (B, N, T))
    except ValueError:
        raise ValueError(
            f"row_bias has shape {row_bias.shape}, which does not broadcast to [B, N, T] = {(B, N, T)} "
            "(one bias per batch row, query head and query)"
        ) from None


def pallas_online_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kind: str,
    is_causal: bool,
    key_lengths: jax.Array | None = None,
    sink: float | jax.Array | None = None,
    row_bias: jax.Array | None = None,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool | None = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax-with-sink or sigmoid attention as Pallas flash-attention kernels, forward and backward.

        out[b, t, n] = sum_s p[b, n, t, s] v[b, s, n // G],   z_s = q[b, t, n] . k[b, s, n // G]

        kind="softmax":      p_s = e^{z_s} / (e^{sink[n]} + sum_r e^{z_r})   (sink None: no e^{sink} term)
        kind="elementwise":  p_s = sigmoid(z_s + row_bias[b, n, t])

    over the visible keys s (0 elsewhere); see the module docstring for the algorithm.

    Args:
      q: [B, T, N, H], float32 or bfloat16, ALREADY multiplied by the softmax scale (1/sqrt(H) for
        the usual attention; any scale policy folded in): the kernels apply no scale of their own.
      k, v: [B, S, K, H], q's dtype; N must be a multiple of K (grouped-query attention: query head
        n reads key/value head n // (N // K)).
      kind: "softmax" (the SOFTMAX family: softmax, softmax1, learnable sinks) or "elementwise"
        (sigmoid).
      is_causal: key s visible to query t iff s <= t (top-left aligned, like jax.nn).
      key_lengths: optional int [B]; keys s >= key_lengths[b] are hidden. A query with no visible
        key gets output 0 and zero gradients.
      sink: softmax kind only. None (plain softmax), a float (one sink logit for every head;
        softmax1 is 0.0) or a float32 array [N] (one per query head, as gpt-oss), which may be
        traced and is differentiated: d sink_n = -sum_{b,t} p_sink[b, n, t] D[b, n, t],
        p_sink = e^{sink_n - lse}, D = rowsum(dout * out). Finite values only.
      row_bias: elementwise kind only: float32 broadcasting to [B, N, T], added to every logit of
        its row, differentiated (d row_bias_t = sum_s ds_ts). The caller computes sigmoid
        attention's default, -log n with n the row's visible keys (normalizers.recent.
        default_sigmoid_bias); None means 0 (plain sigmoid(z)).
      block_q, block_k: powers of two >= 16 (shrunk to the padded sequence length when larger);
        T and S are padded up to them and the padding is masked; H is padded to a power of two
        >= 16. The backward kernels use the same blocks.
      interpret: run the Pallas interpreter; None means interpret unless `jax.default_backend()` is
        "gpu".
      return_residual: softmax kind only: also return lse [B, N, T] float32, log(e^{sink} +
        sum_s e^{z_s}) (-inf for a query with no visible key and no sink), as a constant (not
        differentiated).

    Returns:
      out [B, T, N, H] in q's dtype (computed in float32), or (out, lse) with return_residual.
      Differentiable in q, k, v, sink (when an array) and row_bias, by the kernels of the module
      docstring.
    """
    q, k, v, key_lengths = check_operands(q, k, v, key_lengths)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; accepted: {', '.join(map(repr, KINDS))}")
    if sink is not None and kind != "softmax":
        raise ValueError(f"a sink needs kind='softmax' (sigmoid weights have no normaliser); got kind={kind!r}")
    if row_bias is not None and kind != "elementwise":
        raise ValueError(
            f"row_bias is the sigmoid's bias: it needs kind='elementwise'; got kind={kind!r} "
            "(a softmax ignores a per-row bias: fold nothing, or pass the bias as part of q)"
        )
    if return_residual and kind != "softmax":
        raise ValueError(f"return_residual: only kind='softmax' has a log-sum-exp; got kind={kind!r}")
    config = _Config(
        kind=kind,
        is_causal=bool(is_causal),
        has_sink=sink is not None,
        block_q=block_size(block_q, T, "block_q"),
        block_k=block_size(block_k, S, "block_k"),
        num_queries=T,
        num_keys=S,
        head_dim=H,
        groups=N // K,
        interpret=interpreted(interpret),
    )
    sink = None if sink is None else _check_sink(sink, N)
    if kind == "elementwise":
        # Zeros for None keep one kernel signature; their gradient is computed and dropped.
        row_bias = jnp.zeros((B, N, T), F32) if row_bias is None else _check_row_bias(row_bias, B, N, T)
    out, lse = _attention(config, q, k, v, key_lengths, sink, row_bias)
    if return_residual:
        return out, lax.stop_gradient(lse)
    return out


__all__ = ["DTYPES", "KINDS", "pallas_online_attention"]
