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

The backward rebuilds the weights without a threshold search. Under differentiation the forward
also writes, per query row, the shift (its maximum score), tau and total = sum_s p_s, and per
(query block, key block) pass 3's `active` flag (int32 [B, N, query blocks * next_pow2(key blocks)]).
With the renormalised weights P_s = p_s / total (those the output was computed with, so the
gradient is that of the computed output), g_s = P_s ** (2 - alpha) on the support and 0 off it,
and dp_s = dout . v_s, the entmax Jacobian diag(g) - g g^T / sum g gives

    dz_s = g_s (dp_s - delta),    delta = sum_s g_s dp_s / sum_s g_s,
    dq_t = sum_s dz_ts k_s,    dk_s = sum_t dz_ts q_t,    dv_s = sum_t P_ts dout_t.

g_s = d_s ** (1/(alpha - 1) - 1) * total ** (alpha - 2) with the forward's d = u - tau, so no
log of p is taken. Two kernels, each visiting only the blocks the forward flagged active:

  - dq, grid (batch, query head, query block), ONE pass over the key blocks: it accumulates
    A = sum_s g_s dp_s k_s, Bk = sum_s g_s k_s, D = sum_s g_s dp_s and G = sum_s g_s, and writes
    dq = A - (D / G) Bk and delta = D / G;
  - dk/dv, grid (batch, query head, key block), over the query blocks (from the diagonal on when
    causal, none past the key length): it reads delta and accumulates dk and dv for its query
    head; the query heads that share a key/value head are summed in XLA afterwards.

A row without a visible key has total = 0, hence P = g = delta = 0: its gradients are exactly 0.
`sparse_attention_gradient_block_counts` reports the backward's visits.

Status: checked in Pallas interpret mode on CPU only (jax 0.10). The three kernels are written in
the subset the Triton lowering accepts (power-of-two blocks of at least 16, 2-D dots, static
shapes, `fori_loop`/`cond` control flow, float32 dots at `Precision.HIGHEST` so Triton uses IEEE
fp32 rather than TF32), and `jax.grad` of the kernel lowers to Triton IR for CUDA
(tests/attention/test_lowering.py), but they have never been compiled by Triton or run on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnlab.attention.dense import dense_attention
from attnlab.attention.masks import Visibility, group_queries, ungroup_queries
from attnlab.attention.pallas_common import block_size, check_operands, interpreted
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


def _key_blocks_in_range(key_end, query_block, config: _Config):
    """How many key blocks query block `query_block` can see: up to the key length, and the diagonal if causal."""
    num_blocks = lax.div(key_end + (config.block_k - 1), config.block_k)
    if config.is_causal:
        diagonal = lax.div((query_block + 1) * config.block_q + (config.block_k - 1), config.block_k)
        num_blocks = jnp.minimum(num_blocks, diagonal)
    return num_blocks


def _block_scores(q, k, query_start, key_start, key_end, config: _Config):
    """z = q k^T [rows of q, rows of k] in float32, and which (query, key) pairs are visible."""
    z = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)
    key_pos = key_start + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    visible = key_pos < key_end
    if config.is_causal:
        visible = visible & (key_pos <= query_start + lax.broadcasted_iota(jnp.int32, z.shape, 0))
    return z, visible


def _gaps(z, visible, shift, tau, alpha: float):
    """d = (alpha - 1)(z - shift) - tau per row, and the support {visible, d > 0}.

    The forward and both backward kernels evaluate this same expression, so the backward rebuilds
    the forward's weights bit for bit (given the same z).
    """
    d = (alpha - 1.0) * (z - shift[:, None]) - tau[:, None]
    return d, visible & (d > 0)


def _row_factors(total, alpha: float):
    """1 / total and total ** (alpha - 2) per row, both 0 where a row has no weight (total = 0)."""
    has_weight = total > 0
    safe = jnp.where(has_weight, total, 1.0)
    inverse = jnp.where(has_weight, 1.0 / safe, 0.0)
    if alpha == 2.0:
        return inverse, has_weight.astype(jnp.float32)
    return inverse, jnp.where(has_weight, jnp.exp((alpha - 2.0) * jnp.log(safe)), 0.0)


