"""Row preparation shared by every normalizer: dtype, masking, axis and parameter layout.

Every public normalizer works on rows: the entries of `logits` along `axis`. Internally the
row axis is moved last, logits are computed in float32 (float64 stays float64), and a boolean
`valid` array marks the entries that take part. Parameters (temperature, alpha, s, ...) are
given in the caller's layout, broadcasting against the logits with the row axis kept as size 1,
and are moved to the internal layout by :func:`align_param`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: Any) -> jnp.dtype:
    """float32 for half precision and integer inputs, the input dtype for float32/float64."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def output_dtype(dtype: Any) -> jnp.dtype:
    """The input dtype for floating inputs; float32 for integer or boolean logits."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def row_max(z: jax.Array, valid: jax.Array) -> jax.Array:
    """max over the valid entries of each row, [..., 1]; 0 for a row with no finite maximum."""
    # The lowest finite value, not -inf, stands for "no entry": no op makes an infinity from
    # finite logits (jax_debug_infs stays quiet), and a row with none valid gets 0.
    m = jnp.max(jnp.where(valid, z, jnp.finfo(z.dtype).min), axis=-1, keepdims=True)
    return jnp.where(jnp.any(valid, axis=-1, keepdims=True) & jnp.isfinite(m), m, 0.0)


def prepare_rows(
    logits: jax.Array, axis: int, where: jax.Array | None, *, shift: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Move `axis` last, cast, and resolve masking and infinities.

    Returns (z, valid), both [..., n]:
      - valid = where & (logits != -inf); NaN counts as valid so that it propagates;
      - a row holding +inf keeps only its +inf entries, each with logit 0 (the limit of the
        mapping as those logits grow together: uniform over them, for a shift-invariant map);
      - with `shift`, z is shifted by the row's valid maximum (for shift-invariant mappings),
        floored at -finfo.max so that differences never reach -inf; without it z keeps the
        logits' values (the maps that are not shift invariant shift internally);
      - z is 0 where invalid, so no inf or NaN from a masked entry reaches a value or a gradient.
    """
    z, valid, _ = prepare_rows_with_infinity(logits, axis, where, shift=shift)
    return z, valid


def prepare_rows_with_infinity(
    logits: jax.Array, axis: int, where: jax.Array | None, *, shift: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`prepare_rows`, and also bool [..., 1]: whether each row held a valid +inf (and was cut to those entries)."""
    x = jnp.asarray(logits)
    x = x.astype(compute_dtype(x.dtype))
    if where is not None:
        where = jnp.broadcast_to(jnp.asarray(where, dtype=bool), x.shape)
        where = jnp.moveaxis(where, axis, -1)
    x = jnp.moveaxis(x, axis, -1)
    valid = ~(x < jnp.finfo(x.dtype).min)  # not -inf (NaN stays valid); no inf constant (jax_debug_infs)
    if where is not None:
        valid = valid & where
    pos_inf = valid & (x > jnp.finfo(x.dtype).max)
    row_has_pos_inf = jnp.any(pos_inf, axis=-1, keepdims=True)
    valid = jnp.where(row_has_pos_inf, pos_inf, valid)
    x = jnp.where(pos_inf, 0.0, x)
    if not shift:
        return jnp.where(valid, x, 0.0), valid, row_has_pos_inf
    m = jax.lax.stop_gradient(row_max(x, valid))
    lowest = jnp.finfo(x.dtype).min
    z = jnp.where(valid, jnp.maximum(x - m, lowest), 0.0)
    return z, valid, row_has_pos_inf


def restore_rows(p: jax.Array, axis: int, dtype: Any) -> jax.Array:
    """Inverse of the layout change in :func:`prepare_rows`, cast to the caller's dtype."""
    return jnp.moveaxis(p, -1, axis).astype(output_dtype(dtype))


def align_param(value: Any, name: str, logits_shape: tuple[int, ...], axis: int) -> jax.Array:
    """A parameter in the caller's layout -> the internal layout ([..., 1], row axis last).

    `value` must broadcast against `logits_shape` with the row axis set to 1: for logits
    [B, H, T, S] normalised over S, one value per head is an array of shape [H, 1, 1].
    """
    value = jnp.asarray(value)
    if value.ndim == 0:
        return value
    keep_shape = list(logits_shape)
    keep_shape[axis] = 1
    try:
        value = jnp.broadcast_to(value, tuple(keep_shape))
    except ValueError:
        raise ValueError(
            f"parameter {name!r} has shape {value.shape}, which does not broadcast against the "
            f"logits shape {tuple(logits_shape)} with the normalised axis ({axis}) kept as size 1, "
            f"i.e. {tuple(keep_shape)}; for one value per head of [B, H, T, S] logits use [H, 1, 1]"
        ) from None
    return jnp.moveaxis(value, axis, -1)


def concrete_values(value: Any) -> np.ndarray | None:
    """The numeric value of `value` as numpy, or None if it is traced or not numeric.

    Parameter checks run only on concrete values: inside jit (or on the placeholders pytree
    utilities pass around) there is nothing to check.
    """
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, int, float, np.ndarray, np.number, jax.Array)):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
            return None
    return None


def _reject(where: str, name: str, requirement: str, bad: np.ndarray) -> ValueError:
    return ValueError(
        f"{where}: parameter {name!r} must be {requirement}; got {bad.ravel()[:4].tolist()}"
        + (" (showing the first 4 bad entries)" if np.size(bad) > 4 else "")
    )


def check_finite(name: str, value: Any, *, where: str) -> None:
    """Raise ValueError unless every concrete entry of `value` is finite (not inf, not nan).

    The message has the range checks' form, `{where}: parameter {name!r} must be finite; got
    [...]`. None (a parameter's "use the default") and traced values pass: inside jit there is
    nothing to check. The library's argument checks (`check_param`, `get`,
    `attnlab.nn.NormalizerSpec`, `attnlab.losses`) share this one helper.
    """
    values = concrete_values(value)
    if values is None or np.all(np.isfinite(values)):
        return
    raise _reject(where, name, "finite", values[~np.isfinite(values)] if values.ndim else values)


def check_param(name: str, value: Any, *, minimum: float, inclusive: bool, where: str) -> None:
    """Raise ValueError unless every concrete entry of `value` is finite and > (or >=) `minimum`."""
    check_finite(name, value, where=where)
    values = concrete_values(value)
    if values is None:
        return
    ok = values >= minimum if inclusive else values > minimum
    if not np.all(ok):
        raise _reject(where, name, f"{'>=' if inclusive else '>'} {minimum:g}", values[~ok] if values.ndim else values)


def register_pytree_dataclass(cls: type, data_fields: list[str], meta_fields: list[str]) -> type:
    """Register a frozen dataclass as a pytree whose unflattening skips `__init__`.

    Parameter checks belong to construction by a user; pytrees are also rebuilt by jax with
    cotangents, zeros or placeholders (jax.grad, tree_map, optimizer states), which must not be
    validated as parameters.
    """

    def flatten(node):
        children = [getattr(node, name) for name in data_fields]
        keys = [jax.tree_util.GetAttrKey(name) for name in data_fields]
        return list(zip(keys, children, strict=True)), tuple(getattr(node, name) for name in meta_fields)

    def unflatten(meta, children):
        node = object.__new__(cls)
        for name, value in zip(data_fields, children, strict=True):
            object.__setattr__(node, name, value)
        for name, value in zip(meta_fields, meta, strict=True):
            object.__setattr__(node, name, value)
        return node

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    return cls
