"""Sparse-map attention as a Pallas kernel: the AdaSplash idea (Gonçalves et al. 2025).

For each query row, with z_s = q . k_s over the visible keys s,

    u = (alpha - 1) (z - max z),    p_s = [u_s - tau]_+ ** (1 / (alpha - 1)),    out = sum_s p_s v_s,

where tau solves f(tau) = sum_s [u_s - tau]_+ ** (1 / (alpha - 1)) - 1 = 0 and lies in
[-1, -n ** (1 - alpha)] (n visible keys); alpha = 2 is sparsemax, alpha = 1.5 is 1.5-entmax.
The result equals `attnlab.dot_product_attention(..., normalizer="sparsemax" | "entmax15" |
get("entmax", alpha=alpha), implementation="dense")` without ever holding a T x S matrix.

The grid is (batch, query head, query block); one program handles `block_q` query rows:

  1. a pass over the key blocks (only up to the diagonal when causal, only up to the key length)
     computes each row's maximum score, its number of visible keys, and each row's maximum per
     key block (a [block_q, key blocks] carry);
  2. `num_iterations` threshold passes, each over the key blocks, recompute the scores and
     accumulate sum d^q, sum d^(q-1) (and sum d^(q-2)), d = u - tau, for a safeguarded Halley
     (alpha <= 1.5) or Newton (alpha > 1.5) step inside a bisection bracket. For alpha in
     {1.5, 2} the same sums give the closed-form threshold on the current support
     (sparsemax: tau = (sum_S u - 1) / |S|; 1.5: tau = mean_S u - sqrt((1 - sum_S (u - mean)^2) / |S|)),
     accepted as soon as it is consistent with that support, so the threshold is exact, not merely
     converged. A row stops once it is exact or its residual |f(tau)| <= RESIDUAL_TOLERANCE;
  3. a last pass accumulates p @ v and sum p (the output is renormalised by sum p, as the dense
     path does).

Passes 2 and 3 skip every key block in which, for every row still in play, the block maximum of u
is at or below that row's tau: such a block contributes exactly zero to f, f', f'' and p @ v, so
skipping is exact, not an approximation. Once every row of a query block has converged, the later
threshold passes visit no key block at all. `sparse_attention_block_counts` reports the visits.
In interpret-mode runs on Gaussian scores (n up to 4096, logit scales 0.1 to 4, alpha from 1.05 to
2) every query block finished its threshold within the key-block visits of 2 to 11 full passes,
so the default of 16 is a cap, not the usual cost.
The per-row block maxima cost block_q * next_pow2(S / block_k) floats of registers on a GPU; for
long keys raise block_k.

Status: checked in Pallas interpret mode on CPU only (jax 0.10). The kernel is written in the
subset the Triton lowering accepts (power-of-two blocks of at least 16, 2-D dots, static shapes,
`fori_loop`/`cond` control flow, float32 dots at `Precision.HIGHEST` so Triton uses IEEE fp32
rather than TF32), but it has never been compiled for or run on a GPU. The backward pass is not a
kernel: it recomputes the blocked entmax path (attention.sparse_blocked) and differentiates that.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnlab.attention import sparse_blocked
from attnlab.attention.dense import dense_attention
from attnlab.attention.masks import Visibility, group_queries, ungroup_queries
from attnlab.attention.sparse_blocked import sparse_blocked_attention
from attnlab.normalizers import Entmax, Normalizer

# A row stops iterating once |sum_s p_s - 1| is this small; the step taken from there leaves
# an error of order its square, and the output is renormalised by sum p anyway.
RESIDUAL_TOLERANCE = 2.0**-20
DEFAULT_NUM_ITERATIONS = 16
_EPS = float(jnp.finfo(jnp.float32).eps)
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call: the kernel is traced once per distinct config."""

    alpha: float
    is_causal: bool
    block_q: int
    block_k: int
    num_iterations: int
    num_keys: int  # S before padding
    groups: int  # query heads per key/value head
    interpret: bool

    @property
    def exponent(self) -> float:
        return 1.0 / (self.alpha - 1.0)

    @property
    def closed_form(self) -> bool:
        return self.alpha in (1.5, 2.0)

    @property
    def halley(self) -> bool:
        # f'' = q (q - 1) sum d^(q - 2) is bounded only for q >= 2 (alpha <= 1.5); beyond that the
        # support's edge makes it blow up, so those alphas take Newton steps, safe as f is convex.
        return self.exponent >= 2.0


