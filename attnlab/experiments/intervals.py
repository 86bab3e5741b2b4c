"""Confidence intervals over seeds, and paired comparisons, for the trained-model kinds.

A metric measured once per seed (s = 1..n) is reported as its mean and a 95% interval:

    t interval          mean +- t_{n-1, 0.975} * sd / sqrt(n)       (Student t, sd with n - 1)
    bootstrap interval  the 2.5% and 97.5% quantiles of the means of `resamples` resamples of the n
                        values with replacement (percentile bootstrap, seeded)

The t interval is the default: with 3 seeds a bootstrap has only 10 distinct resamples and its
interval is too narrow. A paired comparison of A against B on the same seeds (same data order and,
where the shapes agree, the same initialisation) is the t interval of the differences a_s - b_s;
it is `significant` when it excludes 0. With one seed there is no interval (low = high = None).

An outcome that is a count (the seeds whose model solved a task, k of n) has the exact
Clopper-Pearson interval of its proportion: the alpha/2 quantile of Beta(k, n - k + 1) to the
1 - alpha/2 quantile of Beta(k + 1, n - k) (0 when k = 0, 1 when k = n). Two counts are compared by
Fisher's exact test (two-sided: the probability, given the margins, of every table no more likely
than the observed one); with n seeds each, even n of n against 0 of n has p = 2 / C(2n, n), which
is 0.1 at n = 3: a count separates two maps at the 5% level only from 4 seeds up.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from jax.scipy.special import betainc

LEVEL = 0.95
METHODS = ("t", "bootstrap")


@dataclasses.dataclass(frozen=True)
class Interval:
    """mean and [low, high] of `n` values at confidence `level` by `method`; low and high are None for n < 2."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float = LEVEL
    method: str = "t"

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (for a difference: A and B differ at this level)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "significant": self.significant}


def _values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name}: no values to summarise")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: values must be finite; got {array.tolist()}")
    return array


@functools.cache
def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (probability in (0.5, 1)),
    by bisection on its CDF, 1 - I_{df / (df + x^2)}(df / 2, 1 / 2) / 2 (remembered: a summary asks
    for the same few quantiles many times, and each costs about 60 evaluations of the CDF)."""
    if not 0.5 < probability < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < probability < 1 and df >= 1; got {probability}, {df}")

    def cdf(x: float) -> float:
        return 1.0 - 0.5 * float(betainc(df / 2.0, 0.5, df / (df + x * x)))

    high = 1.0
    while cdf(high) < probability:
        high *= 2.0
    return _invert(cdf, probability, 0.0, high)


def _invert(cdf, probability: float, low: float, high: float) -> float:
    """x in [low, high] with cdf(x) = probability, for an increasing cdf, by 60 bisections."""
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return 0.5 * (low + high)


def beta_quantile(probability: float, a: float, b: float) -> float:
    """The `probability` quantile of Beta(a, b) (a, b > 0), by bisection on its CDF I_x(a, b)."""
    if not 0.0 < probability < 1.0 or a <= 0 or b <= 0:
        raise ValueError(f"beta_quantile needs 0 < probability < 1 and a, b > 0; got {probability}, {a}, {b}")
    return _invert(lambda x: float(betainc(a, b, x)), probability, 0.0, 1.0)


def _count(successes: int, trials: int, name: str) -> tuple[int, int]:
    if isinstance(successes, bool) or isinstance(trials, bool) or int(successes) != successes or int(trials) != trials:
        raise ValueError(f"{name}: successes and trials must be integers; got {successes!r}, {trials!r}")
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"{name}: needs 0 <= successes <= trials and trials >= 1; got {successes} of {trials}")
    return int(successes), int(trials)


def binomial_interval(successes: int, trials: int, level: float = LEVEL, name: str = "binomial_interval") -> Interval:
    """The proportion successes / trials and its exact (Clopper-Pearson) interval at `level`."""
    k, n = _count(successes, trials, name)
    tail = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else beta_quantile(tail, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1.0 - tail, k + 1, n - k)
    return Interval(k / n, low, high, n, level, "clopper-pearson")


def fisher_exact(a: tuple[int, int], b: tuple[int, int], name: str = "fisher_exact") -> float:
    """Two-sided p of Fisher's exact test that (successes, trials) a and b share one proportion."""
    (ka, na), (kb, nb) = _count(*a, f"{name} (A)"), _count(*b, f"{name} (B)")
    successes, total = ka + kb, na + nb

    def probability(k: int) -> Fraction:  # of k successes in A, given the margins (hypergeometric), exactly
        return Fraction(math.comb(na, k) * math.comb(nb, successes - k), math.comb(total, successes))

    observed = probability(ka)
    possible = range(max(0, successes - nb), min(na, successes) + 1)
    return float(sum(p for k in possible if (p := probability(k)) <= observed))


