"""Dense attention: the reference backend, building the [B, N, T, S] logits once.

The weights are the normalizer's own output on whole rows, p = normalizer(logits, where=visible).
For the SOFTMAX, THRESHOLD and ELEMENTWISE families (attention.families) their derivative is given
in closed form in p (a `jax.custom_jvp`, so both modes work), so that the backward keeps p and at
most one more logits-sized array, where autodiff through the normalizer's masking and shifting
keeps about ten. With dz = factor * dlogits + dfactor * z (z the normalizer's prepared logits,
`factor` its scale policy's, per row):

    SOFTMAX      dp = p * (dz - sum(p dz)) - p * (1 - sum p) dsink
    THRESHOLD    dp = s * (dz - sum(s dz) / sum(s)) + dp/dalpha dalpha,   s = p^(2 - alpha) on the support
                 dp/dalpha = (p - s / sum s) / (alpha - 1)^2 + (h - s / sum s * sum h) / (alpha - 1),
                 h = -p log p (below alpha = 1 + softmax_band, where the mapping is softmax: s = p,
                 dp/dalpha = 0)
    ELEMENTWISE  dp = p (1 - p) (dz + dbias)

and dp = 0 on a row cut to its +inf logits (the normalizer's limit there is a constant). GENERIC
normalizers (and mappings with parameters beyond their family's) are differentiated through
their own call.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from attnlab.attention import families, statistics
from attnlab.attention.blocks import grouped_scores
from attnlab.attention.masks import Visibility, apply_score
from attnlab.normalizers import ELEMENTWISE, SOFTMAX, THRESHOLD
from attnlab.normalizers._rows import align_param, prepare_rows_with_infinity
from attnlab.normalizers.mappings import jacobian_weights, softmax_band

F32 = jnp.float32


def grouped_logits(q: jax.Array, k: jax.Array, bias: jax.Array | None) -> jax.Array:
    """q [B, K, G, T, H] (already scaled), k [B, K, S, H] -> float32 logits [B, K, G, T, S]."""
    logits = grouped_scores(q, k)
    if bias is not None:
        logits = logits + bias.astype(F32)
    return logits


def to_heads(x: jax.Array) -> jax.Array:
    """[B, K, G, T, S] -> [B, N, T, S] (N = K * G), broadcasting size-1 axes first."""
    return einops.rearrange(x, "b k g ... -> b (k g) ...")


def normalize_grouped(normalizer: Callable, logits: jax.Array, visible: jax.Array) -> jax.Array:
    """Apply `normalizer` over keys on the [B, N, T, S] view of grouped logits [B, K, G, T, S]."""
    visible = jnp.broadcast_to(visible, logits.shape)
    p = normalizer(to_heads(logits), axis=-1, where=to_heads(visible))
    return p.reshape(logits.shape)


class _Static(NamedTuple):
    """The normalizer's pytree structure and its Python-number leaves (kept out of tracing, so a
    static alpha still selects its closed forms); `dynamic` lists the positions of its array leaves."""

    treedef: Any
    leaves: tuple
    dynamic: tuple[int, ...]
    scale_dynamic: bool  # the scale policy has array leaves (a learned s, temperature, ...)


def _is_static_leaf(leaf: Any) -> bool:
    return isinstance(leaf, (bool, int, float, np.generic))


def _split(normalizer) -> tuple[_Static, list]:
    leaves, treedef = jax.tree.flatten(normalizer)
    dynamic = tuple(i for i, leaf in enumerate(leaves) if not _is_static_leaf(leaf))
    static_leaves = tuple(None if i in dynamic else leaf for i, leaf in enumerate(leaves))
    scale_dynamic = normalizer.scale is not None and not all(
        _is_static_leaf(leaf) for leaf in jax.tree.leaves(normalizer.scale)
    )
    return _Static(treedef, static_leaves, dynamic, scale_dynamic), [leaves[i] for i in dynamic]


def _rebuild(static: _Static, dynamic: list):
    leaves = list(static.leaves)
    for position, value in zip(static.dynamic, dynamic, strict=True):
        leaves[position] = value
    return jax.tree.unflatten(static.treedef, leaves)


def weights(normalizer: Callable, logits: jax.Array, visible: jax.Array) -> jax.Array:
    """p [B, K, G, T, S] = normalizer(logits, where=visible) over keys, with the closed-form derivative
    of the module docstring where the normalizer's family has one."""
    if not families.has_only_family_parameters(normalizer):
        return normalize_grouped(normalizer, logits, visible)
    static, dynamic = _split(normalizer)
    return _weights(static, dynamic, logits, visible)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _weights(static: _Static, dynamic: list, logits: jax.Array, visible: jax.Array) -> jax.Array:
    return normalize_grouped(_rebuild(static, dynamic), logits, visible)


