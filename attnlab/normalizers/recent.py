"""Normalizers proposed since SSMax, as mappings: softmax1, a learned sink, sigmoid, StableMax, softpick,
MultiMax and stick-breaking.

Each acts on prepared rows like the mappings of :mod:`attnlab.normalizers.mappings` (z [..., n],
0 where invalid; valid [..., n] bool), but none is shift invariant, so a `Normalizer` hands them
the logits unshifted (`shift_invariant = False`) and each keeps its own arithmetic safe:

    softmax1   p_i = e^{z_i} / (1 + sum_j e^{z_j})                  (Miller 2023, "off by one")
               rows sum to < 1: a head may attend to nothing.
    sink       p_i = e^{z_i} / (e^b + sum_j e^{z_j}),  b = `sink`    (gpt-oss: one learned logit per head)
               softmax1 is b = 0. Both computed with c = max(b, max z) (c = b on an empty row):
               e^{z_i - c} / (e^{b - c} + sum_j e^{z_j - c}).
    sigmoid    p_i = sigmoid(z_i + b),  b = -log n by default          (Ramapuram et al. 2024)
               n = the row's valid entries (under a causal mask, the keys the query sees);
               not normalised, every entry independent.
    stablemax  p_i = s(z_i) / sum_j s(z_j),  s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0)
               (Prieto et al. 2025): polynomial instead of exponential tails; never exactly 0.
    softpick   p_i = relu(e^{z_i} - 1) / (sum_j |e^{z_j} - 1| + eps)   (Zuhri et al. 2025)
               exact zeros wherever z_i <= 0, rows sum to <= 1 (no attention sink). Computed
               with c = max(0, max z): (e^{z_i - c} - e^{-c})_+ / (sum_j |e^{z_j - c} - e^{-c}| + eps e^{-c}).
    multimax   p = softmax(phi(z)),  phi(x) = x - (slope_low - 1) [b_low - x]_+ + (slope_high - 1) [x - b_high]_+
               (Zhou, Fritz & Keuper 2024, its first-order piecewise-linear form): slope 1 between
               b_low and b_high, slope_low below (> 1 pushes small logits further down: sparser),
               slope_high above (< 1 brings the large ones together: several peaks survive).
    stick-     w_j = beta_j prod_{k > j} (1 - beta_k),  beta = sigmoid(z)   (Tan et al. 2025)
    breaking   over the valid entries in their order along the row: the last entry (for causal
               attention, the nearest key) takes its share of the stick first, each earlier one
               a share of what is left. Computed in log space, log w_j = log sigmoid(z_j)
               + sum_{k > j} log sigmoid(-z_k) (a reverse cumulative sum); rows sum to
               1 - prod_k (1 - beta_k) < 1. Order-dependent, so only whole-row backends run it.

Masking is the library's: masked and -inf entries get exactly 0 and zero gradient; a row with no
valid entry is all zeros; a row holding +inf keeps only its +inf entries (uniform over them, or
1 on each for sigmoid, whose entries are independent). Gradients are plain autodiff of these
closed forms (every branch is computed on safe values, so no inf or NaN leaks through a `where`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.normalizers._rows import concrete_values, row_max
from attnlab.normalizers.describe import ELEMENTWISE, GENERIC, POSITIVE, RAW, SOFTMAX, Description, Parameter, described
from attnlab.normalizers.mappings import softmax_rows

Align = Callable[[Any, str], jax.Array]


def _total(x: jax.Array) -> jax.Array:
    """Row sums [..., 1], with 1 in place of 0 (an empty row stays 0)."""
    total = jnp.sum(x, axis=-1, keepdims=True)
    return jnp.where(total == 0, 1.0, total)


def _nonnegative_shift(z: jax.Array, valid: jax.Array) -> jax.Array:
    """c = max(0, max over valid z) [..., 1], held constant for differentiation."""
    return jax.lax.stop_gradient(jnp.maximum(row_max(z, valid), 0.0))


def sink_softmax_rows(z: jax.Array, valid: jax.Array, sink: Any) -> jax.Array:
    """e^{z_i} / (e^sink + sum_j e^{z_j}) over valid entries; [..., n]. `sink`: a number or [..., 1]
    (softmax1: 0). The shift c = max(sink, max z) (sink on an empty row) keeps the denominator >= 1."""
    m = jnp.where(jnp.any(valid, axis=-1, keepdims=True), row_max(z, valid), sink)
    c = jax.lax.stop_gradient(jnp.maximum(m, sink))
    e = jnp.where(valid, jnp.exp(jnp.where(valid, z - c, 0.0)), 0.0)
    return e / (jnp.exp(sink - c) + jnp.sum(e, axis=-1, keepdims=True))


def default_sigmoid_bias(n: jax.Array) -> jax.Array:
    """Sigmoid attention's default bias -log n for rows of n valid entries (-log 1 = 0 for an empty row)."""
    return -jnp.log(jnp.maximum(n, 1.0))


