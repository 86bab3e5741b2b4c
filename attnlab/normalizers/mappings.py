"""Mappings: valid-masked rows of logits -> probability rows.

A mapping is the second half of a normalizer (the first is an optional rescaling of the
logits, see :mod:`attnlab.normalizers.scaling`). It acts on the last axis of prepared rows
(see :func:`attnlab.normalizers._rows.prepare_rows`): z [..., n] finite where valid, and
valid [..., n] bool. It returns p [..., n] with p >= 0, sum over valid entries 1, p = 0 exactly
where invalid, and all zeros for a row with no valid entry.

The entmax family (Peters, Niculae & Martins 2019),

    alpha-entmax(z) = [(alpha - 1) z - tau]_+ ** (1 / (alpha - 1)),

covers softmax (alpha -> 1), 1.5-entmax and sparsemax (alpha = 2). Its Jacobian is

    J = diag(s) - s s^T / sum(s),   s_i = p_i ** (2 - alpha) on the support, 0 off it,

and (Correia et al. 2019)

    dp/dalpha = (p - p~) / (alpha - 1)^2 + (h - p~ sum(h)) / (alpha - 1),
    p~ = s / sum(s),  h_i = -p_i log p_i.

Both are applied through `jax.custom_jvp`, so no derivative ever passes through the
threshold search; reverse mode comes from transposing the (linear) JVP.

Near alpha = 1 the entmax form is evaluated as softmax (:func:`softmax_band`): p = g^(1/(alpha-1))
with g = u - tau within about (alpha - 1) of 1 turns the rounding of g (eps) into a relative
error of about eps / (alpha - 1) in p, while p differs from softmax by about alpha - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.normalizers._rows import align_param, compute_dtype, concrete_values, row_max
from attnlab.normalizers.describe import ALPHA, SOFTMAX, THRESHOLD, Description, Parameter, described
from attnlab.normalizers.thresholds import entmax_threshold

Align = Callable[[Any, str], jax.Array]


def _safe_total(x: jax.Array) -> jax.Array:
    """Row sums [..., 1], with 1 in place of 0 (empty rows stay 0; NaN rows stay NaN)."""
    total = jnp.sum(x, axis=-1, keepdims=True)
    return jnp.where(total == 0, 1.0, total)


def softmax_rows(z: jax.Array, valid: jax.Array) -> jax.Array:
    """p_i = exp(z_i - max z) / sum_j exp(z_j - max z) over valid entries; [..., n]."""
    m = jax.lax.stop_gradient(row_max(z, valid))
    e = jnp.where(valid, jnp.exp(jnp.where(valid, z - m, 0.0)), 0.0)
    return e / _safe_total(e)


def _entmax_forward(z: jax.Array, valid: jax.Array, alpha: Any) -> jax.Array:
    # Comparisons with NaN are False, so the threshold search would silently drop a NaN logit:
    # a row holding one is NaN, as the math dictates.
    row_has_nan = jnp.any(valid & jnp.isnan(z), axis=-1, keepdims=True)
    valid = valid & ~jnp.isnan(z)
    z = jnp.where(valid, z, 0.0)
    m = row_max(z, valid)
    u = jnp.where(valid, (alpha - 1.0) * (z - m), 0.0)
    tau = entmax_threshold(u, valid, alpha)
    gap = jnp.where(valid & (u > tau), u - tau, 0.0)
    if isinstance(alpha, float) and alpha == 2.0:
        p = gap
    elif isinstance(alpha, float) and alpha == 1.5:
        p = gap * gap
    else:
        inside = gap > 0
        p = jnp.where(inside, jnp.exp(jnp.log(jnp.where(inside, gap, 1.0)) / (alpha - 1.0)), 0.0)
    return jnp.where(row_has_nan, jnp.nan, p / _safe_total(p))


# Compiled once per shape and alpha kind: the threshold search is a while loop, and eager calls
# would otherwise trace and compile it afresh every time.
_entmax_forward_static = jax.jit(_entmax_forward, static_argnums=2)
_entmax_forward_dynamic = jax.jit(_entmax_forward)


def jacobian_weights(p: jax.Array, alpha: Any) -> jax.Array:
    """s = p^(2 - alpha) on the support of p, 0 off it."""
    support = p > 0
    if isinstance(alpha, float) and alpha == 2.0:
        return support.astype(p.dtype)
    if isinstance(alpha, float) and alpha == 1.5:
        return jnp.sqrt(p)
    safe_p = jnp.where(support, p, 1.0)
    return jnp.where(support, jnp.exp((2.0 - alpha) * jnp.log(safe_p)), 0.0)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _entmax_static(z: jax.Array, valid: jax.Array, alpha: float) -> jax.Array:
    return _entmax_forward_static(z, valid, alpha)


@_entmax_static.defjvp
def _entmax_static_jvp(alpha, primals, tangents):
    z, valid = primals
    dz, _ = tangents
    p = _entmax_static(z, valid, alpha)
    s = jacobian_weights(p, alpha)
    dp = s * dz - s * jnp.sum(s * dz, axis=-1, keepdims=True) / _safe_total(s)
    return p, dp


@jax.custom_jvp
def _entmax_dynamic(z: jax.Array, valid: jax.Array, alpha: jax.Array) -> jax.Array:
    return _entmax_forward_dynamic(z, valid, alpha)


@_entmax_dynamic.defjvp
def _entmax_dynamic_jvp(primals, tangents):
    z, valid, alpha = primals
    dz, _, dalpha = tangents
    p = _entmax_dynamic(z, valid, alpha)
    s = jacobian_weights(p, alpha)
    s_total = _safe_total(s)
    dp = s * dz - s * jnp.sum(s * dz, axis=-1, keepdims=True) / s_total
    p_tilde = s / s_total
    support = p > 0
    h = jnp.where(support, -p * jnp.log(jnp.where(support, p, 1.0)), 0.0)
    shift = alpha - 1.0
    dp_dalpha = (p - p_tilde) / shift**2 + (h - p_tilde * jnp.sum(h, axis=-1, keepdims=True)) / shift
    return p, dp + dp_dalpha * dalpha


def sparsemax_rows(z: jax.Array, valid: jax.Array) -> jax.Array:
    """Euclidean projection onto the simplex, p = [z - tau]_+ (exact threshold)."""
    return _entmax_static(z, valid, 2.0)


def entmax15_rows(z: jax.Array, valid: jax.Array) -> jax.Array:
    """1.5-entmax, p = [z/2 - tau]_+^2 (exact threshold)."""
    return _entmax_static(z, valid, 1.5)


def softmax_band(dtype: Any) -> float:
    """The width b of the band 1 <= alpha < 1 + b where alpha-entmax is evaluated as softmax, for `dtype`.

    b = sqrt(eps) / 8 (float32: 4.3e-5, float64: 1.9e-9), eps the dtype's machine epsilon. The
    rounding error of the entmax form is about eps / (4 (alpha - 1)) relative, its distance to
    softmax about c (alpha - 1) relative, c from 8 to 25 for logits of spread 0.3 to 10; b is
    about where the two cross, so either side of it p is within about 2 sqrt(eps) relative of
    the exact entmax (7e-4 in float32; without the band, 1 + 1e-8 gave all zeros in float32).
    """
    return float(np.sqrt(np.finfo(compute_dtype(dtype)).eps)) / 8.0


def entmax_rows(z: jax.Array, valid: jax.Array, alpha: Any) -> jax.Array:
    """alpha-entmax for alpha >= 1: a Python float or an array broadcasting against [..., 1].

    Static alpha in {1.5, 2} takes the exact closed forms. Alpha below 1 + softmax_band(z.dtype)
    gives softmax, the limit at alpha = 1 (see :func:`softmax_band`), with d/dalpha taken as 0
    there; alpha below 1 counts as 1 (callers reject a concrete alpha < 1; a traced one is
    clamped, as entmax is defined for alpha >= 1 only). Array alpha is differentiable.
    """
    band = softmax_band(z.dtype)
    if isinstance(alpha, (int, float)):
        alpha = float(alpha)
        if alpha < 1.0 + band:
            return softmax_rows(z, valid)
        if alpha in (1.5, 2.0):
            return _entmax_static(z, valid, alpha)
        return _entmax_dynamic(z, valid, jnp.asarray(alpha, z.dtype))
    # Decide on the concrete values (if any) before converting: under jit a concrete alpha
    # captured from outside becomes a tracer once any jnp operation touches it.
    values = concrete_values(alpha)
    alpha = jnp.asarray(alpha, z.dtype)
    near_one = alpha < 1.0 + band
    # The entmax branch never sees alpha in the band (where its value and d/dalpha are not finite).
    p = _entmax_dynamic(z, valid, jnp.where(near_one, 2.0, alpha))
    if values is not None and not (values < 1.0 + band).any():
        return p
    return jnp.where(near_one, softmax_rows(z, valid), p)


# ---------------------------------------------------------------------------------------------
# Mapping objects: what a Normalizer composes, each described once (attnlab.normalizers.describe).
# Parameters are pytree leaves (so they can be learned and traced); everything else is static.

ALPHA_PARAMETER = Parameter(
    "alpha", 1.5, "entmax's alpha: 1 is softmax, 2 sparsemax", minimum=1.0, inclusive=True, learn=ALPHA
)


@described(Description("softmax", "softmax", "exp(z) / sum exp(z)", family=SOFTMAX))
class Softmax:
    """exp(z) / sum exp(z): the SOFTMAX family with no sink, and alpha-entmax at alpha = 1."""

    sink = None
    alpha = 1.0

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return softmax_rows(z, valid)


@described(Description("sparsemax", "sparsemax", "[z - tau]_+ (exact)", family=THRESHOLD, sparse=True))
class Sparsemax:
    """argmin_{p in simplex} ||p - z||^2 = [z - tau]_+ (Martins & Astudillo 2016)."""

    alpha = 2.0

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return sparsemax_rows(z, valid)


@described(Description("entmax15", "1.5-entmax", "[z/2 - tau]_+^2 (exact)", family=THRESHOLD, sparse=True))
class Entmax15:
    """1.5-entmax, [z/2 - tau]_+^2 (Peters et al. 2019)."""

    alpha = 1.5

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return entmax15_rows(z, valid)


@described(
    Description(
        "entmax",
        "α-entmax",
        "[(alpha-1) z - tau]_+^(1/(alpha-1)), alpha >= 1",
        family=THRESHOLD,
        parameters=(ALPHA_PARAMETER,),
        sparse=True,
    )
)
class Entmax:
    """alpha-entmax, [(alpha-1) z - tau]_+^(1/(alpha-1)), alpha >= 1 (scalar or one per row)."""

    alpha: Any = 1.5

    def simplified(self) -> Any:
        """The exact closed form for a Python alpha of 1, 1.5 or 2 (softmax, 1.5-entmax, sparsemax)."""
        if isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool):
            closed = {1.0: Softmax, 1.5: Entmax15, 2.0: Sparsemax}.get(float(self.alpha))
            if closed is not None:
                return closed()
        return self

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        alpha = self.alpha
        if not isinstance(alpha, (int, float)):
            alpha = align(alpha, "alpha")
        return entmax_rows(z, valid, alpha)


__all__ = [
    "Entmax",
    "Entmax15",
    "Softmax",
    "Sparsemax",
    "align_param",
    "entmax15_rows",
    "entmax_rows",
    "softmax_band",
    "softmax_rows",
    "sparsemax_rows",
]
