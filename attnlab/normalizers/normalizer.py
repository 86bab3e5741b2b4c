"""A normalizer = an optional scale policy followed by a mapping, applied along one axis."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from attnlab.normalizers._rows import (
    align_param,
    output_dtype,
    prepare_rows_with_infinity,
    register_pytree_dataclass,
    restore_rows,
)
from attnlab.normalizers.describe import ELEMENTWISE, SOFTMAX

Mapping = Any
"""A described mapping class instance (`attnlab.normalizers.describe.described`): `m(z, valid, align)`."""
Scale = Any
"""A described scale policy instance: `policy.factor(n_valid, align)`."""


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """logits -> probabilities along `axis`: p = mapping(factor(n) * logits).

    A pytree whose leaves are the numeric parameters (temperature, s, bias, n, alpha), so a
    Normalizer can be passed through jit and its parameters learned. Calling it follows
    `jax.nn.softmax`: `norm(logits, axis=-1, where=None)` returns an array of the same shape
    and dtype (half precision is computed in float32).

    Masking: entries with where=False or logit -inf get exactly 0 and zero gradient; a row with
    no valid entry is all zeros with zero gradient; a row holding +inf is uniform over its +inf
    entries (sigmoid, whose entries are independent: 1 on each, 0 elsewhere). n, for scale
    policies and the sigmoid's bias, is the row's number of valid entries.
    """

    mapping: Mapping
    scale: Scale | None = None
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.mapping.name if self.scale is None else f"scaled_{self.mapping.name}")

    @property
    def family(self) -> str:
        """The attention family of the mapping (`attnlab.normalizers.describe`)."""
        return self.mapping.description.family

    @property
    def softmax_type(self) -> bool:
        """Plain softmax after the scale policy (softmax, scaled_softmax, ssmax): the softmax family
        without a sink, what cuDNN and torch SDPA compute; never exactly zero."""
        return self.family == SOFTMAX and getattr(self.mapping, "sink", None) is None

    @property
    def sparse(self) -> bool:
        """Whether the mapping can output exact zeros on valid entries."""
        return self.mapping.description.sparse

    @property
    def normalized(self) -> bool:
        """Whether each row of valid entries sums to 1 (not so for softmax1, sigmoid, softpick)."""
        return self.mapping.description.normalized

    @property
    def shift_invariant(self) -> bool:
        """Whether adding a constant to a row's logits leaves its output unchanged."""
        # Scale policies multiply a row by one factor: a shift stays a shift.
        return self.mapping.description.shift_invariant

    def __call__(self, logits: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
        logits = jnp.asarray(logits)
        axis = _check_axis(axis, logits.ndim, self.name)
        if logits.size == 0:  # an empty row (or no rows): nothing to normalise, as jax.nn.softmax
            return jnp.zeros(logits.shape, output_dtype(logits.dtype))
        align = partial(_align, shape=logits.shape, axis=axis)
        shift = self.shift_invariant
        z, valid, infinite_row = prepare_rows_with_infinity(logits, axis, where, shift=shift)
        if self.scale is not None:
            n_valid = jnp.sum(valid, axis=-1, keepdims=True).astype(z.dtype)
            z = z * self.scale.factor(n_valid, align).astype(z.dtype)
        p = self.mapping(z, valid, align)
        if not shift:
            # Rows cut to their +inf entries: the limit as those logits grow together.
            limit = valid.astype(p.dtype)
            if self.family != ELEMENTWISE:
                limit = limit / jnp.maximum(jnp.sum(limit, axis=-1, keepdims=True), 1.0)
            p = jnp.where(infinite_row, limit, p)
        return restore_rows(p, axis, logits.dtype)


def _align(value: Any, name: str, *, shape: tuple[int, ...], axis: int) -> jax.Array:
    return align_param(value, name, shape, axis)


def _check_axis(axis: int, ndim: int, name: str) -> int:
    if ndim == 0:
        raise ValueError(f"{name}: logits must have at least one axis; got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis={axis} is out of range for logits with {ndim} axes")
    return axis % ndim


register_pytree_dataclass(Normalizer, data_fields=["mapping", "scale"], meta_fields=["name"])
