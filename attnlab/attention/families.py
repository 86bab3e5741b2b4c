"""What attention reads from a normalizer: its family and the one attribute that family carries.

A normalizer describes itself (`attnlab.normalizers.describe`): its mapping's `description.family`
says which algorithm can run it without calling it on whole rows, and the family's attribute
gives the number that algorithm needs:

    SOFTMAX      p = exp(z) / (exp(sink) + sum exp(z)),   `mapping.sink` (None: no sink)
    THRESHOLD    alpha-entmax,                            `mapping.alpha` (a float or an array)
    ELEMENTWISE  p = sigmoid(z + bias),                   `mapping.bias` (None: -log n)
    GENERIC      anything else (and any callable that is not a `Normalizer`)

Backends decide from these alone, never from a mapping's class or name, so a normalizer
registered from outside the package runs on every backend its family allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from attnlab.normalizers import ELEMENTWISE, GENERIC, SOFTMAX, THRESHOLD, Normalizer
from attnlab.normalizers._rows import concrete_values
from attnlab.normalizers.mappings import softmax_band

# The parameter through which each family's mapping tells attention what it needs.
FAMILY_ATTRIBUTE = {SOFTMAX: "sink", THRESHOLD: "alpha", ELEMENTWISE: "bias"}


def family(normalizer: Callable) -> str:
    """The attention family of `normalizer`: GENERIC for a callable that is not a `Normalizer`."""
    return normalizer.family if isinstance(normalizer, Normalizer) else GENERIC


def name(normalizer: Callable) -> str:
    """How errors name `normalizer`."""
    return getattr(normalizer, "name", None) or getattr(normalizer, "__name__", type(normalizer).__name__)


def static_value(value: Any) -> float | None:
    """One concrete number: a Python number, or a concrete array whose entries are all equal; else None
    (a traced value, or one that differs per head or row)."""
    values = concrete_values(value)
    if values is None or values.size == 0 or not (values == values.flat[0]).all():
        return None
    return float(values.flat[0])


def static_alpha(normalizer: Callable) -> float | None:
    """alpha of a THRESHOLD-family normalizer when it is one concrete number (any value), else None."""
    if family(normalizer) != THRESHOLD:
        return None
    return static_value(normalizer.mapping.alpha)


def softmax_like(alpha: float) -> bool:
    """Whether alpha-entmax at this alpha is evaluated as softmax (alpha below 1 + softmax_band in
    float32, the logits' dtype here), as `attnlab.normalizers.mappings.entmax_rows` does."""
    return alpha < 1.0 + softmax_band(jnp.float32)


def static_entmax_alpha(normalizer: Callable) -> float | None:
    """alpha in (1, 2] when `normalizer` is of the THRESHOLD family with one concrete alpha there.

    Those run on the blocked entmax backend (attention.sparse_blocked) and the Pallas kernel; a
    traced or per-head alpha, alpha > 2 or alpha near 1 (softmax, see `softmax_like`) do not.
    """
    alpha = static_alpha(normalizer)
    return alpha if alpha is not None and not softmax_like(alpha) and alpha <= 2.0 else None


def online_kind(normalizer: Callable) -> tuple[str, Any] | None:
    """How the key-blocked online pass (attention.online_softmax) runs `normalizer`, or None when it cannot.

    ("softmax", sink): the SOFTMAX family, sink None (no sink), a float (one concrete sink logit,
    which the pass starts from) or the mapping's own array (traced, learned or one per head, which
    the pass applies after it), and the THRESHOLD family at a concrete alpha near 1 (softmax there,
    `softmax_like`); ("elementwise", None): the ELEMENTWISE family (its bias joins the attention bias).
    """
    kind = family(normalizer)
    if kind == SOFTMAX:
        sink = getattr(normalizer.mapping, "sink", None)
        if sink is None:
            return "softmax", None
        value = static_value(sink)
        return "softmax", (sink if value is None else value)
    if kind == THRESHOLD:
        alpha = static_alpha(normalizer)
        return ("softmax", None) if alpha is not None and softmax_like(alpha) else None
    if kind == ELEMENTWISE:
        return "elementwise", None
    return None


def has_only_family_parameters(normalizer: Callable) -> bool:
    """Whether the mapping's parameters are at most its family's attribute (so the family's
    closed-form Jacobian, with that attribute's derivative, is the mapping's whole derivative)."""
    kind = family(normalizer)
    if kind not in FAMILY_ATTRIBUTE:
        return False
    described = {p.name for p in normalizer.mapping.description.parameters}
    return described <= {FAMILY_ATTRIBUTE[kind]}


def describe_family(normalizer: Callable) -> str:
    """ "normalizer 'x' (family 'y')", for error messages."""
    return f"normalizer {name(normalizer)!r} (family {family(normalizer)!r})"
