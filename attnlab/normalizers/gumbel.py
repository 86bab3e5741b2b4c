"""Gumbel-softmax: a differentiable sample from the categorical distribution softmax(logits).

A sampler, not a deterministic normalizer: it takes an explicit PRNG key and is not one of the
registry's `NAMES`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from attnlab.normalizers._rows import align_param, check_param, compute_dtype, output_dtype
from attnlab.normalizers.normalizer import _check_axis
from attnlab.normalizers.registry import softmax


def gumbel_softmax(
    key: jax.Array,
    logits: ArrayLike,
    temperature: Any,
    hard: bool = False,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """A Gumbel-softmax sample along `axis` (Jang et al. 2016; Maddison et al. 2016).

        y = softmax((logits + g) / temperature),   g_i ~ Gumbel(0, 1) i.i.d., drawn from `key`.

    As temperature -> 0, y tends to the one-hot of argmax(logits + g), which is an exact sample
    of Categorical(softmax(logits)) (the Gumbel-max trick).

    hard=True is the straight-through estimator: the value is exactly that one-hot (ties go to
    the first index), the gradient is the gradient of the relaxed y, i.e. the value is
    y_hard + (y - stop_gradient(y)).

    Args:
      key: a PRNG key (`jax.random.key` or `jax.random.PRNGKey`); one key samples the whole
        array: g = jax.random.gumbel(key, logits.shape, d), d the compute dtype (float32 for
        half precision), independent for every entry.
      logits: array [..., n, ...] of unnormalised log-probabilities; half precision is computed
        in float32 and returned as given.
      temperature: > 0; a scalar or an array broadcasting against `logits` with `axis` kept as
        size 1 (one per row). Concrete values are checked; a traced array is allowed.
      hard: static bool; True returns one-hot samples with straight-through gradients.
      axis: the axis sampled over.
      where: optional bool array broadcasting against `logits`; False entries are masked.

    Returns:
      Array of the shape and dtype of `logits`. Relaxed: >= 0, summing to 1 over the valid
      entries of each row. Hard: exactly one 1 per row, on a valid entry. In both modes masked
      entries (where=False or logit -inf) are exactly 0 with zero gradient, and a row with no
      valid entry is all zeros with zero, finite gradient.
    """
    logits = jnp.asarray(logits)
    axis = _check_axis(axis, logits.ndim, "gumbel_softmax")
    check_param("temperature", temperature, minimum=0.0, inclusive=False, where="gumbel_softmax")
    t = align_param(temperature, "temperature", logits.shape, axis)
    dtype = compute_dtype(logits.dtype)
    x = logits.astype(dtype)

    valid = ~(x < jnp.finfo(x.dtype).min)  # not -inf (NaN stays valid); no inf constant (jax_debug_infs)
    if where is not None:
        valid = valid & jnp.broadcast_to(jnp.asarray(where, dtype=bool), x.shape)

    g = jax.random.gumbel(key, x.shape, dtype)
    # Only finite values are divided by the temperature: masked entries are set to 0 and +inf
    # is passed on as is (softmax makes such a row uniform over its +inf entries), so no
    # gradient with respect to the temperature meets inf (0 * inf would give NaN).
    perturbed = jnp.where(valid, x + g, 0.0)
    finite = jnp.isfinite(perturbed)
    # back from the row-last layout of align_param to the caller's
    t = jnp.moveaxis(t, -1, axis) if t.ndim else t
    scaled = jnp.where(finite, jnp.where(finite, perturbed, 0.0) / t.astype(dtype), perturbed)
    y = softmax(scaled, axis=axis, where=valid)

    if hard:
        # argmax(z + g) = argmax((z + g) / t) for t > 0, so the temperature cannot change the pick.
        index = jnp.argmax(jnp.where(valid, perturbed, -jnp.inf), axis=axis)
        one_hot = jax.nn.one_hot(index, x.shape[axis], dtype=dtype, axis=axis)
        y_hard = one_hot * jnp.any(valid, axis=axis, keepdims=True).astype(dtype)
        # y - stop_gradient(y) is exactly 0, so the value stays exactly one-hot (the textbook
        # y_hard - stop_gradient(y) + y can round away from 0 and 1).
        y = y_hard + (y - jax.lax.stop_gradient(y))

    return y.astype(output_dtype(logits.dtype))


__all__ = ["gumbel_softmax"]
