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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.normalizers.describe import POSITIVE, RAW, Description, Parameter, described

Align = Callable[[Any, str], jax.Array]


@described(
    Description(
        "temperature",
        "temperature",
        "z / temperature",
        family=None,
        parameters=(Parameter("temperature", 1.0, "divides the logits", minimum=0.0, inclusive=False, learn=POSITIVE),),
    )
)
class Temperature:
    """factor = 1 / temperature, temperature > 0 (scalar or one per row)."""

    temperature: Any = 1.0

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        return 1.0 / align(self.temperature, "temperature")


PAPER_S = 0.43


@described(
    Description(
        "log_n",
        "log-n",
        "(s log n + bias) z, n = valid entries of the row",
        family=None,
        parameters=(
            Parameter(
                "s",
                PAPER_S,
                "scale of log n (paper: 0.43)",
                minimum=0.0,
                inclusive=False,
                learn=RAW,
                learned_by_default=True,
            ),
            Parameter("bias", 0.0, "added to s log n", learn=RAW),
            Parameter("n", None, "the row length used; None: the row's valid entries", minimum=1.0),
        ),
    )
)
class LogN:
    """SSMax scaling (Nakanishi 2025): factor = s * log(n) + bias.

    n is the number of valid entries of each row unless given: under a causal or padding mask
    each query row then uses the keys it can actually see, not the tensor length. n < 1 (an
    empty row) is treated as 1. s > 0 when concrete; s, bias and n may be arrays broadcasting
    against the logits with the normalised axis kept as size 1 (one s per head: [H, 1, 1]).
    """

    s: Any = PAPER_S
    bias: Any = 0.0
    n: Any = None

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        n = n_valid if self.n is None else align(self.n, "n").astype(n_valid.dtype)
        log_n = jnp.log(jnp.maximum(n, 1.0))
        return align(self.s, "s") * log_n + align(self.bias, "bias")