def _sparse_attention_kernel(
    q_ref, k_ref, v_ref, lengths_ref, o_ref, *extra_refs, config: _Config, with_residuals: bool, with_counts: bool
):
    block_q, block_k = config.block_q, config.block_k
    num_key_blocks = k_ref.shape[0] // block_k
    columns = pl.next_power_of_2(num_key_blocks)
    scale = config.alpha - 1.0
    exponent = config.exponent
    query_block = pl.program_id(2)
    query_start = query_block * block_q

    q = q_ref[...]
    key_end = jnp.minimum(lengths_ref[0], config.num_keys)
    num_blocks = _key_blocks_in_range(key_end, query_block, config)
    column = lax.broadcasted_iota(jnp.int32, (block_q, columns), 1)
    block_index = lax.broadcasted_iota(jnp.int32, (columns,), 0)

    def scores(j):
        start = pl.multiple_of(j * block_k, block_k)
        return _block_scores(q, k_ref[pl.ds(start, block_k), :], query_start, start, key_end, config)

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
        return _gaps(z, visible, shift, tau, config.alpha)

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
            v = v_ref[pl.ds(start, block_k), :]
            # p in v's dtype, as flash kernels do: bfloat16 inputs take the tensor cores.
            acc = acc + jnp.dot(p.astype(v.dtype), v, precision=_HIGHEST, preferred_element_type=jnp.float32)
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
    refs = list(extra_refs)
    if with_residuals:
        shift_ref, tau_ref, total_ref, map_ref = refs[:4]
        refs = refs[4:]
        shift_ref[...] = shift
        tau_ref[...] = tau
        total_ref[...] = total
        map_ref[...] = active
    if with_counts:
        for ref, value in zip(refs, (num_blocks, threshold_visits, output_visits), strict=True):
            ref[...] = jnp.full((block_q,), value, jnp.int32)


