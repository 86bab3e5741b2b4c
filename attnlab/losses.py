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

Shapes: logits [..., n] with the classes on the last axis; labels either integers [...]
(class indices) or a target distribution [..., n] (one-hot or soft). Each loss returns [...],
one value per example, in the dtype of `logits` (half precision is computed in float32).
Targets are constants: no gradient flows to a soft target.

Masking: `where` (bool, broadcasting against `logits`) marks the valid classes; a logit of
-inf is masked too. Masked classes get probability 0 and exactly zero gradient, and the loss
stays finite (no 0 * inf). Then

- a row with no valid class has loss 0 and zero gradient (padding);
- a target with mass on a masked class (an integer label naming one, or out of range) lies
  outside the domain of Omega, so its loss is +inf, the limit of the loss as that class's
  logit goes to -inf, with zero gradient (the example drops out of training, though a mean
  over the batch becomes +inf). A concrete integer label out of [0, n) raises ValueError; a
  label on a masked class raises nothing, so that the same code runs under jit: check
  `jnp.isfinite` on the loss to find such examples.
- a row holding +inf logits is the limit of those logits growing together: p* is uniform over
  them, and every other class counts as masked (so a label elsewhere gives +inf).

Label smoothing eps replaces the target by y = (1 - eps) y + eps / m on the m valid classes.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.normalizers._rows import (
    align_param,
    check_finite,
    check_param,
    concrete_values,
    output_dtype,
    prepare_rows,
)
from attnlab.normalizers.mappings import entmax_rows, softmax_rows

MAPPINGS = ("softmax", "sparsemax", "entmax15", "entmax")


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
    return softmax_rows(z, valid) if isinstance(alpha, float) and alpha == 1.0 else entmax_rows(z, valid, alpha)


def _fy_value(z: jax.Array, valid: jax.Array, y: jax.Array, alpha: Any) -> jax.Array:
    """<p* - y, z> + H(p*) - H(y) on prepared rows (z finite, 0 where invalid; y = 0 where invalid)."""
    if isinstance(alpha, float) and alpha == 1.0:
        # KL(y || softmax z) from logits: log-sum-exp (z has valid maximum 0), never log(softmax).
        lse = jnp.log(jnp.sum(jnp.where(valid, jnp.exp(z), 0.0), axis=-1))
        loss = lse - jnp.sum(y * z, axis=-1) - tsallis_entropy(y, 1.0)
    else:
        p = _mapping(z, valid, alpha)
        loss = jnp.sum((p - y) * z, axis=-1) + tsallis_entropy(p, alpha) - tsallis_entropy(y, alpha)
    # L >= 0 exactly; rounding can leave it an ulp below.
    return jnp.maximum(loss, 0.0)


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