def t_interval(values: Sequence[float], level: float = LEVEL, name: str = "t_interval") -> Interval:
    """The Student t interval of the mean of `values`."""
    x = _values(values, name)
    n = x.size
    mean = float(np.mean(x))
    if n < 2:
        return Interval(mean, None, None, n, level, "t")
    half = t_quantile(0.5 + level / 2.0, n - 1) * float(np.std(x, ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level, "t")


def bootstrap_interval(
    values: Sequence[float], level: float = LEVEL, resamples: int = 10_000, seed: int = 0, name: str = "bootstrap"
) -> Interval:
    """The percentile bootstrap interval of the mean of `values` (resamples drawn with numpy's PCG64 from `seed`)."""
    x = _values(values, name)
    n = x.size
    mean = float(np.mean(x))
    if n < 2:
        return Interval(mean, None, None, n, level, "bootstrap")
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = np.mean(x[draws], axis=1)
    low, high = np.quantile(means, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return Interval(mean, float(low), float(high), n, level, "bootstrap")


def interval(values: Sequence[float], method: str = "t", level: float = LEVEL, name: str = "interval") -> Interval:
    """`t_interval` or `bootstrap_interval` by name."""
    if method == "t":
        return t_interval(values, level, name)
    if method == "bootstrap":
        return bootstrap_interval(values, level, name=name)
    raise ValueError(f"{name}: method={method!r}; accepted: {', '.join(map(repr, METHODS))}")


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL, name: str = "paired_difference"
) -> Interval:
    """The t interval of the mean of a_s - b_s over paired seeds s (same length, same seed order)."""
    a, b = _values(a, f"{name} (A)"), _values(b, f"{name} (B)")
    if a.shape != b.shape:
        raise ValueError(f"{name}: paired values need one of each per seed; got {a.size} and {b.size}")
    return t_interval(a - b, level, name)


def summarize_records(
    records: Sequence[dict[str, Any]],
    *,
    by: Sequence[str],
    metrics: Sequence[str],
    baseline: dict[str, Any] | None = None,
    seed_key: str = "seed",
    level: float = LEVEL,
) -> dict[str, Any]:
    """Each metric's mean and t interval over seeds, per group of records, and paired differences.

    records: flat dicts, one per seed of a group, holding the `by` keys, `seed_key` and the metrics
    (None or missing: that seed has no value of it). Returns
        {"method": "t", "level": level,
         "groups": [{**group, "seeds": [...], metric: Interval.to_json(), ...}, ...],
         "paired": [{**group, "against": baseline group, metric: Interval of (group - baseline)}, ...]}
    where a group's baseline is the group with `baseline`'s values in place of its own (e.g.
    {"normalizer": "softmax"} at the same width), paired on the seeds both have. Groups keep the
    records' first-seen order; each is a pure function of the records (a rerun writes the same).
    """
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for record in records:
        group = tuple(record.get(k) for k in by)
        seeds = groups.setdefault(group, {})
        seed = record.get(seed_key)
        if seed in seeds:
            raise ValueError(
                f"summarize_records: two records of {dict(zip(by, group, strict=True))} have {seed_key}={seed}"
            )
        seeds[seed] = record

    def values(seeds: dict[int, dict[str, Any]], metric: str, only: Sequence[int] | None = None) -> list[float]:
        chosen = sorted(seeds) if only is None else only
        return [float(seeds[s][metric]) for s in chosen if seeds[s].get(metric) is not None]

    out_groups, paired = [], []
    for group, seeds in groups.items():
        labels = dict(zip(by, group, strict=True))
        entry = {**labels, "seeds": sorted(seeds)}
        for metric in metrics:
            observed = values(seeds, metric)
            entry[metric] = t_interval(observed, level, metric).to_json() if observed else None
        out_groups.append(entry)
        if baseline is None:
            continue
        against = {**labels, **baseline}
        base = groups.get(tuple(against[k] for k in by))
        if base is None or against == labels:
            continue
        comparison = {**labels, "against": against}
        for metric in metrics:
            common = [s for s in sorted(seeds) if s in base and seeds[s].get(metric) is not None
                      and base[s].get(metric) is not None]  # fmt: skip
            comparison[metric] = (
                paired_difference(values(seeds, metric, common), values(base, metric, common), level, metric).to_json()
                if common
                else None
            )
        paired.append(comparison)
    return {"method": "t", "level": level, "groups": out_groups, "paired": paired}