def _query_gradient_kernel(
    q_ref, k_ref, v_ref, dout_ref, lengths_ref, shift_ref, tau_ref, total_ref, map_ref, dq_ref, delta_ref,
    *count_refs, config: _Config,
):  # fmt: skip
    """dq and delta for one query block, in one pass over the key blocks the forward found active."""
    block_q, block_k = config.block_q, config.block_k
    query_block = pl.program_id(2)
    query_start = query_block * block_q
    exponent = config.exponent

    q = q_ref[...]
    dout = dout_ref[...]
    shift, tau, total = shift_ref[...], tau_ref[...], total_ref[...]
    key_end = jnp.minimum(lengths_ref[0], config.num_keys)
    num_blocks = _key_blocks_in_range(key_end, query_block, config)

    def body(j, carry):
        def visit(c):
            a, bk, gdp_sum, g_sum, n = c
            start = pl.multiple_of(j * block_k, block_k)
            k = k_ref[pl.ds(start, block_k), :]
            z, visible = _block_scores(q, k, query_start, start, key_end, config)
            d, inside = _gaps(z, visible, shift, tau, config.alpha)
            # p ** (2 - alpha) without the row factor total ** (alpha - 2): A and Bk scale with
            # it and delta does not, so it multiplies dq once at the end.
            g = _power(d, inside, exponent - 1.0)
            v = v_ref[pl.ds(start, block_k), :]
            dp = lax.dot_general(
                dout, v.astype(dout.dtype), (((1,), (1,)), ((), ())), precision=_HIGHEST,
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            g_dp = g * dp
            # float32 even for bfloat16 inputs: dq = A - delta Bk cancels, and rounding A and Bk
            # apart would not cancel with it.
            k = k.astype(jnp.float32)
            a = a + jnp.dot(g_dp, k, precision=_HIGHEST, preferred_element_type=jnp.float32)
            bk = bk + jnp.dot(g, k, precision=_HIGHEST, preferred_element_type=jnp.float32)
            return a, bk, gdp_sum + jnp.sum(g_dp, axis=1), g_sum + jnp.sum(g, axis=1), n + 1

        return lax.cond(map_ref[j] > 0, visit, lambda c: c, carry)

    zeros = jnp.zeros((block_q,), jnp.float32)
    a, bk, gdp_sum, g_sum, visits = lax.fori_loop(
        0,
        num_blocks,
        body,
        (jnp.zeros(dq_ref.shape, jnp.float32), jnp.zeros(dq_ref.shape, jnp.float32), zeros, zeros, jnp.int32(0)),
    )
    delta = jnp.where(g_sum > 0, gdp_sum / jnp.where(g_sum > 0, g_sum, 1.0), 0.0)
    _, factor = _row_factors(total, config.alpha)
    dq_ref[...] = (factor[:, None] * (a - delta[:, None] * bk)).astype(dq_ref.dtype)
    delta_ref[...] = delta
    if count_refs:
        count_refs[0][...] = jnp.full((block_q,), visits, jnp.int32)


def _key_gradient_kernel(
    q_ref, k_ref, v_ref, dout_ref, lengths_ref, shift_ref, tau_ref, total_ref, delta_ref, map_ref, dk_ref, dv_ref,
    *count_refs, config: _Config, columns: int,
):  # fmt: skip
    """dk and dv of one key block for one query head, over the query blocks the forward found it active in."""
    block_q, block_k = config.block_q, config.block_k
    key_block = pl.program_id(2)
    key_start = key_block * block_k
    exponent = config.exponent
    num_query_blocks = q_ref.shape[0] // block_q

    k = k_ref[...]
    v = v_ref[...]
    key_end = jnp.minimum(lengths_ref[0], config.num_keys)
    # Causal: query block i sees key block j iff its last query, (i + 1) block_q - 1, is at or
    # after the key block's first, j block_k: from i = j block_k // block_q on, which is past the
    # last query block for keys beyond every query (S > T).
    first = jnp.minimum(lax.div(key_start, block_q), num_query_blocks) if config.is_causal else jnp.int32(0)
    last = jnp.where(key_start < key_end, num_query_blocks, first)

    def body(i, carry):
        def visit(c):
            dk, dv, n = c
            start = pl.multiple_of(i * block_q, block_q)
            rows = pl.ds(start, block_q)
            q = q_ref[rows, :]
            z, visible = _block_scores(q, k, start, key_start, key_end, config)
            d, inside = _gaps(z, visible, shift_ref[rows], tau_ref[rows], config.alpha)
            inverse, factor = _row_factors(total_ref[rows], config.alpha)
            p = _power(d, inside, exponent) * inverse[:, None]
            g = _power(d, inside, exponent - 1.0) * factor[:, None]
            dout = dout_ref[rows, :]
            dp = lax.dot_general(
                dout, v.astype(dout.dtype), (((1,), (1,)), ((), ())), precision=_HIGHEST,
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            dz = g * (dp - delta_ref[rows][:, None])
            # p and dz in the inputs' dtype, as flash kernels do (delta is known: no cancellation).
            transposed = (((0,), (0,)), ((), ()))
            dv = dv + lax.dot_general(
                p.astype(dout.dtype), dout, transposed, precision=_HIGHEST, preferred_element_type=jnp.float32
            )
            dk = dk + lax.dot_general(
                dz.astype(q.dtype), q, transposed, precision=_HIGHEST, preferred_element_type=jnp.float32
            )
            return dk, dv, n + 1

        return lax.cond(map_ref[i * columns + key_block] > 0, visit, lambda c: c, carry)

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv, visits = lax.fori_loop(first, last, body, (zeros, zeros, jnp.int32(0)))
    dk_ref[...] = dk
    dv_ref[...] = dv
    if count_refs:
        for ref, value in zip(count_refs, (last - first, visits), strict=True):
            ref[...] = jnp.full((block_k,), value, jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The padded sizes of one call: T and S up to whole blocks, H up to a power of two >= 16."""

    T_pad: int
    S_pad: int
    head_dim: int
    num_query_blocks: int
    num_key_blocks: int
    columns: int  # entries per query block in the block map: next_pow2(num_key_blocks)

    @classmethod
    def of(cls, T: int, S: int, H: int, config: _Config) -> _Layout:
        T_pad, S_pad = pl.cdiv(T, config.block_q) * config.block_q, pl.cdiv(S, config.block_k) * config.block_k
        num_key_blocks = S_pad // config.block_k
        return cls(
            T_pad, S_pad, max(16, pl.next_power_of_2(H)), T_pad // config.block_q, num_key_blocks,
            pl.next_power_of_2(num_key_blocks),
        )  # fmt: skip

    def pad(self, x: jax.Array, length: int) -> jax.Array:
        """[B, L, heads, H] -> [B, length, heads, head_dim] with zeros."""
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, self.head_dim - x.shape[3])))


def _compiler_params(config: _Config, head_dim: int):
    if config.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


@functools.partial(jax.jit, static_argnames=("config", "with_residuals", "with_counts"))
def _forward(q, k, v, key_lengths, config: _Config, with_residuals: bool = False, with_counts: bool = False):
    """The output [B, T, N, H]; with_residuals adds (shift, tau, total, block_map), with_counts the visits.

    shift, tau, total: float32 [B, N, T_pad], per query row the score shift (row maximum), the
    threshold and sum p; block_map: int32 [B, N, num_query_blocks * columns], 1 where key block j
    holds some p > 0 for query block i (entry i * columns + j).
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    layout = _Layout.of(T, S, H, config)
    bq, hd = config.block_q, layout.head_dim
    q, k, v = layout.pad(q, layout.T_pad), layout.pad(k, layout.S_pad), layout.pad(v, layout.S_pad)
    lengths = jnp.asarray(key_lengths, jnp.int32).reshape(B, 1)
    G = config.groups

    def kv_index(b, h, i):
        return b, 0, lax.div(h, G), 0

    row_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    out_shape = [jax.ShapeDtypeStruct((B, layout.T_pad, N, hd), q.dtype)]
    out_specs = [pl.BlockSpec((None, bq, None, hd), lambda b, h, i: (b, i, h, 0))]
    if with_residuals:
        out_shape += [jax.ShapeDtypeStruct((B, N, layout.T_pad), jnp.float32)] * 3
        out_shape += [jax.ShapeDtypeStruct((B, N, layout.num_query_blocks * layout.columns), jnp.int32)]
        out_specs += [row_spec] * 3 + [pl.BlockSpec((None, None, layout.columns), lambda b, h, i: (b, h, i))]
    if with_counts:
        out_shape += [jax.ShapeDtypeStruct((B, N, layout.T_pad), jnp.int32)] * 3
        out_specs += [row_spec] * 3
    results = pl.pallas_call(
        functools.partial(
            _sparse_attention_kernel, config=config, with_residuals=with_residuals, with_counts=with_counts
        ),
        out_shape=out_shape,
        grid=(B, N, layout.num_query_blocks),
        in_specs=[
            pl.BlockSpec((None, bq, None, hd), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, layout.S_pad, None, hd), kv_index),
            pl.BlockSpec((None, layout.S_pad, None, hd), kv_index),
            pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),
        ],
        out_specs=out_specs,
        compiler_params=_compiler_params(config, hd),
        interpret=config.interpret,
        name="sparse_map_attention",
    )(q, k, v, lengths)
    outputs = [results[0][:, :T, :, :H]]
    if with_residuals:
        outputs.append(tuple(results[1:5]))
    if with_counts:
        counts = results[-3:]
        outputs.append(
            {name: c[:, :, ::bq] for name, c in zip(("reachable", "threshold", "output"), counts, strict=True)}
        )
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


@functools.partial(jax.jit, static_argnames=("config", "with_counts"))
def _backward(q, k, v, key_lengths, residuals, cotangent, config: _Config, with_counts: bool = False):
    """(dq, dk, dv) for `cotangent` from the forward's residuals; with_counts adds the visits.

    Two kernels: the first (grid over query blocks) gives dq and delta = sum_s g dp / sum_s g per
    query row; the second (grid over key blocks, per query head) gives dk and dv using delta; the
    query-head groups of dk and dv are summed here.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    layout = _Layout.of(T, S, H, config)
    bq, bk, hd = config.block_q, config.block_k, layout.head_dim
    T_pad, S_pad = layout.T_pad, layout.S_pad
    q, dout = layout.pad(q, T_pad), layout.pad(cotangent.astype(q.dtype), T_pad)
    k, v = layout.pad(k, S_pad), layout.pad(v, S_pad)
    lengths = jnp.asarray(key_lengths, jnp.int32).reshape(B, 1)
    shift, tau, total, block_map = residuals
    G = config.groups
    compiler_params = _compiler_params(config, hd)
    lengths_spec = pl.BlockSpec((None, 1), lambda b, h, i: (b, 0))

    query_block_spec = pl.BlockSpec((None, bq, None, hd), lambda b, h, i: (b, i, h, 0))
    all_keys_spec = pl.BlockSpec((None, S_pad, None, hd), lambda b, h, i: (b, 0, lax.div(h, G), 0))
    query_rows_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    out_shape = [
        jax.ShapeDtypeStruct((B, T_pad, N, hd), q.dtype),
        jax.ShapeDtypeStruct((B, N, T_pad), jnp.float32),
    ]
    out_specs = [query_block_spec, query_rows_spec]
    if with_counts:
        out_shape.append(jax.ShapeDtypeStruct((B, N, T_pad), jnp.int32))
        out_specs.append(query_rows_spec)
    dq, delta, *query_counts = pl.pallas_call(
        functools.partial(_query_gradient_kernel, config=config),
        out_shape=out_shape,
        grid=(B, N, layout.num_query_blocks),
        in_specs=[
            query_block_spec,
            all_keys_spec,
            all_keys_spec,
            query_block_spec,
            lengths_spec,
            query_rows_spec,
            query_rows_spec,
            query_rows_spec,
            pl.BlockSpec((None, None, layout.columns), lambda b, h, i: (b, h, i)),
        ],
        out_specs=out_specs,
        compiler_params=compiler_params,
        interpret=config.interpret,
        name="sparse_map_attention_dq",
    )(q, k, v, dout, lengths, shift, tau, total, block_map)

    all_queries_spec = pl.BlockSpec((None, T_pad, None, hd), lambda b, h, j: (b, 0, h, 0))
    key_block_spec = pl.BlockSpec((None, bk, None, hd), lambda b, h, j: (b, j, lax.div(h, G), 0))
    all_rows_spec = pl.BlockSpec((None, None, T_pad), lambda b, h, j: (b, h, 0))
    per_head_spec = pl.BlockSpec((None, bk, None, hd), lambda b, h, j: (b, j, h, 0))
    out_shape = [jax.ShapeDtypeStruct((B, S_pad, N, hd), jnp.float32)] * 2
    out_specs = [per_head_spec] * 2
    if with_counts:
        out_shape += [jax.ShapeDtypeStruct((B, N, S_pad), jnp.int32)] * 2
        out_specs += [pl.BlockSpec((None, None, bk), lambda b, h, j: (b, h, j))] * 2
    dk, dv, *key_counts = pl.pallas_call(
        functools.partial(_key_gradient_kernel, config=config, columns=layout.columns),
        out_shape=out_shape,
        grid=(B, N, layout.num_key_blocks),
        in_specs=[
            all_queries_spec,
            key_block_spec,
            key_block_spec,
            all_queries_spec,
            lengths_spec,
            all_rows_spec,
            all_rows_spec,
            all_rows_spec,
            all_rows_spec,
            pl.BlockSpec((None, None, block_map.shape[-1]), lambda b, h, j: (b, h, 0)),
        ],
        out_specs=out_specs,
        compiler_params=compiler_params,
        interpret=config.interpret,
        name="sparse_map_attention_dkdv",
    )(q, k, v, dout, lengths, shift, tau, total, delta, block_map)

    def key_value_heads(x):  # [B, S_pad, N, hd] per query head -> [B, S, K, H] summed over each group
        return x.reshape(B, S_pad, K, G, hd).sum(axis=3)[:, :S, :, :H]

    grads = (dq[:, :T, :, :H], key_value_heads(dk).astype(k.dtype), key_value_heads(dv).astype(v.dtype))
    if not with_counts:
        return grads
    counts = {
        "dq": query_counts[0][:, :, ::bq],
        "dkdv_reachable": key_counts[0][:, :, ::bk],
        "dkdv": key_counts[1][:, :, ::bk],
    }
    return grads, counts


def reference_attention(q, k, v, key_lengths, *, alpha: float, is_causal: bool, implementation: str = "chunked"):
    """The XLA computation with the kernel's semantics: q [B, T, N, H] already scaled, k/v [B, S, K, H].

    implementation: "chunked" runs the blocked entmax path (attention.sparse_blocked, exact
    thresholds and a closed-form backward); "dense" the dense reference (attention.dense) with
    alpha-entmax itself.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    T, S, K = q.shape[1], k.shape[1], k.shape[2]
    lengths = None if key_lengths is None else jnp.asarray(key_lengths, jnp.int32)
    visibility = Visibility(num_queries=T, num_keys=S, is_causal=is_causal, key_lengths=lengths)
    q_grouped, k_grouped, v_grouped = group_queries(q, K), jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    if implementation == "chunked":
        out, _ = sparse_blocked_attention(q_grouped, k_grouped, v_grouped, None, visibility, float(alpha))
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
    out, residuals = _forward(q, k, v, key_lengths, config, with_residuals=True)
    return out, (q, k, v, key_lengths, residuals)


def _attention_bwd(config: _Config, saved, cotangent):
    q, k, v, key_lengths, residuals = saved
    return (*_backward(q, k, v, key_lengths, residuals, cotangent, config), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _prepare(q, k, v, alpha, is_causal, key_lengths, block_q, block_k, num_iterations, interpret):
    q, k, v, key_lengths = check_operands(q, k, v, key_lengths)
    T, N = q.shape[1], q.shape[2]
    S, K = k.shape[1], k.shape[2]
    if not (isinstance(alpha, (int, float)) and 1.0 < float(alpha) <= 2.0):
        raise ValueError(f"alpha={alpha!r}; accepted: a Python float in (1, 2] (2 = sparsemax, 1.5 = 1.5-entmax)")
    if num_iterations < 1:
        raise ValueError(f"num_iterations={num_iterations}; accepted: an int >= 1")
    config = _Config(
        alpha=float(alpha),
        is_causal=bool(is_causal),
        block_q=block_size(block_q, T, "block_q"),
        block_k=block_size(block_k, S, "block_k"),
        num_iterations=int(num_iterations),
        num_keys=S,
        groups=N // K,
        interpret=interpreted(interpret),
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
        "gpu". Only interpret mode has been run (see the module docstring).

    Returns:
      out [B, T, N, H] in the dtype of q (computed in float32). Differentiable in q, k and v by two
      more Pallas kernels (dq; dk and dv) that rebuild the weights from the thresholds the forward
      saves and skip the key blocks without weight (module docstring); differentiating costs the
      forward 3 floats per query row and one int per (query block, key block) pair, and inference
      pays for neither.
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


def sparse_attention_gradient_block_counts(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cotangent: jax.Array,
    *,
    alpha: float,
    is_causal: bool,
    key_lengths: jax.Array | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_iterations: int = DEFAULT_NUM_ITERATIONS,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
    """`pallas_sparse_attention`'s output, its pullback at `cotangent`, and the blocks every kernel touched.

    Args:
      q, k, v and the keyword arguments: as for `pallas_sparse_attention`.
      cotangent: [B, T, N, H], the gradient with respect to the output.
    Returns (out, (dq, dk, dv), counts): the output and gradients as `jax.vjp` gives them, and
    counts int32 holding `sparse_attention_block_counts`'s three (forward) and
      dq: [B, N, ceil(T / block_q)] key blocks visited by the dq kernel (at most `reachable`;
        fewer means key blocks without weight skipped);
      dkdv_reachable: [B, N, ceil(S / block_k)] query blocks in range of each key block (causal
        diagonal and key length), counted per query head;
      dkdv: [B, N, ceil(S / block_k)] query blocks the dk/dv kernel visited (at most dkdv_reachable).
    Not differentiable; for tests and for measuring how much work sparsity saves.
    """
    q, k, v, key_lengths, config = _prepare(
        q, k, v, alpha, is_causal, key_lengths, block_q, block_k, num_iterations, interpret
    )
    cotangent = jnp.asarray(cotangent)
    if cotangent.shape != q.shape:
        raise ValueError(f"cotangent has shape {cotangent.shape}; expected {q.shape}, the shape of the output")
    out, residuals, counts = _forward(q, k, v, key_lengths, config, with_residuals=True, with_counts=True)
    grads, gradient_counts = _backward(q, k, v, key_lengths, residuals, cotangent, config, with_counts=True)
    return out, grads, counts | gradient_counts


__all__ = [
    "DEFAULT_NUM_ITERATIONS",
    "RESIDUAL_TOLERANCE",
    "pallas_sparse_attention",
    "reference_attention",
    "sparse_attention_block_counts",
    "sparse_attention_gradient_block_counts",
    "threshold_step",
]