def sigmoid_rows(z: jax.Array, valid: jax.Array, bias: jax.Array | None) -> jax.Array:
    """sigmoid(z_i + b) on valid entries, b = -log n (n = valid entries of the row) when bias is None."""
    if bias is None:
        bias = default_sigmoid_bias(jnp.sum(valid, axis=-1, keepdims=True).astype(z.dtype))
    return jnp.where(valid, jax.nn.sigmoid(z + bias), 0.0)


def stablemax_rows(z: jax.Array, valid: jax.Array) -> jax.Array:
    """s(z_i) / sum_j s(z_j), s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0."""
    positive = z >= 0
    s = jnp.where(positive, jnp.where(positive, z, 0.0) + 1.0, 1.0 / (1.0 - jnp.where(positive, 0.0, z)))
    s = jnp.where(valid, s, 0.0)
    # Dividing by the row's largest s first keeps the sum finite for logits near float max.
    s = s / jax.lax.stop_gradient(jnp.where(valid, s, 0.0).max(axis=-1, keepdims=True).clip(min=1.0))
    return s / _total(s)


def softpick_rows(z: jax.Array, valid: jax.Array, eps: jax.Array) -> jax.Array:
    """relu(e^{z_i} - 1) / (sum_j |e^{z_j} - 1| + eps) over valid entries (shifted by c = max(0, max z))."""
    c = _nonnegative_shift(z, valid)
    floor = jnp.exp(-c)
    d = jnp.where(valid, jnp.exp(jnp.where(valid, z - c, 0.0)) - floor, 0.0)
    return jnp.maximum(d, 0.0) / (jnp.sum(jnp.abs(d), axis=-1, keepdims=True) + eps * floor)


def stick_breaking_rows(z: jax.Array, valid: jax.Array) -> jax.Array:
    """w_j = sigmoid(z_j) prod_{k > j, k valid} sigmoid(-z_k) on valid entries, in order along the row.

    An invalid entry neither takes weight nor breaks the stick (as if removed from the row).
    """
    log_rest = jnp.where(valid, jax.nn.log_sigmoid(-z), 0.0)  # log(1 - beta_k); 0: no break
    log_w = jnp.where(valid, jax.nn.log_sigmoid(z) + sum_after(log_rest), 0.0)
    return jnp.where(valid, jnp.exp(log_w), 0.0)


# Rows are summed in chunks of this many entries by a matmul with a triangular matrix (sum_after).
SUM_CHUNK = 128


