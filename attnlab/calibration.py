"""Calibration of a classifier's probabilities: temperature scaling and expected calibration error.

Temperature scaling (Guo et al. 2017) divides the logits by one T > 0 fitted on held-out data by
minimising the negative log-likelihood. With the inverse temperature beta = 1 / T,

    NLL(beta) = mean_i [ logsumexp(beta z_i) - beta z_i[y_i] ]

is convex in beta, with NLL'(beta) = mean_i (E_{p_i}[z_i] - z_i[y_i]) and
NLL''(beta) = mean_i Var_{p_i}[z_i] >= 0, where p_i = softmax(beta z_i). `fit_temperature`
runs safeguarded Newton on beta with these exact derivatives, so the fit is exact to float
precision in a handful of steps and needs no learning rate.

Expected calibration error, for confidences c_i = max_k p_i[k] and correctness a_i = 1[argmax = y_i]
split into bins B_1..B_M:

    ECE = sum_m |B_m| / N * | mean_{i in B_m} a_i - mean_{i in B_m} c_i |

with equal-width bins over [0, 1] (`scheme="width"`, the usual one) or equal-mass bins holding
N / M examples each by rank of confidence (`scheme="mass"`, less sensitive to empty bins).
`reliability_bins` gives the per-bin numbers a reliability diagram draws.

Sparse outputs. A model trained with a Fenchel-Young loss predicts p = entmax_alpha(z) (sparsemax
for alpha = 2), which gives exact zeros: its NLL is +inf as soon as one target gets probability 0.
For such an output `fit_temperature(..., output=...)` minimises the output's own Fenchel-Young loss
L(beta z; y) instead. That loss is also convex in beta and proper (its expected value is minimised
by predicting the true distribution), with the same first derivative, mean(E_p[z] - z_y), and
second derivative mean(z^T J z) = mean(sum_j s_j z_j^2 - (sum_j s_j z_j)^2 / sum_j s_j), where
s = p^(2 - alpha) on the support (the mapping's Jacobian; s = p gives softmax's variance). `scores`
reports, besides the NLL, finite numbers that stay meaningful with exact zeros: the fraction of
targets given probability 0, the NLL over the other targets, and the Brier score.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attnlab.losses import OutputNormalizer, fenchel_young_loss
from attnlab.normalizers import entmax

SCHEMES = ("width", "mass")
_SEPARABLE = (
    "fit_temperature: the NLL keeps falling as T -> 0 (every held-out example is classified right with "
    "a margin); temperature scaling has no finite optimum on them"
)


def _check(logits: ArrayLike, labels: ArrayLike, where: str) -> tuple[jax.Array, jax.Array]:
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"{where}: logits must be [examples, classes]; got shape {logits.shape}")
    if labels.shape != logits.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"{where}: labels must be integers of shape [{logits.shape[0]}]; got {labels.dtype}{labels.shape}"
        )
    if logits.shape[0] == 0:
        raise ValueError(f"{where}: no examples")
    return logits, labels


@jax.jit
def _nll_and_derivatives(beta: jax.Array, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    scaled = beta * logits
    log_z = jax.nn.logsumexp(scaled, axis=-1)
    p = jnp.exp(scaled - log_z[:, None])
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    mean = jnp.sum(p * logits, axis=-1)
    variance = jnp.sum(p * (logits - mean[:, None]) ** 2, axis=-1)
    return jnp.mean(log_z - beta * target), jnp.mean(mean - target), jnp.mean(variance)


@partial(jax.jit, static_argnums=3)
def _fy_and_derivatives(beta: jax.Array, logits: jax.Array, labels: jax.Array, alpha: float) -> tuple[jax.Array, ...]:
    """The output's Fenchel-Young loss at beta z, and its first two derivatives in beta (see the module docstring)."""
    scaled = beta * logits
    loss = fenchel_young_loss(scaled, labels, mapping="entmax", alpha=alpha)
    p = entmax(scaled, alpha=alpha)
    s = jnp.where(p > 0, p ** (2.0 - alpha), 0.0)
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    mean = jnp.sum(p * logits, axis=-1)
    s_total = jnp.sum(s, axis=-1)
    curvature = jnp.sum(s * logits**2, axis=-1) - jnp.sum(s * logits, axis=-1) ** 2 / s_total
    return jnp.mean(loss), jnp.mean(mean - target), jnp.mean(curvature)


def _objective(output: OutputNormalizer) -> Any:
    """beta -> (value, slope, curvature) of the loss temperature scaling minimises for `output`."""
    if not output.sparse:
        return _nll_and_derivatives
    return lambda beta, logits, labels: _fy_and_derivatives(beta, logits, labels, output.entropy_alpha)