def _targets(labels: jax.Array, valid: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(y [..., n] in `dtype`, 0 where masked; outside [...] = mass of y on masked or nonexistent classes)."""
    n = valid.shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        y = jax.nn.one_hot(labels, n, dtype=dtype)  # an out-of-range traced label gives a zero row
        outside = jnp.where((labels >= 0) & (labels < n), 0.0, 1.0).astype(dtype)
    else:
        y = jax.lax.stop_gradient(labels.astype(dtype))
        outside = jnp.zeros(labels.shape[:-1], dtype)
    outside = outside + jnp.sum(jnp.where(valid, 0.0, y), axis=-1)
    return jnp.where(valid, y, 0.0), outside


def fenchel_young_loss(
    logits: Any,
    labels: Any,
    *,
    mapping: str = "softmax",
    alpha: Any = None,
    where: Any = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Fenchel-Young loss L = <p* - y, z> + H(p*) - H(y) of the normalizer `mapping`, per example.

    Args:
      logits: z, [..., n], classes on the last axis.
      labels: integer class indices [...], or target distributions [..., n] (one-hot or soft,
        summing to 1 over the valid classes).
      mapping: "softmax" (H = Shannon entropy, L = KL(y || softmax z)), "sparsemax" (alpha = 2),
        "entmax15" (alpha = 1.5) or "entmax" (needs `alpha`).
      alpha: only with mapping="entmax": >= 1, a Python float or an array broadcasting against
        [..., 1] (e.g. [H, 1, 1]); an array alpha is differentiable (dL/dalpha = dH_alpha/dalpha
        at p* minus at y, by the envelope theorem).
      where: optional bool, broadcasting against `logits`; False marks a masked class.
      label_smoothing: eps in [0, 1]; y <- (1 - eps) y + eps / m over the m valid classes.
    Returns:
      [...], >= 0, in the dtype of `logits`; 0 for a row with no valid class, +inf where the
      target puts mass on a masked class (both with zero gradient). Gradient with respect to
      `logits`: p*(z) - y, exactly 0 on masked classes.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}; valid mappings are: {', '.join(MAPPINGS)}")
    if mapping == "entmax":
        if alpha is None:
            raise ValueError('fenchel_young_loss: mapping="entmax" needs alpha (>= 1)')
        check_param("alpha", alpha, minimum=1.0, inclusive=True, where="fenchel_young_loss")
    elif alpha is not None:
        raise ValueError(f"fenchel_young_loss: alpha is only accepted with mapping='entmax'; got mapping={mapping!r}")
    else:
        alpha = {"softmax": 1.0, "sparsemax": 2.0, "entmax15": 1.5}[mapping]
    smoothing = concrete_values(label_smoothing)
    if smoothing is not None and not np.all((smoothing >= 0) & (smoothing <= 1)):
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing}")
    return _loss(logits, labels, where, label_smoothing, alpha, plus_target_entropy=False)


def _loss(logits: Any, labels: Any, where: Any, label_smoothing: Any, alpha: Any, *, plus_target_entropy: bool):
    logits = jnp.asarray(logits)
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis (the last); got a scalar")
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        # Compare in int32: uint8 byte labels would wrap the class count 256 to 0.
        labels = labels.astype(jnp.int32)
    _check_labels(labels, logits.shape)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return _loss_static(logits, labels, where, label_smoothing, float(alpha), plus_target_entropy)
    alpha = align_param(alpha, "alpha", logits.shape, -1)
    return _loss_dynamic(logits, labels, where, label_smoothing, alpha, plus_target_entropy)


def _check_labels(labels: jax.Array, shape: tuple[int, ...]) -> None:
    n = shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != shape[:-1]:
            raise ValueError(f"integer labels must have shape logits.shape[:-1] = {shape[:-1]}; got {labels.shape}")
        values = concrete_values(labels)
        if values is not None and values.size and (values.min() < 0 or values.max() >= n):
            bad = values[(values < 0) | (values >= n)]
            raise ValueError(f"integer labels must lie in [0, {n}) for {n} classes; got {bad.ravel()[:4].tolist()}")
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != shape:
            raise ValueError(
                f"target distributions must have the shape of the logits {shape}; got {labels.shape} "
                f"(integer class indices take shape {shape[:-1]})"
            )
    else:
        raise TypeError(f"labels must be integer class indices or float target distributions; got dtype {labels.dtype}")


def _loss_body(logits, labels, where, label_smoothing, alpha, plus_target_entropy):
    z, valid = prepare_rows(logits, -1, where)
    y, outside = _targets(labels, valid, z.dtype)
    n_valid = jnp.sum(valid, axis=-1, keepdims=True).astype(z.dtype)
    uniform = jnp.where(valid, 1.0 / jnp.maximum(n_valid, 1.0), 0.0)
    y = (1.0 - label_smoothing) * y + label_smoothing * uniform
    if isinstance(alpha, float):
        loss = _fy_static(z, valid, y, alpha)
    else:
        loss = _fy_dynamic(z, valid, y, alpha.astype(z.dtype))
    if plus_target_entropy:
        loss = loss + jax.lax.stop_gradient(tsallis_entropy(y, 1.0))
    loss = jnp.where(outside > 0, jnp.inf, loss)
    loss = jnp.where(n_valid[..., 0] == 0, 0.0, loss)
    return loss.astype(output_dtype(logits.dtype))


# Compiled once per shape (eager callers would otherwise pay op-by-op dispatch on every call).
_loss_static = jax.jit(_loss_body, static_argnums=(4, 5))
_loss_dynamic = jax.jit(_loss_body, static_argnums=(5,))


def softmax_cross_entropy(logits: Any, labels: Any, *, where: Any = None, label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy -sum_j y_j log softmax(z)_j, per example, from the logits (log-sum-exp).

    Matches `optax.softmax_cross_entropy_with_integer_labels` (integer labels) and
    `optax.softmax_cross_entropy` (distributions, e.g. label-smoothed). It is the softmax
    Fenchel-Young loss plus the target's Shannon entropy H(y), a constant in z (0 for a one-hot
    target): same gradient softmax(z) - y, but with label smoothing its minimum is H(y), not 0.
    Shapes, masking and smoothing as in :func:`fenchel_young_loss`.
    """
    smoothing = concrete_values(label_smoothing)
    if smoothing is not None and not np.all((smoothing >= 0) & (smoothing <= 1)):
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing}")
    return _loss(logits, labels, where, label_smoothing, 1.0, plus_target_entropy=True)


