"""Scale policies: the logit rescaling that runs before a mapping.

A policy turns the number of valid entries of each row, n [..., 1], into a positive factor
[..., 1] that multiplies the row's logits. Keeping it apart from the mapping is what makes
temperature-scaled softmax, SSMax and log-n-scaled entmax the same few lines:

    scaled_softmax = Softmax  after Temperature(T):  factor = 1 / T
    ssmax          = Softmax  after LogN(s, b):      factor = s * log(n) + b
    logn_entmax15  = Entmax15 after LogN(s, b)

Because the factor depends only on the row (for attention: on the query), attention can fold
it into the queries and run any kernel unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.normalizers._rows import check_param, register_pytree_dataclass

Align = Callable[[Any, str], jax.Array]


@dataclasses.dataclass(frozen=True)
class Temperature:
    """factor = 1 / temperature, temperature > 0 (scalar or one per row)."""

    temperature: Any = 1.0

    def __post_init__(self):
        check_param("temperature", self.temperature, minimum=0.0, inclusive=False, where="temperature scaling")

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        return 1.0 / align(self.temperature, "temperature")


@dataclasses.dataclass(frozen=True)
class LogN:
    """SSMax scaling (Nakanishi 2025): factor = s * log(n) + bias.

    n is the number of valid entries of each row unless given: under a causal or padding mask
    each query row then uses the keys it can actually see, not the tensor length. n < 1 (an
    empty row) is treated as 1. s > 0 when concrete; s, bias and n may be arrays broadcasting
    against the logits with the normalised axis kept as size 1 (one s per head: [H, 1, 1]).
    """

    s: Any = 0.43
    bias: Any = 0.0
    n: Any = None

    def __post_init__(self):
        check_param("s", self.s, minimum=0.0, inclusive=False, where="log-n (SSMax) scaling")
        if self.n is not None:
            check_param("n", self.n, minimum=1.0, inclusive=True, where="log-n (SSMax) scaling")

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        n = n_valid if self.n is None else align(self.n, "n").astype(n_valid.dtype)
        log_n = jnp.log(jnp.maximum(n, 1.0))
        return align(self.s, "s") * log_n + align(self.bias, "bias")


register_pytree_dataclass(Temperature, data_fields=["temperature"], meta_fields=[])
register_pytree_dataclass(LogN, data_fields=["s", "bias", "n"], meta_fields=[])
