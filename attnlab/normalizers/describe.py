"""How a mapping and a scale policy describe themselves, once.

A normalizer is a mapping (softmax, sparsemax, alpha-entmax, ...) applied to logits that a scale
policy (a temperature, SSMax's s log n, ...) may first rescale. Each mapping class and each scale
policy class carries one :class:`Description`: its name, display label, one line of math, the
attention family that can run it, and its :class:`Parameter` s (default, accepted range, and
the :class:`Learn` parametrisation a layer uses to learn it). Everything above reads it:

    registry (names, `get`, `parameters`, `summary`)   attnlab.normalizers.registry
    spec (what a layer learns, its start values)        attnlab.normalizers.spec
    losses (the entmax alpha of an output mapping)      attnlab.losses
    attention backends (which one serves a call)        attnlab.attention
    configs, `attnlab list`, figure labels and colours

so a new normalizer is one described class plus its math, registered with
:func:`attnlab.normalizers.register`, with no edit elsewhere.

Families (`Description.family`): what an attention backend needs to know to run a mapping without
calling it on whole rows, and the attribute through which the mapping tells it.

    SOFTMAX      p_i = exp(z_i) / (exp(sink) + sum_j exp(z_j)); `mapping.sink` is None (softmax)
                 or a logit (softmax1: 0). Runs key block by key block (the online pass).
    THRESHOLD    alpha-entmax, p_i = [(alpha - 1) z_i - tau]_+^(1 / (alpha - 1)) with the exact
                 threshold tau; `mapping.alpha` (a number, or an array when learned).
    ELEMENTWISE  p_i = sigmoid(z_i + b), no normalisation; `mapping.bias` (None: b = -log n).
    GENERIC      anything else: backends call the mapping on whole rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.normalizers._rows import check_finite, check_param, register_pytree_dataclass

SOFTMAX = "softmax"
THRESHOLD = "threshold"
ELEMENTWISE = "elementwise"
GENERIC = "generic"
FAMILIES = (SOFTMAX, THRESHOLD, ELEMENTWISE, GENERIC)

ALPHA_MIN, ALPHA_MAX = 1.01, 2.0


@dataclasses.dataclass(frozen=True)
class Learn:
    """How a layer learns a parameter: it stores w and uses value = to_value(w).

    Fields:
      formula: the parametrisation in words, e.g. "exp(w)".
      to_value: w (array) -> the parameter's value.
      from_value: a start value (number) -> w.
      stored: the stored parameter's name from the parameter's name, e.g. "log_{}".
      start_range: (low, high) the start value must lie in, both inclusive; None: any finite number.
    """

    formula: str
    to_value: Callable[[jax.Array], jax.Array]
    from_value: Callable[[float], float]
    stored: str = "{}"
    start_range: tuple[float, float] | None = None

    def stored_name(self, parameter: str) -> str:
        return self.stored.format(parameter)


def alpha_from_logit(w: Any) -> jax.Array:
    """alpha = clip(1 + sigmoid(w), 1.01, 2): entmax's alpha, never below 1.01 nor above 2."""
    return jnp.clip(1.0 + jax.nn.sigmoid(jnp.asarray(w)), ALPHA_MIN, ALPHA_MAX)


def alpha_to_logit(alpha: float) -> float:
    """The w with 1 + sigmoid(w) = alpha, for 1 < alpha < 2."""
    return math.log((alpha - 1.0) / (2.0 - alpha))


RAW = Learn("w", lambda w: w, float)
"""The value itself is learned (SSMax's s, as in the paper; an additive bias)."""

POSITIVE = Learn("exp(w)", jnp.exp, math.log, stored="log_{}", start_range=(1e-30, math.inf))
"""A positive value learned as its log (a temperature, a slope)."""

ALPHA = Learn(
    "clip(1 + sigmoid(w), 1.01, 2)",
    alpha_from_logit,
    alpha_to_logit,
    stored="{}_logit",
    start_range=(ALPHA_MIN, 2.0 - 1e-6),
)
"""entmax's alpha, kept inside [1.01, 2] whatever the optimiser does (entmax issue #39: an
unconstrained alpha drifts below 1)."""


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One parameter of a mapping or a scale policy.

    Fields:
      name: the keyword a user passes (`get("entmax", alpha=1.3)`).
      default: its value when not given (None: a rule of the mapping, e.g. sigmoid's -log n).
      summary: what it is, in a few words.
      minimum, inclusive: the accepted range when concrete (None: any finite number).
      learn: how a layer learns it (None: it cannot be learned).
      learned_by_default: a layer given only the normalizer's name learns it (SSMax's s).
    """

    name: str
    default: Any
    summary: str
    minimum: float | None = None
    inclusive: bool = True
    learn: Learn | None = None
    learned_by_default: bool = False

    def accepted(self) -> str:
        if self.minimum is None:
            return "a finite number"
        return f"a finite number {'>=' if self.inclusive else '>'} {self.minimum:g}"

    def check(self, value: Any, where: str) -> None:
        """Raise ValueError (naming `where`, the parameter and the range) unless every concrete entry of
        `value` is finite and in range; None and traced values pass."""
        if self.minimum is None:
            check_finite(self.name, value, where=where)
        else:
            check_param(self.name, value, minimum=self.minimum, inclusive=self.inclusive, where=where)


@dataclasses.dataclass(frozen=True)
class Description:
    """What a mapping or a scale policy is, for everything that is derived from it.

    Fields:
      name: its registry-style name ("entmax", "log_n").
      label: how figures and tables show it ("α-entmax").
      summary: one line of math.
      family: for mappings, the attention family that runs it (see the module docstring); None for
        a scale policy.
      parameters: its parameters, in order (the dataclass fields of the class).
      sparse: can output exact zeros on valid entries.
      normalized: each row of valid entries sums to 1.
      shift_invariant: adding a constant to a row leaves the output unchanged.
    """

    name: str
    label: str
    summary: str
    family: str | None = GENERIC
    parameters: tuple[Parameter, ...] = ()
    sparse: bool = False
    normalized: bool = True
    shift_invariant: bool = True

    def __post_init__(self):
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(
                f"Description {self.name!r}: family={self.family!r}; accepted: None (a scale policy), "
                + ", ".join(FAMILIES)
            )
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"Description {self.name!r}: parameter names repeat: {names}")

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


def described(description: Description) -> Callable[[type], type]:
    """Class decorator: make `cls` a frozen dataclass carrying `description`, whose fields are its
    parameters (pytree leaves, so they can be traced and learned), checked at construction.

    The class declares its parameters as annotated fields with defaults, in the order of
    `description.parameters`, and may define `validate(self)` for checks that involve several
    parameters; it defines `__call__(self, z, valid, align)` (a mapping) or
    `factor(self, n_valid, align)` (a scale policy).
    """

    def wrap(cls: type) -> type:
        def __post_init__(self):
            for p in description.parameters:
                p.check(getattr(self, p.name), where=description.name)
            validate = getattr(type(self), "validate", None)
            if validate is not None:
                validate(self)

        cls.__post_init__ = __post_init__
        cls.description = description
        cls.name = description.name
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        declared = [p.name for p in description.parameters]
        if fields != declared:
            raise TypeError(f"{cls.__name__}: dataclass fields {fields} must be the described parameters {declared}")
        return register_pytree_dataclass(cls, data_fields=fields, meta_fields=[])

    return wrap