def sparsemax_loss(logits: Any, labels: Any, *, where: Any = None, label_smoothing: float = 0.0) -> jax.Array:
    """Sparsemax loss (Martins & Astudillo 2016): the Fenchel-Young loss with H = H_2, gradient sparsemax(z) - y.

    For a one-hot label k: L = -z_k + (1/2) sum_{j in S} (z_j^2 - tau^2) + 1/2, S the support.
    Shapes, masking and smoothing as in :func:`fenchel_young_loss`.
    """
    return fenchel_young_loss(logits, labels, mapping="sparsemax", where=where, label_smoothing=label_smoothing)


def entmax15_loss(logits: Any, labels: Any, *, where: Any = None, label_smoothing: float = 0.0) -> jax.Array:
    """1.5-entmax loss: the Fenchel-Young loss with H = H_1.5, gradient entmax15(z) - y.

    Shapes, masking and smoothing as in :func:`fenchel_young_loss`.
    """
    return fenchel_young_loss(logits, labels, mapping="entmax15", where=where, label_smoothing=label_smoothing)


def entmax_loss(logits: Any, labels: Any, *, alpha: Any, where: Any = None, label_smoothing: float = 0.0) -> jax.Array:
    """alpha-entmax loss: the Fenchel-Young loss with H = H_alpha, gradient entmax_alpha(z) - y.

    alpha >= 1: a Python float (1 is softmax's KL, 1.5 and 2 the exact closed forms) or a
    differentiable array broadcasting against [..., 1]. Otherwise as in :func:`fenchel_young_loss`.
    """
    return fenchel_young_loss(
        logits, labels, mapping="entmax", alpha=alpha, where=where, label_smoothing=label_smoothing
    )


_ALPHAS = {"softmax": 1.0, "sparsemax": 2.0, "entmax15": 1.5}


@dataclasses.dataclass(frozen=True)
class OutputNormalizer:
    """A classifier's output normalizer: predictions p = mapping(z), trained with the matching loss.

    The pair is what makes a sparse output layer consistent: a model trained with the sparsemax
    loss predicts sparsemax(z), which puts exact zeros on unlikely classes (so its NLL can be
    +inf, and calibration must be read with that in mind; see `attnlab.calibration`).

    Fields:
      mapping: one of MAPPINGS ("softmax", "sparsemax", "entmax15", "entmax").
      alpha: mapping="entmax" only: a finite number >= 1.
      label_smoothing: eps in [0, 1) for the training loss.

    `loss` is the cross-entropy for softmax (the softmax Fenchel-Young loss plus the target's
    entropy, so with smoothing it equals optax's) and the Fenchel-Young loss otherwise.
    """

    mapping: str = "softmax"
    alpha: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise ValueError(f"OutputNormalizer.mapping={self.mapping!r}; accepted: {', '.join(MAPPINGS)}")
        for field in ("alpha", "label_smoothing"):
            check_finite(field, getattr(self, field), where="OutputNormalizer")
        if self.mapping == "entmax":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 1:
                raise ValueError(f'OutputNormalizer: mapping="entmax" needs alpha, a number >= 1; got {self.alpha!r}')
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"OutputNormalizer.alpha applies to mapping='entmax' only; mapping is {self.mapping!r}")
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
        """A short name: the mapping, alpha for entmax and any smoothing, e.g. "entmax1.3", "softmax ls0.1"."""
        name = f"entmax{self.alpha:g}" if self.mapping == "entmax" else self.mapping
        return f"{name} ls{self.label_smoothing:g}" if self.label_smoothing else name

    @property
    def entropy_alpha(self) -> float:
        """The alpha of the Tsallis entropy paired with the mapping (1 for softmax, 2 for sparsemax)."""
        return self.alpha if self.mapping == "entmax" else _ALPHAS[self.mapping]

    @property
    def sparse(self) -> bool:
        """Whether predictions can hold exact zeros (every mapping but softmax, and entmax with alpha = 1)."""
        return self.entropy_alpha > 1.0

    def probabilities(self, logits: Any, *, where: Any = None) -> jax.Array:
        """p = mapping(logits) over the last axis, [..., n] (exact zeros for the sparse mappings)."""
        z, valid = prepare_rows(jnp.asarray(logits), -1, where)
        return _mapping(z, valid, self.entropy_alpha).astype(output_dtype(jnp.asarray(logits).dtype))

    def loss(self, logits: Any, labels: Any, *, where: Any = None) -> jax.Array:
        """The training loss per example, [...] (see the class docstring)."""
        if self.mapping == "softmax":
            return softmax_cross_entropy(logits, labels, where=where, label_smoothing=self.label_smoothing)
        return fenchel_young_loss(
            logits, labels, mapping=self.mapping, alpha=self.alpha, where=where, label_smoothing=self.label_smoothing
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


__all__ = [
    "MAPPINGS",
    "OutputNormalizer",
    "entmax15_loss",
    "entmax_loss",
    "fenchel_young_loss",
    "softmax_cross_entropy",
    "sparsemax_loss",
    "tsallis_entropy",
]
