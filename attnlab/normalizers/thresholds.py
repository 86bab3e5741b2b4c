"""Exact thresholds of the entmax family, without sorting.

For u = (alpha - 1) z (a row, shifted so that its valid maximum is 0) the alpha-entmax
threshold tau solves

    f(tau) = sum_i [u_i - tau]_+ ** q - 1 = 0,      q = 1 / (alpha - 1),

f is decreasing, and the root lies in [-1, -n ** (1 - alpha)] (n valid entries). We take
Newton steps from the left end, falling back to bisection whenever a step would leave the
bracket; for alpha > 2, where f is no longer convex, we bisect only. For alpha <= 2, f is convex, so
Newton from the left never overshoots and every iterate's support {u > tau} contains the true
support.

For alpha = 2 (sparsemax) and alpha = 1.5 the threshold has a closed form once the support S
is known:

    alpha = 2:    tau = (sum_S u - 1) / |S|                 (Newton here is Michelot's algorithm)
    alpha = 1.5:  tau = mean_S u - sqrt((1 - sum_S (u - mean_S u)^2) / |S|)

so in those cases every iteration solves the closed form on the current support and stops as
soon as it satisfies the KKT conditions (everything in S above tau, everything outside at or
below it). The result is then exact, not merely converged. Rows are independent; the loop
runs until every row is done, and converged rows are frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLOSED_FORMS = (1.5, 2.0)


def _sum_rows(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=-1, keepdims=True)


def _residual_and_slope(
    u: jax.Array, valid: jax.Array, tau: jax.Array, q: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """f(tau) and f'(tau) for f(tau) = sum [u - tau]_+^q - 1."""
    gap = jnp.where(valid, u - tau, 0.0)
    inside = gap > 0
    safe_gap = jnp.where(inside, gap, 1.0)
    if isinstance(q, float) and q == 1.0:
        value, slope = jnp.where(inside, gap, 0.0), inside.astype(u.dtype)
    elif isinstance(q, float) and q == 2.0:
        value, slope = jnp.where(inside, gap * gap, 0.0), 2.0 * jnp.where(inside, gap, 0.0)
    else:
        log_gap = jnp.log(safe_gap)
        value = jnp.where(inside, jnp.exp(q * log_gap), 0.0)
        slope = jnp.where(inside, q * jnp.exp((q - 1.0) * log_gap), 0.0)
    return _sum_rows(value) - 1.0, -_sum_rows(slope)


def _closed_form(u: jax.Array, support: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """The threshold solving f = 0 on a fixed support, and whether that support is consistent."""
    count = _sum_rows(support.astype(u.dtype))
    safe_count = jnp.maximum(count, 1.0)
    total = _sum_rows(jnp.where(support, u, 0.0))
    if alpha == 2.0:
        tau = (total - 1.0) / safe_count
        solvable = count > 0
    else:
        mean = total / safe_count
        spread = _sum_rows(jnp.where(support, (u - mean) ** 2, 0.0))
        discriminant = (1.0 - spread) / safe_count
        tau = mean - jnp.sqrt(jnp.maximum(discriminant, 0.0))
        solvable = (count > 0) & (discriminant >= 0)
    lowest_in = jnp.min(jnp.where(support, u, jnp.inf), axis=-1, keepdims=True)
    return tau, solvable & (lowest_in >= tau)


def entmax_threshold(
    u: jax.Array,
    valid: jax.Array,
    alpha: jax.Array | float,
    *,
    max_iter: int | None = None,
) -> jax.Array:
    """tau [..., 1] with sum over valid i of [u_i - tau]_+^(1/(alpha-1)) = 1.

    Args:
      u: [..., n] scaled logits (alpha - 1) * z with valid maximum 0 per row; invalid entries
        may hold anything finite.
      valid: [..., n] bool.
      alpha: a Python float (1.5 and 2.0 use the exact closed form) or an array broadcasting
        against [..., 1], all > 1.
      max_iter: iteration cap (default 64: enough for bisection alone to reach float64 ulp).
    Returns:
      tau, [..., 1]. A row with no valid entry gets -1 (its output is masked anyway).
    """
    closed_form = alpha if isinstance(alpha, float) and alpha in CLOSED_FORMS else None
    q = 1.0 / (alpha - 1.0) if isinstance(alpha, float) else 1.0 / (jnp.asarray(alpha, u.dtype) - 1.0)
    dtype = u.dtype
    batch_shape = (*u.shape[:-1], 1)
    n_valid = _sum_rows(valid.astype(dtype))
    lo = jnp.full(batch_shape, -1.0, dtype)
    hi = -jnp.exp(-jnp.log(jnp.maximum(n_valid, 1.0)) / q) + jnp.zeros(batch_shape, dtype)
    eps = jnp.finfo(dtype).eps
    done = n_valid == 0
    max_iter = 64 if max_iter is None else max_iter
    # Newton is safe only where f is convex (alpha <= 2, q >= 1). For alpha > 2 the terms
    # [u - tau]^q have unbounded slope at the support's edge, so Newton creeps in tiny steps that
    # look converged; those rows bisect instead.
    newton_safe = q >= 1.0 if isinstance(q, float) else jnp.broadcast_to(q >= 1.0, batch_shape)

    def cond(state):
        it, _, _, _, done = state
        return (it < max_iter) & ~jnp.all(done)

    def body(state):
        it, tau, lo, hi, done = state
        if closed_form is not None:
            tau_exact, consistent = _closed_form(u, valid & (u > tau), closed_form)
            highest_out = jnp.max(jnp.where(valid & (u <= tau), u, -jnp.inf), axis=-1, keepdims=True)
            exact_here = consistent & (highest_out <= tau_exact)
        else:
            tau_exact, exact_here = tau, jnp.zeros_like(done)
        residual, slope = _residual_and_slope(u, valid, tau, q)
        lo = jnp.where(residual >= 0, tau, lo)
        hi = jnp.where(residual <= 0, tau, hi)
        newton = tau - residual / jnp.where(slope < 0, slope, -1.0)
        in_bracket = (newton >= lo) & (newton <= hi) & (slope < 0) & newton_safe
        stepped = jnp.where(in_bracket, newton, 0.5 * (lo + hi))
        small_step = jnp.abs(stepped - tau) <= 2 * eps * jnp.maximum(1.0, jnp.abs(tau))
        converged = (residual == 0) | small_step | (hi - lo <= 2 * eps)
        new_tau = jnp.where(exact_here, tau_exact, jnp.where(converged, tau, stepped))
        tau = jnp.where(done, tau, new_tau)
        done = done | exact_here | converged
        return it + 1, tau, lo, hi, done

    state = (jnp.asarray(0), lo, lo, hi, done)
    _, tau, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tau