def _power(d: jax.Array, inside: jax.Array, exponent: float) -> jax.Array:
    """d ** exponent where inside, 0 elsewhere (d > 0 where inside)."""
    if exponent == 0.0:
        return inside.astype(jnp.float32)
    if exponent == 1.0:
        return jnp.where(inside, d, 0.0)
    if exponent == 2.0:
        return jnp.where(inside, d * d, 0.0)
    return jnp.where(inside, jnp.exp(exponent * jnp.log(jnp.where(inside, d, 1.0))), 0.0)


def threshold_step(state, sums, alpha: float):
    """One safeguarded Newton/Halley (or closed-form) update of the per-row thresholds.

    Args:
      state: (tau, lo, hi, done), float32 [rows] and bool [rows]; lo <= root <= hi.
      sums: (s0, s1, s2, min_in, max_out) at tau, each [rows]: s_k = sum over the support
        {u > tau} of d^(q - k), d = u - tau, q = 1/(alpha - 1) (s2 only used for Halley and
        the closed forms); min_in = min of d over the support, max_out = max of d (<= 0) over
        the visible keys outside it (-inf if none).
      alpha: static, in (1, 2].
    Returns:
      the next (tau, lo, hi, done); rows already done are left as they are.
    """
    tau, lo, hi, done = state
    s0, s1, s2, min_in, max_out = sums
    exponent = 1.0 / (alpha - 1.0)
    residual = s0 - 1.0
    slope = -exponent * s1
    lo = jnp.where(residual >= 0, tau, lo)
    hi = jnp.where(residual <= 0, tau, hi)
    safe_slope = jnp.where(slope < 0, slope, -1.0)
    step = tau - residual / safe_slope
    if exponent >= 2.0:
        curvature = exponent * (exponent - 1.0) * s2
        denominator = 2.0 * slope * slope - residual * curvature
        halley = tau - 2.0 * residual * slope / jnp.where(denominator > 0, denominator, 1.0)
        step = jnp.where(denominator > 0, halley, step)
    in_bracket = (slope < 0) & (step >= lo) & (step <= hi)
    small_residual = jnp.abs(residual) <= RESIDUAL_TOLERANCE
    new_tau = jnp.where(in_bracket, step, jnp.where(small_residual, tau, 0.5 * (lo + hi)))
    converged = small_residual | (hi - lo <= 4 * _EPS) | (jnp.abs(new_tau - tau) <= 2 * _EPS * jnp.abs(tau))
    if alpha in (1.5, 2.0):
        # Closed form on the current support S, as an increment delta over tau (shifted sums keep
        # float32 cancellation small): accepted when S = {u > tau + delta} exactly.
        if alpha == 2.0:
            count = s1
            safe_count = jnp.maximum(count, 1.0)
            delta = residual / safe_count
            solvable = count > 0
        else:
            count = s2
            safe_count = jnp.maximum(count, 1.0)
            mean = s1 / safe_count
            spread = jnp.maximum(s0 - s1 * mean, 0.0)
            discriminant = (1.0 - spread) / safe_count
            delta = mean - jnp.sqrt(jnp.maximum(discriminant, 0.0))
            solvable = (count > 0) & (discriminant >= 0)
        exact = solvable & (min_in >= delta) & (max_out <= delta)
        new_tau = jnp.where(exact, tau + delta, new_tau)
        converged = converged | exact
    tau = jnp.where(done, tau, new_tau)
    return tau, lo, hi, done | converged


