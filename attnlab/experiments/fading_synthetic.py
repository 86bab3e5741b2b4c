"""Attention fading on synthetic rows: how the largest weight behaves as the row grows.

For each normalizer and each length n, two inputs:
  (a) "peak": the SSMax paper's Figure 1 row, one logit `peak_logit` and n - 1 at `rest_logit`;
  (b) "gaussian": rows of i.i.d. N(0, sigma^2) logits for each sigma, `seeds` rows per sigma,
      the same rows for every normalizer (drawn from fold_in(seed, n)).
Measured per row and averaged over seeds: the max weight, the entropy (nats), the support size
(exact non-zeros) and the effective support 1 / sum p^2. Softmax-type normalizers also get
the closed-form max weight of :mod:`attnlab.experiments.theory` as `max_weight_theory`.

And the SSMax paper's Figure 3 input, (c) "required_gap": on the row [g, 0, ..., 0] of length n,
the smallest g at which the top weight reaches `target_weight` (0.5), found by bisection on the
normalizer itself (the top weight rises with g for every normalizer here). Softmax-type
normalizers also get the closed form g* = log((n - 1) w / (1 - w)) / factor as
`required_gap_theory` (factor = 1 for softmax, s log n + bias for SSMax).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.experiments import theory
from attnlab.experiments.checks import at_least, between, check, distinct, each, finite, nonempty, positive, setting
from attnlab.experiments.config import Lengths
from attnlab.experiments.kind import Kind
from attnlab.normalizers import Normalizer, NormalizerSpec, stats


@dataclasses.dataclass(frozen=True)
class Config:
    """Sweep of row length n for each normalizer."""

    normalizers: tuple[NormalizerSpec, ...] = (
        NormalizerSpec("softmax"),
        NormalizerSpec("ssmax"),
        NormalizerSpec("sparsemax"),
        NormalizerSpec("entmax15"),
    )
    lengths: Lengths = dataclasses.field(default_factory=lambda: Lengths((10, 100, 1_000, 10_000, 100_000, 1_000_000)))
    peak_logit: float = setting(3.0, finite)
    rest_logit: float = setting(-2.0, finite)
    sigmas: tuple[float, ...] = setting((0.5, 1.0, 2.0), nonempty, each(positive), distinct)
    seeds: int = setting(8, at_least(1))
    seed: int = setting(0, at_least(0))
    target_weight: float = setting(0.5, between(0, 1, "()"))

    def relations(self) -> Iterator[str]:
        if self.peak_logit <= self.rest_logit:
            yield "{peak_logit} must be above {rest_logit}"

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """One sweep point per (normalizer, n), in the order they run."""
    return [{"normalizer": spec.label, "n": n} for spec in config.normalizers for n in config.lengths.values]


@jax.jit
def _row_stats(normalizer: Normalizer, logits: jax.Array) -> dict[str, jax.Array]:
    p = normalizer(logits)
    return {
        "max_weight": stats.max_weight(p),
        "entropy": stats.entropy(p),
        "support_size": stats.support_size(p).astype(jnp.float32),
        "effective_support": stats.effective_support(p),
    }


@functools.partial(jax.jit, static_argnums=2)
def _top_weight(normalizer: Normalizer, gap: jax.Array, n: int) -> jax.Array:
    return normalizer(jnp.zeros((n,), jnp.float32).at[0].set(gap))[0]


def required_gap(normalizer: Normalizer, n: int, target: float, *, iterations: int = 40) -> float | None:
    """The smallest g with top weight >= target on [g, 0, ..., 0] (length n), to about 1e-10
    relative (bisection after doubling); None if even g = 1e6 does not reach it."""
    low, high = 0.0, 1.0
    while float(_top_weight(normalizer, jnp.float32(high), n)) < target:
        low, high = high, 2.0 * high
        if high > 1e6:
            return None
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if float(_top_weight(normalizer, jnp.float32(middle), n)) >= target:
            high = middle
        else:
            low = middle
    return high


def _scale_factor(normalizer: Normalizer, n: int) -> float:
    if normalizer.scale is None:
        return 1.0
    factor = normalizer.scale.factor(jnp.full((1,), float(n)), lambda value, name: jnp.asarray(value))
    return float(np.asarray(factor).reshape(-1)[0])


def run_point(config: Config, point: dict[str, Any]) -> list[dict[str, Any]]:
    spec = next(s for s in config.normalizers if s.label == point["normalizer"])
    normalizer = spec.build()
    n = int(point["n"])
    softmax_type = normalizer.softmax_type
    factor = _scale_factor(normalizer, n) if softmax_type else math.nan
    records = []

    peak_row = jnp.full((n,), config.rest_logit, jnp.float32).at[0].set(config.peak_logit)
    peak = {k: float(v) for k, v in _row_stats(normalizer, peak_row).items()}
    gap = config.peak_logit - config.rest_logit
    records.append(
        {
            "input": "peak",
            "sigma": None,
            **peak,
            "max_weight_std": 0.0,
            "max_weight_theory": theory.peak_max_weight(n, gap, factor) if softmax_type else None,
        }
    )

    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), n)
    sigmas = jnp.asarray(config.sigmas, jnp.float32)
    rows = sigmas[:, None, None] * jax.random.normal(key, (config.seeds, n), jnp.float32)
    measured = {k: np.asarray(v, np.float64) for k, v in _row_stats(normalizer, rows).items()}
    for i, sigma in enumerate(config.sigmas):
        prediction = theory.gaussian_softmax_max_weight(n, sigma * factor) if softmax_type else None
        records.append(
            {
                "input": "gaussian",
                "sigma": sigma,
                **{k: float(v[i].mean()) for k, v in measured.items()},
                "max_weight_std": float(measured["max_weight"][i].std()),
                "max_weight_theory": prediction,
            }
        )

    target = config.target_weight
    records.append(
        {
            "input": "required_gap",
            "sigma": None,
            "target_weight": target,
            "required_gap": required_gap(normalizer, n, target),
            "required_gap_theory": theory.required_gap(n, target, factor) if softmax_type else None,
        }
    )
    return records


KIND = Kind(
    name="fading_synthetic",
    description="max weight, entropy and support vs row length n, on the SSMax Figure 1 row and Gaussian logits",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "lengths": "n"},
    figures="attnlab.figures.fading_synthetic",
)