def _is_zero(tangent: Any) -> bool:
    return isinstance(tangent, SymbolicZero)


def _weights_jvp(static: _Static, primals, tangents):
    dynamic, logits, visible = primals
    d_dynamic, d_logits, _ = tangents
    normalizer = _rebuild(static, dynamic)
    p = normalize_grouped(normalizer, logits, visible)
    heads = to_heads(logits)
    z, valid, infinite = prepare_rows_with_infinity(
        heads, -1, to_heads(jnp.broadcast_to(visible, logits.shape)), shift=normalizer.shift_invariant
    )
    n_valid = jnp.sum(valid, axis=-1, keepdims=True, dtype=z.dtype)
    align = partial(align_param, logits_shape=heads.shape, axis=heads.ndim - 1)
    kind = normalizer.family
    attribute = families.FAMILY_ATTRIBUTE[kind]

    def row_params(dynamic):
        norm = _rebuild(static, dynamic)
        factor = None if norm.scale is None else norm.scale.factor(n_valid, align).astype(F32)
        value = getattr(norm.mapping, attribute, None)
        param = None if value is None or _is_static_leaf(value) else align(value, attribute).astype(F32)
        return factor, param

    params_move = any(not _is_zero(t) for t in d_dynamic)
    if params_move:
        d_dynamic = [jnp.zeros_like(x) if _is_zero(t) else t for x, t in zip(dynamic, d_dynamic, strict=True)]
        (factor, param), (d_factor, d_param) = jax.jvp(row_params, (dynamic,), (d_dynamic,))
    else:
        (factor, param), d_factor, d_param = row_params(dynamic), None, None

    # Back to the grouped layout of p (heads [B, N, T, .] -> [B, K, G, T, .]): the backward then keeps
    # p itself, the array the output's matmul keeps too.
    def grouped(x):
        if x is None or x.ndim == 0:
            return x
        x = jnp.broadcast_to(x, (*heads.shape[:-1], x.shape[-1]))
        return x.reshape(*p.shape[:-1], x.shape[-1])

    factor, param, d_factor, d_param = (grouped(x) for x in (factor, param, d_factor, d_param))
    dz = jnp.zeros(p.shape, F32) if _is_zero(d_logits) else d_logits
    if factor is not None:
        dz = dz * factor
        if params_move and static.scale_dynamic:
            dz = dz + d_factor * grouped(z)
    if kind == SOFTMAX:
        dp = p * (dz - jnp.sum(p * dz, axis=-1, keepdims=True))
        if params_move and param is not None:
            dp = dp - p * (1.0 - jnp.sum(p, axis=-1, keepdims=True)) * d_param
    elif kind == THRESHOLD:
        alpha = param if param is not None else float(normalizer.mapping.alpha)
        # alpha-entmax is softmax (s = p) below 1 + softmax_band, as the mapping evaluates it
        near_one = alpha < 1.0 + softmax_band(F32)
        if isinstance(alpha, float):  # static: the closed forms of jacobian_weights (alpha 1.5, 2)
            s = p if near_one else jacobian_weights(p, alpha)
        else:
            s = jnp.where(near_one, p, jacobian_weights(p, jnp.where(near_one, 2.0, alpha)))
        s_total = jnp.sum(s, axis=-1, keepdims=True)
        s_total = jnp.where(s_total == 0, 1.0, s_total)
        dp = s * (dz - jnp.sum(s * dz, axis=-1, keepdims=True) / s_total)
        if params_move and param is not None:
            dp = dp + jnp.where(near_one, 0.0, _entmax_alpha_derivative(p, s, s_total, alpha) * d_param)
    else:
        assert kind == ELEMENTWISE
        if params_move and param is not None:
            dz = dz + d_param
        dp = p * (dz - p * dz)  # p (1 - p) dz, written so that the backward keeps p alone
    # A row cut to its +inf logits is constant; a factor (not a where) keeps only [.., 1] for the backward.
    return p, (dp * grouped(~infinite).astype(F32)).astype(p.dtype)