def _sparse_attention_kernel(q_ref, k_ref, v_ref, lengths_ref, o_ref, *count_refs, config: _Config):
    block_q, block_k = config.block_q, config.block_k
    num_key_blocks = k_ref.shape[0] // block_k
    columns = pl.next_power_of_2(num_key_blocks)
    scale = config.alpha - 1.0
    exponent = config.exponent
    query_block = pl.program_id(2)

    q = q_ref[...]
    key_end = jnp.minimum(lengths_ref[0], config.num_keys)
    num_blocks = lax.div(key_end + (block_k - 1), block_k)
    if config.is_causal:
        num_blocks = jnp.minimum(num_blocks, lax.div((query_block + 1) * block_q + (block_k - 1), block_k))
    query_pos = query_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    column = lax.broadcasted_iota(jnp.int32, (block_q, columns), 1)
    block_index = lax.broadcasted_iota(jnp.int32, (columns,), 0)

    def scores(j):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        z = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        visible = key_pos < key_end
        if config.is_causal:
            visible = visible & (key_pos <= query_pos)
        return z, visible

    # Pass 1: row maxima, visible counts, and row maxima per key block.
    def max_body(j, carry):
        row_max, count, block_max = carry
        z, visible = scores(j)
        this_block = jnp.max(jnp.where(visible, z, -jnp.inf), axis=1)
        block_max = jnp.where(column == j, this_block[:, None], block_max)
        count = count + jnp.sum(visible.astype(jnp.float32), axis=1)
        return jnp.maximum(row_max, this_block), count, block_max

    row_max, count, block_max = lax.fori_loop(
        0,
        num_blocks,
        max_body,
        (
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32),
            jnp.full((block_q, columns), -jnp.inf, jnp.float32),
        ),
    )
    has_keys = count > 0
    shift = jnp.where(has_keys, row_max, 0.0)
    u_block_max = scale * (block_max - shift[:, None])  # -inf where a block has no visible key

    def block_gaps(tau, rows):
        """max over `rows` of (u_block_max - tau) per key block [columns], and the full [rows, columns]."""
        gaps = u_block_max - tau[:, None]
        return jnp.max(jnp.where(rows[:, None], gaps, -jnp.inf), axis=0), gaps

    def is_active(active, j):
        return jnp.max(jnp.where(block_index == j, active, 0)) > 0

    def gaps_of(z, visible, tau):
        d = scale * (z - shift[:, None]) - tau[:, None]
        return d, visible & (d > 0)

    # Pass 2: the threshold.
    def threshold_body(_, carry):
        state, visits = carry
        tau, _, _, done = state
        column_gap, gaps = block_gaps(tau, ~done)
        active = (column_gap > 0).astype(jnp.int32)

        def accumulate(j, sums_visits):
            def visit(c):
                (s0, s1, s2, min_in, max_out), n = c
                z, visible = scores(j)
                d, inside = gaps_of(z, visible, tau)
                s0 = s0 + jnp.sum(_power(d, inside, exponent), axis=1)
                s1 = s1 + jnp.sum(_power(d, inside, exponent - 1.0), axis=1)
                if config.halley or config.closed_form:
                    s2 = s2 + jnp.sum(_power(d, inside, max(exponent - 2.0, 0.0)), axis=1)
                if config.closed_form:
                    min_in = jnp.minimum(min_in, jnp.min(jnp.where(inside, d, jnp.inf), axis=1))
                    max_out = jnp.maximum(max_out, jnp.max(jnp.where(visible & ~inside, d, -jnp.inf), axis=1))
                return (s0, s1, s2, min_in, max_out), n + 1

            return lax.cond(is_active(active, j), visit, lambda c: c, sums_visits)

        zeros = jnp.zeros((block_q,), jnp.float32)
        start = (
            (zeros, zeros, zeros, jnp.full((block_q,), jnp.inf), jnp.full((block_q,), -jnp.inf)),
            visits,
        )
        (s0, s1, s2, min_in, max_out), visits = lax.fori_loop(0, num_blocks, accumulate, start)
        # A skipped block's largest gap outside the support is its block maximum minus tau.
        max_out = jnp.maximum(max_out, jnp.max(jnp.where(gaps <= 0, gaps, -jnp.inf), axis=1))
        state = threshold_step(state, (s0, s1, s2, min_in, max_out), config.alpha)
        return state, visits

    lo = jnp.full((block_q,), -1.0, jnp.float32)
    hi = -jnp.exp((1.0 - config.alpha) * jnp.log(jnp.maximum(count, 1.0)))
    (tau, _, _, _), threshold_visits = lax.fori_loop(
        0, config.num_iterations, threshold_body, ((lo, lo, hi, ~has_keys), jnp.int32(0))
    )

    # Pass 3: p @ v over the key blocks that hold some p > 0.
    column_gap, _ = block_gaps(tau, has_keys)
    active = (column_gap > 0).astype(jnp.int32)

    def output_body(j, carry):
        def visit(c):
            acc, total, n = c
            z, visible = scores(j)
            d, inside = gaps_of(z, visible, tau)
            p = _power(d, inside, exponent)
            start = pl.multiple_of(j * block_k, block_k)
            v = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
            acc = acc + jnp.dot(p, v, precision=_HIGHEST, preferred_element_type=jnp.float32)
            return acc, total + jnp.sum(p, axis=1), n + 1

        return lax.cond(is_active(active, j), visit, lambda c: c, carry)

    acc, total, output_visits = lax.fori_loop(
        0,
        num_blocks,
        output_body,
        (jnp.zeros(o_ref.shape, jnp.float32), jnp.zeros((block_q,), jnp.float32), jnp.int32(0)),
    )
    out = jnp.where(total[:, None] > 0, acc / jnp.where(total > 0, total, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    if count_refs:
        for ref, value in zip(count_refs, (num_blocks, threshold_visits, output_visits), strict=True):
            ref[...] = jnp.full((block_q,), value, jnp.int32)


def _block_size(requested: int, length: int, name: str) -> int:
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"{name}={requested}; accepted: a power of two >= 16 (the Triton lowering needs it)")
    return min(requested, max(16, pl.next_power_of_2(length)))


@functools.partial(jax.jit, static_argnames=("config", "with_counts"))
def _forward(q, k, v, key_lengths, config: _Config, with_counts: bool = False):
    B, T, N, H = q.shape
    S = k.shape[1]
    head_dim = max(16, pl.next_power_of_2(H))
    bq, bk = config.block_q, config.block_k
    T_pad, S_pad = pl.cdiv(T, bq) * bq, pl.cdiv(S, bk) * bk
    q = jnp.pad(q, ((0, 0), (0, T_pad - T), (0, 0), (0, head_dim - H)))
    k = jnp.pad(k, ((0, 0), (0, S_pad - S), (0, 0), (0, head_dim - H)))
    v = jnp.pad(v, ((0, 0), (0, S_pad - S), (0, 0), (0, head_dim - H)))
    lengths = jnp.asarray(key_lengths, jnp.int32).reshape(B, 1)
    G = config.groups
    num_query_blocks = T_pad // bq

    def kv_index(b, h, i):
        return b, 0, lax.div(h, G), 0

    out_shape = [jax.ShapeDtypeStruct((B, T_pad, N, head_dim), q.dtype)]
    out_specs = [pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))]
    if with_counts:
        out_shape += [jax.ShapeDtypeStruct((B, N, T_pad), jnp.int32)] * 3
        out_specs += [pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))] * 3
    compiler_params = None
    if not config.interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    results = pl.pallas_call(
        functools.partial(_sparse_attention_kernel, config=config),
        out_shape=out_shape,
        grid=(B, N, num_query_blocks),
        in_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, S_pad, None, head_dim), kv_index),
            pl.BlockSpec((None, S_pad, None, head_dim), kv_index),
            pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),
        ],
        out_specs=out_specs,
        compiler_params=compiler_params,
        interpret=config.interpret,
        name="sparse_map_attention",
    )(q, k, v, lengths)
    out = results[0][:, :T, :, :H]
    if not with_counts:
        return out
    counts = {name: c[:, :, ::bq] for name, c in zip(("reachable", "threshold", "output"), results[1:], strict=True)}
    return out, counts


