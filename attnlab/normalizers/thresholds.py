"""Exact thresholds of the entmax family, without sorting, one pass over a row per iteration.

For u = (alpha - 1) z (a row, shifted so that its valid maximum is 0) the alpha-entmax
threshold tau solves

    f(tau) = sum_i [u_i - tau]_+ ** q - 1 = 0,      q = 1 / (alpha - 1),

f is decreasing and the root lies in [-1, -n ** (1 - alpha)] (n valid entries).

alpha <= 2 (q >= 1): f is convex, so Newton steps from the left end tau = -1 increase
monotonically to the root without overshooting, and every iterate's support S = {u > tau}
contains the true one. Each iteration is a single pass over the row that reduces, over S,

    |S|,  sum g,  sum g^2 (or sum g^q and sum g^(q-1) for other alpha),  min_S u,     g = u - tau,

(sibling reductions that XLA fuses into one loop), and everything else is arithmetic on [..., 1].
For alpha = 2 (sparsemax) and alpha = 1.5 the threshold has a closed form on a known support,

    alpha = 2:    tau = tau + (sum_S g - 1) / |S|                  (this is also the Newton step)
    alpha = 1.5:  tau = tau + mean_S g - sqrt((1 - sum_S (g - mean_S g)^2) / |S|),

and it is exact as soon as it satisfies the KKT conditions: every u in S lies above it (min_S u
> tau_closed), and it is not below the current iterate (everything outside S lies at or below
the iterate). Such a row stops with the exact value; otherwise it takes the Newton step. Other
alpha <= 2 stop when a step no longer moves tau (a few ulps) or f reaches 0.

alpha > 2: f is not convex ([u - tau]^q has unbounded slope at the support's edge, so Newton
creeps in tiny steps that look converged); these rows bisect on the bracket.

Rows are independent; the loop runs until every row is done, and finished rows are frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLOSED_FORMS = (1.5, 2.0)
# Newton for other alpha stops once sum p - 1 is below this many ulps of 1.
RESIDUAL_ULPS = 8


# Row reductions of long rows go in two steps, over [..., n / LANES, LANES] first: XLA:CPU
# vectorises a reduction over a major axis (plain vector adds) far better than one along the row,
# and it fuses the elementwise producers into it. About 2x faster per pass on rows of 4096.
LANES = 128


def _reduce_rows(x: jax.Array, reduce) -> jax.Array:
    n = x.shape[-1]
    if n % LANES == 0 and n >= 2 * LANES:
        x = reduce(x.reshape(*x.shape[:-1], n // LANES, LANES), axis=-2)
    return reduce(x, axis=-1, keepdims=True)


def _sum_rows(x: jax.Array) -> jax.Array:
    return _reduce_rows(x, jnp.sum)


def _min_rows(x: jax.Array) -> jax.Array:
    return _reduce_rows(x, jnp.min)


def _static_q(alpha) -> float | None:
    return 1.0 / (alpha - 1.0) if isinstance(alpha, float) else None


def _row_pass(u: jax.Array, valid: jax.Array, tau: jax.Array, q) -> dict[str, jax.Array]:
    """The reductions of one iteration over S = {valid, u > tau}, each [..., 1]."""
    gap = u - tau
    inside = gap > 0 if valid is None else valid & (gap > 0)
    g = jnp.where(inside, gap, 0.0)
    sums = {
        "count": _sum_rows(inside.astype(u.dtype)),
        "lowest": _min_rows(jnp.where(inside, u, jnp.finfo(u.dtype).max)),
    }
    if isinstance(q, float) and q == 1.0:
        sums["g"] = _sum_rows(g)
    elif isinstance(q, float) and q == 2.0:
        sums["g"], sums["g2"] = _sum_rows(g), _sum_rows(g * g)
    else:
        safe = jnp.where(inside, gap, 1.0)
        power = jnp.where(inside, jnp.exp(q * jnp.log(safe)), 0.0)  # g^q
        sums["gq"], sums["gq1"] = _sum_rows(power), _sum_rows(power / safe)  # sum g^q, sum g^(q-1)
    return sums


def _newton_closed_form(sums, tau, alpha: float):
    """(candidate, exact) for alpha in {1.5, 2}: the closed form on S, else the Newton step."""
    count = jnp.maximum(sums["count"], 1.0)
    if alpha == 2.0:
        candidate = tau + (sums["g"] - 1.0) / count
        return candidate, sums["lowest"] > candidate
    mean = sums["g"] / count
    spread = jnp.maximum(sums["g2"] - sums["g"] * mean, 0.0)
    discriminant = (1.0 - spread) / count
    closed = tau + mean - jnp.sqrt(jnp.maximum(discriminant, 0.0))
    exact = (discriminant >= 0) & (sums["lowest"] > closed) & (closed >= tau)
    newton = tau + (sums["g2"] - 1.0) / (2.0 * jnp.maximum(sums["g"], jnp.finfo(tau.dtype).tiny))
    return jnp.where(exact, closed, newton), exact


def _newton_threshold(u, valid, alpha, q, max_iter, origin=None, start=None):
    """Monotone Newton from tau = start (default origin - 1) for alpha <= 2 (see the module docstring)."""
    dtype = u.dtype
    batch_shape = (*u.shape[:-1], 1)
    eps = jnp.finfo(dtype).eps
    closed_form = alpha if isinstance(alpha, float) and alpha in CLOSED_FORMS else None
    origin = jnp.zeros(batch_shape, dtype) if origin is None else jnp.broadcast_to(origin, batch_shape).astype(dtype)
    if valid is None:
        done = ~jnp.isfinite(origin)
        origin = jnp.where(done, 0.0, origin)
    else:
        done = ~jnp.any(valid, axis=-1, keepdims=True)

    def cond(state):
        it, _, done = state
        return (it < max_iter) & ~jnp.all(done)

    def body(state):
        it, tau, done = state
        sums = _row_pass(u, valid, tau, q)
        if closed_form is not None:
            candidate, exact = _newton_closed_form(sums, tau, closed_form)
            # Rounding can leave the KKT check an ulp short while Newton no longer moves: stop there too.
            finished = exact | (jnp.abs(candidate - tau) <= 2 * eps * jnp.maximum(1.0, jnp.abs(tau)))
        else:
            residual = sums["gq"] - 1.0
            slope = q * sums["gq1"]
            candidate = tau + residual / jnp.maximum(slope, jnp.finfo(dtype).tiny)
            small_step = jnp.abs(candidate - tau) <= 2 * eps * jnp.maximum(1.0, jnp.abs(tau))
            # sum p = 1 + residual before the final normalisation: within a few ulps of 1 is exact
            # to the dtype's precision, and saves the last (confirming) pass.
            finished = (residual <= RESIDUAL_ULPS * eps) | small_step
            candidate = jnp.where(residual <= 0, tau, candidate)
        candidate = jnp.minimum(candidate, origin)
        tau = jnp.where(done, tau, candidate)
        return it + 1, tau, done | finished

    tau = (
        origin - 1.0 if start is None else jnp.maximum(jnp.broadcast_to(start, batch_shape).astype(dtype), origin - 1.0)
    )
    state = (jnp.asarray(0), tau, done)
    _, tau, _ = jax.lax.while_loop(cond, body, state)
    return tau


def _bisection_threshold(u, valid, q, max_iter):
    """Bisection on [-1, -n^(-1/q)] for rows where Newton is unsafe (alpha > 2)."""
    dtype = u.dtype
    batch_shape = (*u.shape[:-1], 1)
    n_valid = _sum_rows(valid.astype(dtype))
    lo = jnp.full(batch_shape, -1.0, dtype)
    hi = -jnp.exp(-jnp.log(jnp.maximum(n_valid, 1.0)) / q) + jnp.zeros(batch_shape, dtype)
    eps = jnp.finfo(dtype).eps

    def residual(tau):
        gap = jnp.where(valid, u - tau, 0.0)
        inside = gap > 0
        return _sum_rows(jnp.where(inside, jnp.exp(q * jnp.log(jnp.where(inside, gap, 1.0))), 0.0)) - 1.0

    def cond(state):
        it, lo, hi = state
        return (it < max_iter) & jnp.any(hi - lo > 2 * eps * jnp.maximum(1.0, jnp.abs(lo)))

    def body(state):
        it, lo, hi = state
        mid = 0.5 * (lo + hi)
        above = residual(mid) >= 0
        return it + 1, jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    _, lo, hi = jax.lax.while_loop(cond, body, (jnp.asarray(0), lo, hi))
    return jnp.where(n_valid > 0, 0.5 * (lo + hi), -1.0)


def _mixed_threshold(u, valid, q, max_iter):
    """Array alpha: Newton (as in _newton_threshold) on rows with alpha <= 2, bisection on the rest.

    Every iteration is one pass evaluating f and f' at each row's current point: tau for Newton
    rows, the bracket's midpoint for bisecting rows.
    """
    dtype = u.dtype
    batch_shape = (*u.shape[:-1], 1)
    eps = jnp.finfo(dtype).eps
    newton_rows = q >= 1.0
    n_valid = _sum_rows(valid.astype(dtype))
    lo = jnp.full(batch_shape, -1.0, dtype)
    hi = -jnp.exp(-jnp.log(jnp.maximum(n_valid, 1.0)) / q)
    done = n_valid == 0

    def cond(state):
        it, *_, done = state
        return (it < max_iter) & ~jnp.all(done)

    def body(state):
        it, x, lo, hi, done = state
        sums = _row_pass(u, valid, x, q)
        residual = sums["gq"] - 1.0
        newton = x + residual / jnp.maximum(q * sums["gq1"], jnp.finfo(dtype).tiny)
        newton_done = (residual <= 0) | (jnp.abs(newton - x) <= 2 * eps * jnp.maximum(1.0, jnp.abs(x)))
        lo = jnp.where(residual >= 0, x, lo)
        hi = jnp.where(residual <= 0, x, hi)
        bisect_done = hi - lo <= 2 * eps * jnp.maximum(1.0, jnp.abs(lo))
        candidate = jnp.where(newton_rows, jnp.where(residual <= 0, x, jnp.minimum(newton, 0.0)), 0.5 * (lo + hi))
        finished = jnp.where(newton_rows, newton_done, bisect_done)
        return it + 1, jnp.where(done, x, candidate), lo, hi, done | finished

    state = (jnp.asarray(0), jnp.where(newton_rows, lo, 0.5 * (lo + hi)), lo, hi, done)
    _, tau, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tau


def entmax_threshold(
    u: jax.Array,
    valid: jax.Array,
    alpha: jax.Array | float,
    *,
    max_iter: int | None = None,
    origin: jax.Array | None = None,
    start: jax.Array | None = None,
) -> jax.Array:
    """tau [..., 1] with sum over valid i of [u_i - tau]_+^(1/(alpha-1)) = 1.

    Args:
      u: [..., n] scaled logits (alpha - 1) * z with valid maximum 0 per row; invalid entries
        may hold anything finite.
      valid: [..., n] bool.
      alpha: a Python float (1.5 and 2.0 use the exact closed form) or an array broadcasting
        against [..., 1], all > 1.
      max_iter: iteration cap (default 64: enough for bisection alone to reach float64 ulp).
      origin: for unshifted rows, their valid maximum [..., 1] (u then need not have maximum 0;
        tau comes back in the same units). With an origin, `valid` may be None: entries equal
        to -inf are the invalid ones, and a row whose origin is -inf has none valid.
      start: with `origin` and alpha in (1, 2], a known lower bound of tau [..., 1] to start the
        search from (for instance the threshold of a subset of the row's entries: dropping
        entries can only lower the threshold). Must not exceed the true tau.
    Returns:
      tau, [..., 1]. A row with no valid entry gets origin - 1 (its output is masked anyway).
    """
    max_iter = 64 if max_iter is None else max_iter
    q_static = _static_q(alpha)
    if origin is not None and (q_static is None or q_static < 1.0):  # the general paths take shifted rows
        if valid is None:
            valid = u > -jnp.inf
        safe_origin = jnp.where(jnp.isfinite(origin), origin, 0.0)
        return safe_origin + entmax_threshold(jnp.where(valid, u - safe_origin, 0.0), valid, alpha, max_iter=max_iter)
    if origin is not None:
        return _newton_threshold(u, valid, alpha, q_static, max_iter, origin, start)
    if q_static is not None:
        if q_static >= 1.0:
            return _newton_threshold(u, valid, alpha, q_static, max_iter)
        return _bisection_threshold(u, valid, q_static, max_iter)
    q = jnp.broadcast_to(1.0 / (jnp.asarray(alpha, u.dtype) - 1.0), (*u.shape[:-1], 1))
    return _mixed_threshold(u, valid, q, max_iter)
