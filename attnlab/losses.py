"""Fenchel-Young losses: the training losses that match each normalizer's mapping.

For a mapping p*(z) = argmax_{p in simplex} <p, z> + H(p) with regulariser H (an entropy),
the Fenchel-Young loss of logits z [..., n] against a target distribution y [..., n] is

    L(z; y) = Omega*(z) - <z, y> + Omega(y),      Omega = -H,
            = <p* - y, z> + H(p*) - H(y),

with H the Tsallis alpha-entropy (Blondel, Martins & Niculae 2020; Peters et al. 2019)

    H_alpha(p) = sum_j (p_j - p_j^alpha) / (alpha (alpha - 1)),     H_1(p) = -sum_j p_j log p_j,

so alpha = 1 pairs with softmax (L = KL(y || softmax(z)), the cross-entropy for a one-hot y),
alpha = 2 with sparsemax and alpha = 1.5 with 1.5-entmax. Properties:

- L >= 0, and L = 0 exactly when p*(z) = y;
- dL/dz = p*(z) - y, applied in closed form through `jax.custom_jvp` (no derivative passes
  through the threshold search); second derivatives follow the mapping's Jacobian;
- L is unchanged by adding a constant to every valid logit.

The output mappings (`MAPPINGS`) are derived from the normalizer registry: every entry without a
scale policy whose mapping is an alpha-entmax, i.e. has a numeric class attribute `alpha`
(softmax 1, sparsemax 2, entmax15 1.5) or an `alpha` parameter in its description (entmax).

Names shared with optax mean what they mean there: `softmax_cross_entropy` is optax's
(`softmax_cross_entropy` and `softmax_cross_entropy_with_integer_labels` in one), and
`multiclass_sparsemax_loss` is optax's `multiclass_sparsemax_loss` (optax's `sparsemax_loss` is
a binary loss, which this module does not provide).

Shapes: logits [..., n, ...] with the classes on `axis` (default -1); labels either integers
of the logits' shape without `axis` (class indices) or target distributions of the logits'
shape (one-hot or soft). Each loss returns one value per example (the logits' shape without
`axis`), in the dtype of `logits` (half precision is computed in float32). Targets are
constants: no gradient flows to a soft target.

Masking follows optax's `where`: a bool array either per class (as many dimensions as
`logits`, broadcasting against it) or per example (one dimension fewer: the logits' shape
without `axis`, or broadcasting against it). A class that `where` masks is left out of the
problem; a logit of -inf is a class of probability 0. Both get probability 0 and exactly zero
gradient, and the loss stays finite (no 0 * inf). Then

- an example with no valid class (all masked, or masked per example) has loss 0 and zero
  gradient (padding); its integer label is not checked (it may be out of range, as PyTorch's
  ignore_index -100);
- a target with mass on a class of logit -inf (an integer label naming one) gets loss +inf,
  the limit as that logit goes to -inf, with zero gradient (the example drops out of training,
  though a mean over the batch becomes +inf). `softmax_cross_entropy` drops target mass on
  the classes that `where` masks, as optax does (it sums -y_j log p_j over the valid classes);
  the Fenchel-Young losses, defined for targets on the simplex of valid classes, give +inf
  there too. A concrete integer label out of [0, n) on an example with a valid class raises
  ValueError; under jit nothing raises, so that the same code runs: check `jnp.isfinite` on
  the loss to find such examples.
- a row holding +inf logits is the limit of those logits growing together: p* is uniform over
  them, and every other class counts as a logit of -inf.

Label smoothing eps replaces the target by y = (1 - eps) y + eps / m on the m valid classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.normalizers import registry
from attnlab.normalizers._rows import (
    align_param,
    check_finite,
    compute_dtype,
    concrete_values,
    output_dtype,
    prepare_rows,
    restore_rows,
)
from attnlab.normalizers.mappings import entmax_rows, softmax_band


def output_mappings() -> dict[str, float | None]:
    """{name: alpha} of the output mappings, in registry order; alpha None: a parameter the caller gives."""
    found = {}
    for entry in registry.entries():
        if entry.scale is not None:
            continue
        if any(p.name == "alpha" for p in entry.mapping.description.parameters):
            found[entry.name] = None
            continue
        alpha = getattr(entry.mapping, "alpha", None)
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            found[entry.name] = float(alpha)
    return found


class _OutputNames(Sequence):
    """The output mappings' names (a live view of the registry, as `attnlab.normalizers.NAMES`)."""

    def __getitem__(self, index):
        return tuple(output_mappings())[index]

    def __len__(self) -> int:
        return len(output_mappings())

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(output_mappings()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in output_mappings()

    def __repr__(self) -> str:
        return repr(tuple(output_mappings()))


MAPPINGS: Sequence[str] = _OutputNames()
"""The output mappings' names: "softmax", "sparsemax", "entmax15", "entmax", and any registered later."""


def _parametrised() -> str:
    """The mappings that take alpha, for messages: "mapping='entmax'"."""
    return " or ".join(f"mapping={name!r}" for name, alpha in output_mappings().items() if alpha is None)


def tsallis_entropy(p: jax.Array, alpha: Any) -> jax.Array:
    """H_alpha(p) = sum_j (p_j - p_j^alpha) / (alpha (alpha - 1)), Shannon for alpha = 1; [..., n] -> [...].

    `alpha` is a Python float or an array broadcasting against [..., 1]; entries p_j = 0 add 0.
    """
    positive = p > 0
    safe_p = jnp.where(positive, p, 1.0)
    if isinstance(alpha, float):
        if alpha == 1.0:
            return -jnp.sum(jnp.where(positive, p * jnp.log(safe_p), 0.0), axis=-1)
        if alpha == 2.0:
            return jnp.sum(p - p * p, axis=-1) / 2.0
        if alpha == 1.5:
            return jnp.sum(p - p * jnp.sqrt(p), axis=-1) / 0.75
    shannon = -jnp.sum(jnp.where(positive, p * jnp.log(safe_p), 0.0), axis=-1)
    at_one = jnp.squeeze(jnp.broadcast_to(jnp.asarray(alpha) == 1.0, (*p.shape[:-1], 1)), -1)
    a = jnp.where(alpha == 1.0, 2.0, alpha)
    # p - p^a = -p expm1((a - 1) log p): no cancellation as alpha -> 1.
    terms = jnp.where(positive, -p * jnp.expm1((a - 1.0) * jnp.log(safe_p)) / a, 0.0)
    tsallis = jnp.sum(terms, axis=-1) / jnp.squeeze(jnp.broadcast_to(a - 1.0, (*p.shape[:-1], 1)), -1)
    return jnp.where(at_one, shannon, tsallis)


def _mapping(z: jax.Array, valid: jax.Array, alpha: Any) -> jax.Array:
    return entmax_rows(z, valid, alpha)


def _fy_value(z: jax.Array, valid: jax.Array, y: jax.Array, alpha: Any) -> jax.Array:
    """<p* - y, z> + H(p*) - H(y) on prepared rows (z finite, 0 where invalid; y = 0 where invalid)."""
    if isinstance(alpha, float) and alpha == 1.0:
        # KL(y || softmax z) from logits: log-sum-exp (z has valid maximum 0), never log(softmax).
        loss = _log_sum_exp(z, valid)[..., 0] - jnp.sum(y * z, axis=-1) - tsallis_entropy(y, 1.0)
    else:
        p = _mapping(z, valid, alpha)
        loss = jnp.sum((p - y) * z, axis=-1) + tsallis_entropy(p, alpha) - tsallis_entropy(y, alpha)
    # L >= 0 exactly; rounding can leave it an ulp below.
    return jnp.maximum(loss, 0.0)


def _log_sum_exp(z: jax.Array, valid: jax.Array) -> jax.Array:
    """log sum_j exp(z_j) over valid j, [..., 1], for rows whose valid maximum is 0."""
    return jnp.log(jnp.sum(jnp.where(valid, jnp.exp(z), 0.0), axis=-1, keepdims=True))


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fy_static(z: jax.Array, valid: jax.Array, y: jax.Array, alpha: float) -> jax.Array:
    return _fy_value(z, valid, y, alpha)


@_fy_static.defjvp
def _fy_static_jvp(alpha, primals, tangents):
    z, valid, y = primals
    dz = tangents[0]
    p = _mapping(z, valid, alpha)
    return _fy_static(z, valid, y, alpha), jnp.sum((p - y) * dz, axis=-1)


@jax.custom_jvp
def _fy_dynamic(z: jax.Array, valid: jax.Array, y: jax.Array, alpha: jax.Array) -> jax.Array:
    return _fy_value(z, valid, y, alpha)


@_fy_dynamic.defjvp
def _fy_dynamic_jvp(primals, tangents):
    z, valid, y, alpha = primals
    dz, _, _, dalpha = tangents
    p = _mapping(z, valid, alpha)
    # Envelope theorem: p* maximises <p, z> + H_alpha(p), so dL/dalpha = dH_alpha/dalpha at fixed p*, minus at y.
    _, dh = jax.jvp(lambda a: tsallis_entropy(p, a) - tsallis_entropy(y, a), (alpha,), (dalpha,))
    return _fy_dynamic(z, valid, y, alpha), jnp.sum((p - y) * dz, axis=-1) + dh


def _targets(
    labels: jax.Array, valid: jax.Array, in_problem: jax.Array | None, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """(y [..., n] in `dtype`, 0 where invalid; outside [...]: the mass of y on classes of the problem
    that are not valid (logit -inf, or cut by a +inf row) or do not exist (an out-of-range label)).

    `in_problem` (bool [..., n]) marks the classes whose target mass counts; mass elsewhere is
    dropped. None: every class counts.
    """
    n = valid.shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        y = jax.nn.one_hot(labels, n, dtype=dtype)  # an out-of-range traced label gives a zero row
        outside = jnp.where((labels >= 0) & (labels < n), 0.0, 1.0).astype(dtype)
    else:
        y = jax.lax.stop_gradient(labels.astype(dtype))
        outside = jnp.zeros(labels.shape[:-1], dtype)
    missing = ~valid if in_problem is None else in_problem & ~valid
    outside = outside + jnp.sum(jnp.where(missing, y, 0.0), axis=-1)
    return jnp.where(valid, y, 0.0), outside


def _checked_alpha(mapping: str, alpha: Any, where: str) -> Any:
    """The entmax alpha of the output mapping `mapping` (checked when given by the caller)."""
    table = output_mappings()
    if mapping not in table:
        raise ValueError(f"{where}: unknown mapping {mapping!r}; valid mappings are: {', '.join(table)}")
    fixed = table[mapping]
    if fixed is None:
        if alpha is None:
            raise ValueError(f'{where}: mapping="{mapping}" needs alpha (>= 1)')
        registry.entry(mapping).parameter("alpha").check(alpha, where=where)
        return alpha
    if alpha is not None:
        raise ValueError(f"{where}: alpha is only accepted with {_parametrised()}; got mapping={mapping!r}")
    return fixed


def _check_smoothing(label_smoothing: Any) -> None:
    smoothing = concrete_values(label_smoothing)
    if smoothing is not None and not np.all((smoothing >= 0) & (smoothing <= 1)):
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing}")


def fenchel_young_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    mapping: str = "softmax",
    alpha: Any = None,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Fenchel-Young loss L = <p* - y, z> + H(p*) - H(y) of the output mapping `mapping`, per example.

    Args:
      logits: z, [..., n, ...], classes on `axis`.
      labels: integer class indices (the shape of `logits` without `axis`), or target
        distributions of the shape of `logits` (one-hot or soft, summing to 1 over the valid
        classes).
      mapping: one of `MAPPINGS`: "softmax" (H = Shannon entropy, L = KL(y || softmax z)),
        "sparsemax" (alpha = 2), "entmax15" (alpha = 1.5) or "entmax" (needs `alpha`).
      alpha: only with a mapping that takes it ("entmax"): >= 1, a Python float or an array
        broadcasting against `logits` with `axis` kept as size 1 (e.g. [H, 1, 1]); an array
        alpha is differentiable (dL/dalpha = dH_alpha/dalpha at p* minus at y, by the envelope
        theorem). Alpha within `attnlab.normalizers.mappings.softmax_band` of 1 is taken as 1
        (with dL/dalpha = 0), and so is a traced alpha below 1 (a concrete one raises).
      axis: the class axis.
      where: optional bool mask, per class or per example (see the module docstring).
      label_smoothing: eps in [0, 1]; y <- (1 - eps) y + eps / m over the m valid classes.
    Returns:
      The shape of `logits` without `axis`, >= 0, in the dtype of `logits`; 0 for an example
      with no valid class, +inf where the target puts mass on a masked class (both with zero
      gradient). Gradient with respect to `logits`: p*(z) - y, exactly 0 on masked classes.
    """
    alpha = _checked_alpha(mapping, alpha, "fenchel_young_loss")
    _check_smoothing(label_smoothing)
    return _loss(logits, labels, where, label_smoothing, alpha, axis, cross_entropy=False)


def _loss(logits: Any, labels: Any, where: Any, label_smoothing: Any, alpha: Any, axis: Any, *, cross_entropy: bool):
    logits = jnp.asarray(logits)
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis; got a scalar")
    axis = _class_axis(axis, logits.ndim)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        # Compare in int32: uint8 byte labels would wrap the class count 256 to 0.
        labels = labels.astype(jnp.int32)
    where = _class_mask(where, logits.shape, axis)
    _check_labels(labels, logits.shape, axis, where)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        labels = jnp.moveaxis(labels, axis, -1)
    band = softmax_band(compute_dtype(logits.dtype))
    z = jnp.moveaxis(logits, axis, -1)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        alpha = 1.0 if alpha < 1.0 + band else float(alpha)
        return _loss_static(z, labels, where, label_smoothing, alpha, cross_entropy)
    alpha = align_param(alpha, "alpha", logits.shape, axis)
    return _loss_dynamic(z, labels, where, label_smoothing, alpha, band, cross_entropy)


def _class_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be one int (the class axis); got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for logits with {ndim} axes")
    return int(axis) % ndim


def _class_mask(where: Any, shape: tuple[int, ...], axis: int) -> jax.Array | None:
    """`where` (per class or per example, as optax) -> bool [..., n] with the classes last, or None."""
    if where is None:
        return None
    where = jnp.asarray(where, dtype=bool)
    if where.ndim == len(shape) - 1:
        where = jnp.expand_dims(where, axis)  # one flag per example, as optax
    elif where.ndim != len(shape):
        raise ValueError(
            f"where has shape {where.shape}; accepted: per class, broadcasting against the logits {shape}, "
            f"or per example, broadcasting against {shape[:axis] + shape[axis + 1 :]} (the logits without axis {axis})"
        )
    try:
        where = jnp.broadcast_to(where, shape)
    except ValueError:
        raise ValueError(
            f"where has shape {tuple(where.shape)}, which does not broadcast against the logits {shape} "
            f"(a per-example where has the logits' shape without axis {axis})"
        ) from None
    return jnp.moveaxis(where, axis, -1)


def _check_labels(labels: jax.Array, shape: tuple[int, ...], axis: int, where: jax.Array | None) -> None:
    n = shape[axis]
    example_shape = shape[:axis] + shape[axis + 1 :]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != example_shape:
            raise ValueError(
                f"integer labels must have the shape of the logits without the class axis {axis}, "
                f"{example_shape}; got {labels.shape}"
            )
        values = concrete_values(labels)
        mask = None if where is None else concrete_values(where)
        if values is None or not values.size or (where is not None and mask is None):
            return  # a traced where may mask any example: nothing to check
        bad = (values < 0) | (values >= n)
        if mask is not None:
            bad &= np.any(mask, axis=-1)  # an example with no valid class may hold any label (padding)
        if bad.any():
            raise ValueError(f"integer labels must lie in [0, {n}) for {n} classes; got {values[bad][:4].tolist()}")
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != shape:
            raise ValueError(
                f"target distributions must have the shape of the logits {shape}; got {labels.shape} "
                f"(integer class indices take shape {example_shape})"
            )
    else:
        raise TypeError(f"labels must be integer class indices or float target distributions; got dtype {labels.dtype}")


def _loss_body(logits, labels, where, label_smoothing, alpha, cross_entropy):
    """The loss on logits [..., n] (classes last), labels [...] or [..., n], where [..., n] or None."""
    z, valid = prepare_rows(logits, -1, where)
    y, outside = _targets(labels, valid, where if cross_entropy else None, z.dtype)
    n_valid = jnp.sum(valid, axis=-1, keepdims=True).astype(z.dtype)
    uniform = jnp.where(valid, 1.0 / jnp.maximum(n_valid, 1.0), 0.0)
    y = (1.0 - label_smoothing) * y + label_smoothing * uniform
    if cross_entropy:
        # -sum_j y_j log softmax(z)_j over the valid classes: each term is >= 0, no cancellation.
        loss = jnp.sum(y * (_log_sum_exp(z, valid) - z), axis=-1)
    elif isinstance(alpha, float):
        loss = _fy_static(z, valid, y, alpha)
    else:
        loss = _fy_dynamic(z, valid, y, alpha.astype(z.dtype))
    loss = jnp.where(outside > 0, jnp.inf, loss)
    loss = jnp.where(n_valid[..., 0] == 0, 0.0, loss)
    return loss.astype(output_dtype(logits.dtype))


def _loss_body_dynamic(logits, labels, where, label_smoothing, alpha, band, cross_entropy):
    # Entmax is defined for alpha >= 1, and evaluated as softmax within the band above 1.
    alpha = jnp.where(alpha < 1.0 + band, 1.0, alpha)
    return _loss_body(logits, labels, where, label_smoothing, alpha, cross_entropy)


# Compiled once per shape (eager callers would otherwise pay op-by-op dispatch on every call).
_loss_static = jax.jit(_loss_body, static_argnums=(4, 5))
_loss_dynamic = jax.jit(_loss_body_dynamic, static_argnums=(5, 6))


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Cross-entropy -sum_j y_j log softmax(z)_j over the valid classes, per example, from the logits.

    optax's `softmax_cross_entropy` (target distributions) and
    `softmax_cross_entropy_with_integer_labels` (integer labels, taken as their one-hot) in one,
    with the same `axis` and `where` (per class: those classes, and the target's mass on them,
    leave the sum and the normaliser; per example: the example's loss is 0). Gradient
    sum(y) softmax(z) - y. Unlike optax, a logit of -inf with no target mass gives a finite
    loss (optax: NaN), and a concrete label out of range raises. For a target summing to 1 over
    the valid classes it is the softmax Fenchel-Young loss plus the target's Shannon entropy
    H(y), a constant in z (0 for a one-hot target), so with label smoothing its minimum is
    H(y), not 0. Shapes, masking and smoothing as in :func:`fenchel_young_loss`.
    """
    _check_smoothing(label_smoothing)
    return _loss(logits, labels, where, label_smoothing, 1.0, axis, cross_entropy=True)


def multiclass_sparsemax_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Sparsemax loss (Martins & Astudillo 2016): the Fenchel-Young loss with H = H_2, gradient sparsemax(z) - y.

    optax's `multiclass_sparsemax_loss` (integer labels [B] against logits [B, n]: the same
    values), extended to any batch shape, target distributions, `axis`, `where` and smoothing.
    For a one-hot label k: L = <p*, z - z_k> + (1 - |p*|^2) / 2 = -z_k + (1/2) sum_{j in S}
    (z_j^2 - tau^2) + 1/2, S the support. Shapes, masking and smoothing as in
    :func:`fenchel_young_loss`.
    """
    return fenchel_young_loss(
        logits, labels, mapping="sparsemax", axis=axis, where=where, label_smoothing=label_smoothing
    )


def entmax15_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """1.5-entmax loss: the Fenchel-Young loss with H = H_1.5, gradient entmax15(z) - y.

    Shapes, masking and smoothing as in :func:`fenchel_young_loss`.
    """
    return fenchel_young_loss(
        logits, labels, mapping="entmax15", axis=axis, where=where, label_smoothing=label_smoothing
    )


def entmax_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: Any,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """alpha-entmax loss: the Fenchel-Young loss with H = H_alpha, gradient entmax_alpha(z) - y.

    alpha >= 1: a Python float (1 is softmax's KL, 1.5 and 2 the exact closed forms) or a
    differentiable array broadcasting against `logits` with `axis` kept as size 1. Otherwise as
    in :func:`fenchel_young_loss`.
    """
    return fenchel_young_loss(
        logits, labels, mapping="entmax", alpha=alpha, axis=axis, where=where, label_smoothing=label_smoothing
    )


@dataclasses.dataclass(frozen=True)
class OutputNormalizer:
    """A classifier's output normalizer: predictions p = mapping(z), trained with the matching loss.

    The pair is what makes a sparse output layer consistent: a model trained with the sparsemax
    loss predicts sparsemax(z), which puts exact zeros on unlikely classes (so its NLL can be
    +inf, and calibration must be read with that in mind; see `attnlab.calibration`).

    Fields:
      mapping: one of `MAPPINGS` ("softmax", "sparsemax", "entmax15", "entmax").
      alpha: for a mapping that takes it ("entmax") only: a finite number >= 1.
      label_smoothing: eps in [0, 1) for the training loss.

    `loss` is the cross-entropy for softmax (the softmax Fenchel-Young loss plus the target's
    entropy, so with smoothing it equals optax's) and the Fenchel-Young loss otherwise.
    """

    mapping: str = "softmax"
    alpha: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        table = output_mappings()
        if self.mapping not in table:
            raise ValueError(f"OutputNormalizer.mapping={self.mapping!r}; accepted: {', '.join(table)}")
        for field in ("alpha", "label_smoothing"):
            check_finite(field, getattr(self, field), where="OutputNormalizer")
        if table[self.mapping] is None:
            parameter = registry.entry(self.mapping).parameter("alpha")
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
                raise ValueError(
                    f'OutputNormalizer: mapping="{self.mapping}" needs alpha, a number '
                    f"{'' if parameter.minimum is None else f'>= {parameter.minimum:g}'}; got {self.alpha!r}"
                )
            parameter.check(self.alpha, where="OutputNormalizer")
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"OutputNormalizer.alpha applies to {_parametrised()} only; mapping is {self.mapping!r}")
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ValueError(f"OutputNormalizer.label_smoothing must be a number in [0, 1); got {eps!r}")

    @classmethod
    def parse(cls, value: Any, where: str = "output") -> OutputNormalizer:
        """An OutputNormalizer from itself, a mapping name, or a dict of its fields (as in a config file)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, dict)):
            table = {"mapping": value} if isinstance(value, str) else value
            unknown = sorted(set(table) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: mapping, alpha, label_smoothing")
            try:
                return cls(**table)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        raise ValueError(
            f"{where} must be a mapping name ({', '.join(MAPPINGS)}) or a table with mapping, alpha, "
            f"label_smoothing; got {value!r}"
        )

    @property
    def label(self) -> str:
        """A short name: the mapping, alpha when it takes one, and any smoothing, e.g. "entmax1.3", "softmax ls0.1"."""
        name = self.mapping if self.alpha is None else f"{self.mapping}{self.alpha:g}"
        return f"{name} ls{self.label_smoothing:g}" if self.label_smoothing else name

    @property
    def entropy_alpha(self) -> float:
        """The alpha of the Tsallis entropy paired with the mapping (1 for softmax, 2 for sparsemax)."""
        return self.alpha if self.alpha is not None else output_mappings()[self.mapping]

    @property
    def sparse(self) -> bool:
        """Whether predictions can hold exact zeros (every mapping but softmax, and entmax with alpha = 1)."""
        return self.entropy_alpha > 1.0

    def probabilities(
        self, logits: jax.typing.ArrayLike, *, axis: int = -1, where: jax.typing.ArrayLike | None = None
    ) -> jax.Array:
        """p = mapping(logits) over the class `axis` (exact zeros for the sparse mappings); `where` as for the loss."""
        logits = jnp.asarray(logits)
        axis = _class_axis(axis, logits.ndim)
        z, valid = prepare_rows(jnp.moveaxis(logits, axis, -1), -1, _class_mask(where, logits.shape, axis))
        return restore_rows(_mapping(z, valid, self.entropy_alpha), axis, logits.dtype)

    def loss(
        self,
        logits: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike,
        *,
        axis: int = -1,
        where: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """The training loss per example (see the class docstring)."""
        if self.mapping == "softmax":
            return softmax_cross_entropy(logits, labels, axis=axis, where=where, label_smoothing=self.label_smoothing)
        return fenchel_young_loss(
            logits,
            labels,
            mapping=self.mapping,
            alpha=self.alpha,
            axis=axis,
            where=where,
            label_smoothing=self.label_smoothing,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_RENAMED = {
    "sparsemax_loss": "multiclass_sparsemax_loss (optax's name; optax's sparsemax_loss is the binary loss)",
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        raise AttributeError(f"attnlab.losses.{name} was renamed {_RENAMED[name]}")
    raise AttributeError(f"module 'attnlab.losses' has no attribute {name!r}")


__all__ = [
    "MAPPINGS",
    "OutputNormalizer",
    "entmax15_loss",
    "entmax_loss",
    "fenchel_young_loss",
    "multiclass_sparsemax_loss",
    "output_mappings",
    "softmax_cross_entropy",
    "tsallis_entropy",
]