_weights.defjvp(_weights_jvp, symbolic_zeros=True)


def _entmax_alpha_derivative(p: jax.Array, s: jax.Array, s_total: jax.Array, alpha: jax.Array) -> jax.Array:
    """dp/dalpha of alpha-entmax (Correia et al. 2019), for alpha > 1."""
    shift = jnp.maximum(alpha - 1.0, softmax_band(F32))
    p_tilde = s / s_total
    support = p > 0
    h = jnp.where(support, -p * jnp.log(jnp.where(support, p, 1.0)), 0.0)
    return (p - p_tilde) / shift**2 + (h - p_tilde * jnp.sum(h, axis=-1, keepdims=True)) / shift


def log_normaliser(normalizer: Callable, logits: jax.Array, visible: jax.Array) -> jax.Array:
    """[B, K, G, T]: log(exp(sink) + sum over the visible keys of exp(factor * logits)) of a SOFTMAX-family
    normalizer (jax.nn's residual); -inf for a row with nothing visible and no sink, +inf for a row
    holding +inf. Not differentiated."""
    logits, visible = jax.lax.stop_gradient(logits), jnp.broadcast_to(visible, logits.shape)
    heads = to_heads(logits)
    x, valid, infinite = prepare_rows_with_infinity(heads, -1, to_heads(visible), shift=False)
    align = partial(align_param, logits_shape=heads.shape, axis=heads.ndim - 1)
    if normalizer.scale is not None:
        n_valid = jnp.sum(valid, axis=-1, keepdims=True, dtype=x.dtype)
        x = x * jax.lax.stop_gradient(normalizer.scale.factor(n_valid, align)).astype(x.dtype)
    m = jnp.max(jnp.where(valid, x, jnp.finfo(x.dtype).min), axis=-1, keepdims=True)
    sink = getattr(normalizer.mapping, "sink", None)
    if sink is not None:
        sink = jax.lax.stop_gradient(align(sink, "sink")).astype(x.dtype)
        m = jnp.maximum(m, sink)
    total = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, x - m, 0.0)), 0.0), axis=-1, keepdims=True)
    if sink is not None:
        total = total + jnp.exp(sink - m)
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    lse = jnp.where(infinite, jnp.inf, lse)
    return lse[..., 0].reshape(logits.shape[:-1])


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    visibility: Visibility,
    normalizer: Callable,
    *,
    want_stats: bool,
    mass_keys: jax.Array | None,
    want_weights: bool,
    want_residual: bool = False,
    score_fn: Callable | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None]:
    """Returns out [B, K, G, T, H] (float32), aux (statistics [B, K, G, T], weights [B, K, G, T, S]) and,
    with `want_residual` (SOFTMAX family), the log-normaliser [B, K, G, T] (see `log_normaliser`).
    A score function maps the logits first (attention.mask_functions)."""
    logits = grouped_logits(q, k, bias)
    if score_fn is not None:
        logits = apply_score(score_fn, logits, visibility.heads, jnp.arange(q.shape[3]), jnp.arange(k.shape[2]))
    visible = visibility.dense()
    p = weights(normalizer, logits, visible)
    # Not blocks.grouped_values: its folded copy of p would be one more logits-sized residual of the
    # autodiff backward (the weights are saved once, by the normalizer).
    out = jnp.einsum("bkgts,bksh->bkgth", p, v.astype(p.dtype), preferred_element_type=F32)
    aux = statistics.from_weights(p, mass_keys) if want_stats else {}
    if want_weights:
        aux["weights"] = p
    residual = log_normaliser(normalizer, logits, visible) if want_residual else None
    return out, aux, residual