def reference_attention(q, k, v, key_lengths, *, alpha: float, is_causal: bool, implementation: str = "chunked"):
    """The XLA computation with the kernel's semantics: q [B, T, N, H] already scaled, k/v [B, S, K, H].

    implementation: "chunked" runs the blocked entmax path (attention.sparse_blocked, exact
    thresholds and a closed-form backward: the kernel's backward differentiates it); "dense" the
    dense reference (attention.dense) with alpha-entmax itself.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    lengths = None if key_lengths is None else jnp.asarray(key_lengths, jnp.int32)
    visibility = Visibility(num_queries=T, num_keys=S, is_causal=is_causal, key_lengths=lengths)
    q_grouped, k_grouped, v_grouped = group_queries(q, K), jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    if implementation == "chunked":
        out, _ = sparse_blocked_attention(
            q_grouped, k_grouped, v_grouped, None, visibility, float(alpha),
            query_block=sparse_blocked.default_query_block(B, N, S),
        )  # fmt: skip
    elif implementation == "dense":
        normalizer = Normalizer(Entmax(alpha=float(alpha)).simplified())
        out, _, _ = dense_attention(
            q_grouped, k_grouped, v_grouped, None, visibility, normalizer,
            want_stats=False, mass_keys=None, want_weights=False,
        )  # fmt: skip
    else:
        raise ValueError(f"implementation={implementation!r}; accepted: 'chunked', 'dense'")
    return ungroup_queries(out).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_lengths, config: _Config):
    return _forward(q, k, v, key_lengths, config)


def _attention_fwd(q, k, v, key_lengths, config: _Config):
    return _forward(q, k, v, key_lengths, config), (q, k, v, key_lengths)


def _attention_bwd(config: _Config, residuals, cotangent):
    q, k, v, key_lengths = residuals

    def reference(q, k, v):
        return reference_attention(q, k, v, key_lengths, alpha=config.alpha, is_causal=config.is_causal)

    _, pullback = jax.vjp(reference, q, k, v)
    return (*pullback(cotangent.astype(q.dtype)), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _prepare(q, k, v, alpha, is_causal, key_lengths, block_q, block_k, num_iterations, interpret):
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k and v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    B, T, N, H = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != H:
        raise ValueError(
            f"k {k.shape} and v {v.shape} must equal each other and match q {q.shape} on batch and head_dim"
        )
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"{name} has dtype {x.dtype}; accepted: float32, bfloat16")
    if not (isinstance(alpha, (int, float)) and 1.0 < float(alpha) <= 2.0):
        raise ValueError(f"alpha={alpha!r}; accepted: a Python float in (1, 2] (2 = sparsemax, 1.5 = 1.5-entmax)")
    if num_iterations < 1:
        raise ValueError(f"num_iterations={num_iterations}; accepted: an int >= 1")
    S = k.shape[1]
    if key_lengths is None:
        key_lengths = jnp.full((B,), S, jnp.int32)
    key_lengths = jnp.asarray(key_lengths, jnp.int32)
    if key_lengths.shape != (B,):
        raise ValueError(f"key_lengths has shape {key_lengths.shape}; expected ({B},), one length per batch row")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    config = _Config(
        alpha=float(alpha),
        is_causal=bool(is_causal),
        block_q=_block_size(block_q, T, "block_q"),
        block_k=_block_size(block_k, S, "block_k"),
        num_iterations=int(num_iterations),
        num_keys=S,
        groups=N // K,
        interpret=bool(interpret),
    )
    return q, k, v, key_lengths, config


def pallas_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    alpha: float,
    is_causal: bool,
    key_lengths: jax.Array | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_iterations: int = DEFAULT_NUM_ITERATIONS,
    interpret: bool | None = None,
) -> jax.Array:
    """alpha-entmax attention, out[b, t, n] = sum_s p[b, n, t, s] v[b, s, n // G], as one Pallas kernel.

        p[b, n, t, :] = [(alpha - 1)(z - max z) - tau]_+ ** (1 / (alpha - 1)),
        z_s = q[b, t, n] . k[b, s, n // G]   over the visible keys s,

    with tau the exact threshold (sum_s p = 1); see the module docstring for the algorithm.

    Args:
      q: [B, T, N, H], float32 or bfloat16, ALREADY multiplied by the softmax scale (1/sqrt(H) for
        the usual attention): the kernel applies no scale of its own.
      k, v: [B, S, K, H], same dtype family; N must be a multiple of K (grouped-query attention:
        query head n reads key/value head n // (N // K)).
      alpha: a Python float in (1, 2]: 2 = sparsemax, 1.5 = 1.5-entmax (both with exact closed-form
        thresholds), anything else general alpha-entmax (Halley/Newton to RESIDUAL_TOLERANCE).
      is_causal: key s visible to query t iff s <= t (top-left aligned, like jax.nn).
      key_lengths: optional int [B]; keys s >= key_lengths[b] are hidden. A query with no visible
        key gets output 0 (and zero gradients).
      block_q, block_k: powers of two >= 16 (shrunk to the padded sequence length when larger).
        T and S are padded up to them and the padding is masked; H is padded to a power of two >= 16.
      num_iterations: threshold passes per query block (rows that converge earlier stop, and
        their key blocks are then skipped).
      interpret: run the Pallas interpreter; None means interpret unless `jax.default_backend()` is
        "gpu". Only interpret mode has been tested (see the module docstring).

    Returns:
      out [B, T, N, H] in the dtype of q (computed in float32). Differentiable in q, k and v: the
      backward recomputes `reference_attention` (the blocked entmax path, attention.sparse_blocked)
      and differentiates it; it is not a kernel yet.
    """
    q, k, v, key_lengths, config = _prepare(
        q, k, v, alpha, is_causal, key_lengths, block_q, block_k, num_iterations, interpret
    )
    return _attention(q, k, v, key_lengths, config)


def sparse_attention_block_counts(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    alpha: float,
    is_causal: bool,
    key_lengths: jax.Array | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_iterations: int = DEFAULT_NUM_ITERATIONS,
    interpret: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`pallas_sparse_attention`'s output and, per [B, N, query block], the key blocks it touched.

    Returns (out, counts) with counts int32 [B, N, ceil(T / block_q)]:
      reachable: key blocks in range (causal diagonal and key length), each scanned once in pass 1;
      threshold: key blocks visited over all threshold passes (at most num_iterations * reachable);
      output: key blocks visited by the p @ v pass (at most reachable; fewer means blocks skipped).
    Not differentiable; for tests and for measuring how much work sparsity saves.
    """
    q, k, v, key_lengths, config = _prepare(
        q, k, v, alpha, is_causal, key_lengths, block_q, block_k, num_iterations, interpret
    )
    return _forward(q, k, v, key_lengths, config, with_counts=True)


__all__ = [
    "DEFAULT_NUM_ITERATIONS",
    "RESIDUAL_TOLERANCE",
    "pallas_sparse_attention",
    "reference_attention",
    "sparse_attention_block_counts",
    "threshold_step",
]