def sum_after(x: jax.Array) -> jax.Array:
    """later_j = sum_{k > j} x_k along the last axis (a reverse cumulative sum, shifted: no
    subtraction, so nothing cancels), float32-exact up to the order of the additions.

    The row goes in chunks of SUM_CHUNK: within a chunk a matmul with a strictly triangular matrix
    (at full float32 precision on every platform), across chunks a short cumulative sum of their
    totals. XLA:CPU writes jax.lax.cumsum as reduce-windows whose combining loop does not
    vectorise the elementwise work fused after it (exp, log): stick-breaking's weights took 90 ms
    for [8, 128, 2048] rows that way, 14-18 ms this way."""
    n = x.shape[-1]
    chunk = min(SUM_CHUNK, n)
    chunks = -(-n // chunk)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, chunks * chunk - n)])
    blocks = padded.reshape(*x.shape[:-1], chunks, chunk)
    strictly_after = jnp.tril(jnp.ones((chunk, chunk), x.dtype), k=-1)  # [k, j] = 1 where k > j
    within = jnp.einsum("...k,kj->...j", blocks, strictly_after, precision=jax.lax.Precision.HIGHEST)
    totals = jnp.sum(blocks, axis=-1)
    shifted = jnp.concatenate([totals[..., 1:], jnp.zeros_like(totals[..., :1])], axis=-1)
    later_chunks = jax.lax.cumsum(shifted, axis=shifted.ndim - 1, reverse=True)
    return (within + later_chunks[..., None]).reshape(*x.shape[:-1], chunks * chunk)[..., :n]


def multimax_modulator(x: jax.Array, b_low: Any, b_high: Any, slope_low: Any, slope_high: Any) -> jax.Array:
    """phi(x) = x - (slope_low - 1) [b_low - x]_+ + (slope_high - 1) [x - b_high]_+ (continuous, piecewise linear)."""
    return x - (slope_low - 1.0) * jnp.maximum(b_low - x, 0.0) + (slope_high - 1.0) * jnp.maximum(x - b_high, 0.0)


# ---------------------------------------------------------------------------------------------
# Mapping objects (see mappings.py), each described once: parameters are pytree leaves.

NOT_SHIFT_INVARIANT = {"shift_invariant": False}


@described(
    Description(
        "softmax1",
        "softmax1 (off-by-one)",
        "exp(z) / (1 + sum exp(z)), off by one: rows sum to < 1",
        family=SOFTMAX,
        normalized=False,
        **NOT_SHIFT_INVARIANT,
    )
)
class Softmax1:
    """exp(z) / (1 + sum exp(z)): softmax with a sink of logit 0 that takes no value (rows sum to < 1)."""

    sink = 0.0

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return sink_softmax_rows(z, valid, 0.0)


@described(
    Description(
        "sink_softmax",
        "softmax + sink",
        "exp(z) / (exp(sink) + sum exp(z)): a sink logit with no value; rows sum to < 1",
        family=SOFTMAX,
        parameters=(Parameter("sink", 0.0, "the sink's logit (softmax1: 0)", learn=RAW, learned_by_default=True),),
        normalized=False,
        **NOT_SHIFT_INVARIANT,
    )
)
class SinkSoftmax:
    """exp(z) / (exp(sink) + sum exp(z)): softmax with a sink logit that takes weight and gives no value.

    gpt-oss learns one sink logit per head (a layer learns it with `learn=("sink",)`, as is,
    shape [N, 1, 1]); softmax1 is the fixed sink 0. A concrete sink (one number for every row)
    runs on the online attention pass; a per-head or learned one runs query-blocked or dense.
    """

    sink: Any = 0.0

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return sink_softmax_rows(z, valid, align(self.sink, "sink").astype(z.dtype))


@described(
    Description(
        "sigmoid",
        "sigmoid (b = -log n)",
        "sigmoid(z + bias), bias = -log n by default (n = valid entries of the row); not normalised",
        family=ELEMENTWISE,
        parameters=(Parameter("bias", None, "added to every logit; None: -log n", learn=RAW),),
        normalized=False,
        **NOT_SHIFT_INVARIANT,
    )
)
class Sigmoid:
    """sigmoid(z + bias), bias = -log n by default (n = the row's valid entries); not normalised."""

    bias: Any = None

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        bias = None if self.bias is None else align(self.bias, "bias").astype(z.dtype)
        return sigmoid_rows(z, valid, bias)


@described(
    Description(
        "stablemax",
        "StableMax",
        "s(z) / sum s(z); s(x) = x + 1 (x >= 0), 1/(1 - x) else",
        family=GENERIC,
        **NOT_SHIFT_INVARIANT,
    )
)
class StableMax:
    """s(z) / sum s(z), s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0) (Prieto et al. 2025)."""

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return stablemax_rows(z, valid)


@described(
    Description(
        "softpick",
        "softpick",
        "relu(exp(z) - 1) / (sum |exp(z) - 1| + eps): exact zeros where z <= 0, rows sum to <= 1",
        family=GENERIC,
        parameters=(Parameter("eps", 1e-6, "keeps the denominator positive", minimum=0.0, inclusive=False),),
        sparse=True,
        normalized=False,
        **NOT_SHIFT_INVARIANT,
    )
)
class Softpick:
    """relu(e^z - 1) / (sum |e^z - 1| + eps) (Zuhri et al. 2025): exact zeros where z <= 0, rows sum to <= 1."""

    eps: Any = 1e-6

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return softpick_rows(z, valid, align(self.eps, "eps").astype(z.dtype))


def _slope(name: str, default: float, where: str) -> Parameter:
    return Parameter(name, default, f"slope of phi {where}", minimum=0.0, inclusive=False, learn=POSITIVE)


@described(
    Description(
        "multimax",
        "MultiMax",
        "softmax(phi(z)), phi piecewise linear: slope_low below b_low, 1 between, slope_high above b_high",
        family=GENERIC,
        parameters=(
            Parameter("b_low", 0.0, "lower bend of phi", learn=RAW),
            Parameter("b_high", 1.0, "upper bend of phi", learn=RAW),
            _slope("slope_low", 2.0, "below b_low"),
            _slope("slope_high", 0.5, "above b_high"),
        ),
        **NOT_SHIFT_INVARIANT,
    )
)
class MultiMax:
    """softmax(phi(z)) with the piecewise-linear modulator phi of `multimax_modulator` (Zhou et al. 2024).

    Defaults (our choice; the paper learns them per layer): b_low = 0, b_high = 1, slope_low = 2,
    slope_high = 0.5. slope_low = slope_high = 1 is softmax. Slopes must be > 0 (phi monotone),
    and b_low <= b_high when both are Python numbers (learned ones are not checked).
    """

    b_low: Any = 0.0
    b_high: Any = 1.0
    slope_low: Any = 2.0
    slope_high: Any = 0.5

    def validate(self) -> None:
        low, high = concrete_values(self.b_low), concrete_values(self.b_high)
        numbers = all(isinstance(v, (int, float)) for v in (self.b_low, self.b_high))
        if numbers and low is not None and high is not None and low > high:
            raise ValueError(f"multimax: b_low={self.b_low} must be <= b_high={self.b_high}")

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        params = [align(getattr(self, f), f).astype(z.dtype) for f in ("b_low", "b_high", "slope_low", "slope_high")]
        return softmax_rows(jnp.where(valid, multimax_modulator(z, *params), 0.0), valid)


@described(
    Description(
        "stick_breaking",
        "stick-breaking",
        "beta_j prod_{k > j} (1 - beta_k), beta = sigmoid(z), in row order; rows sum to < 1",
        family=GENERIC,
        normalized=False,
        **NOT_SHIFT_INVARIANT,
    )
)
class StickBreaking:
    """Stick-breaking attention (Tan et al., "Scaling Stick-Breaking Attention", ICLR 2025):
    w_ij = beta_ij prod_{j < k <= i} (1 - beta_ik), beta_ij = sigmoid(z_ij).

    Over each row's valid entries in their order along the normalised axis (keys in key order):
    the last valid key, for causal attention the nearest, breaks off its share first. Not
    normalised: the rest of the stick, prod_k (1 - beta_k), goes to no key. Hidden keys are
    skipped exactly (they neither take weight nor break the stick), so a row with masked keys
    equals the row with them removed. The published model also hides the diagonal (j < i) and
    needs no positional encoding; which keys a query sees is the attention mask's choice here.
    No parameters; a row depends on the order of its keys, so attention runs it on whole rows
    (dense, or query-blocked in memory linear in the sequence).
    """

    def __call__(self, z: jax.Array, valid: jax.Array, align: Align) -> jax.Array:
        return stick_breaking_rows(z, valid)


RECENT_MAPPINGS = (Softmax1, SinkSoftmax, Sigmoid, StableMax, Softpick, MultiMax, StickBreaking)