def nll(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of softmax(logits / temperature) on integer labels."""
    logits, labels = _check(logits, labels, "nll")
    if not temperature > 0:
        raise ValueError(f"nll: temperature must be > 0; got {temperature!r}")
    return float(_nll_and_derivatives(jnp.float32(1.0 / temperature), logits, labels)[0])


def fit_temperature(
    logits: ArrayLike, labels: ArrayLike, *, output: Any = "softmax", max_iter: int = 50, tol: float = 1e-7
) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (logits [N, K], labels [N]); for a
    sparse `output` (an `attnlab.losses.OutputNormalizer` or a mapping name: "sparsemax",
    "entmax15", or {"mapping": "entmax", "alpha": a}), the T minimising its Fenchel-Young loss
    at logits / T (its NLL may be infinite; see the module docstring).

    Newton on beta = 1 / T (convex), halving any step that would leave beta <= 0 or raise the
    loss; stops when the step is below tol * beta. If the loss keeps falling as beta -> infinity
    (every example already classified right with a margin), there is no optimum: ValueError.
    """
    logits, labels = _check(logits, labels, "fit_temperature")
    objective = _objective(OutputNormalizer.parse(output, "fit_temperature: output"))
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    if bool(jnp.all(target[:, 0] > jnp.max(others, axis=-1))):
        # Every label is its row's strict maximum: NLL'(beta) < 0 for every beta, no minimum.
        raise ValueError(_SEPARABLE)
    beta = jnp.float32(1.0)
    value, slope, curvature = objective(beta, logits, labels)
    for _ in range(max_iter):
        step = -slope / jnp.maximum(curvature, 1e-12)
        while True:
            candidate = beta + step
            if candidate > 0:
                new_value, new_slope, new_curvature = objective(candidate, logits, labels)
                if new_value <= value + 1e-7 * abs(float(value)):
                    break
            step = step / 2
            if abs(float(step)) < tol * float(beta):
                return float(1.0 / beta)
        beta, value, slope, curvature = candidate, new_value, new_slope, new_curvature
        if float(beta) > 1e6:
            raise ValueError(_SEPARABLE)
        if abs(float(step)) < tol * float(beta):
            break
    return float(1.0 / beta)


@dataclasses.dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin numbers of a reliability diagram: edges [M + 1] (for mass bins, the confidence
    quantiles), count [M], confidence [M] (mean max probability), accuracy [M] (fraction right);
    empty bins have NaN confidence and accuracy."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """sum_m |B_m| / N |accuracy_m - confidence_m| over the non-empty bins."""
        full = self.count > 0
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float(np.sum(self.count[full] * gaps) / np.sum(self.count))


def reliability_bins(probs: Any, labels: ArrayLike, *, bins: int = 15, scheme: str = "width") -> ReliabilityBins:
    """Bin the examples of probs [N, K] (rows on the simplex) by confidence c: equal-width bin m holds
    e_m < c <= e_{m+1} (the first also c = 0); equal-mass bins split the examples sorted by c into M
    runs of N // M or N // M + 1. See the module docstring."""
    if scheme not in SCHEMES:
        raise ValueError(f"reliability_bins: scheme={scheme!r}; accepted: {', '.join(SCHEMES)}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"reliability_bins: bins must be an integer >= 1; got {bins!r}")
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    _check(probs, labels, "reliability_bins")
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    if scheme == "width":
        edges = np.linspace(0.0, 1.0, bins + 1)
        index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    else:
        order = np.argsort(confidence, kind="stable")
        index = np.empty(len(confidence), dtype=int)
        index[order] = np.arange(len(confidence)) * bins // len(confidence)
        edges = np.concatenate([[0.0], [confidence[index == m].max() for m in range(bins) if np.any(index == m)]])
        if len(edges) != bins + 1:  # fewer examples than bins: pad with the last edge
            edges = np.concatenate([edges, np.full(bins + 1 - len(edges), edges[-1])])
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return ReliabilityBins(edges, count.astype(int), mean_confidence, accuracy)


def expected_calibration_error(probs: Any, labels: ArrayLike, *, bins: int = 15, scheme: str = "width") -> float:
    """ECE of probs [N, K] against labels [N] with `bins` equal-width or equal-mass bins."""
    return reliability_bins(probs, labels, bins=bins, scheme=scheme).ece


def scores(probs: Any, labels: ArrayLike, *, bins: int = 15) -> dict[str, float]:
    """The calibration report of probs [N, K] (rows on the simplex, exact zeros allowed) against labels [N]:

    accuracy: fraction whose argmax is the label;
    nll: mean -log p[y] (nats; +inf when any target has probability 0);
    zero_target_fraction: fraction of targets given probability exactly 0;
    nll_nonzero: mean -log p[y] over the other examples (NaN if there are none);
    brier: mean sum_k (p_k - 1[k = y])^2, in [0, 2], finite with exact zeros;
    confidence: mean max_k p_k;  support: mean number of classes with p_k > 0;
    ece_width, ece_mass: the ECE with `bins` equal-width and equal-mass bins.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    _check(probs, labels, "scores")
    target = np.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    zero = target <= 0
    with np.errstate(divide="ignore"):
        log_target = np.log(target)
    brier = np.sum(probs**2, axis=-1) - 2 * target + 1
    return {
        "accuracy": float(np.mean(probs.argmax(axis=-1) == labels)),
        "nll": float(-np.mean(log_target)),
        "zero_target_fraction": float(np.mean(zero)),
        "nll_nonzero": float(-np.mean(log_target[~zero])) if np.any(~zero) else float("nan"),
        "brier": float(np.mean(brier)),
        "confidence": float(np.mean(probs.max(axis=-1))),
        "support": float(np.mean(np.sum(probs > 0, axis=-1))),
        "ece_width": expected_calibration_error(probs, labels, bins=bins, scheme="width"),
        "ece_mass": expected_calibration_error(probs, labels, bins=bins, scheme="mass"),
    }
