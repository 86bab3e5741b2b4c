"""The critical-scaling transition: where attention with factor gamma log n goes from uniform to one-hot.

Chen, Lin, Polyanskiy & Rigollet ("Critical attention scaling in long-context transformers", ICLR
2026) study tokens y_1..y_n on the unit sphere with pairwise inner products rho and logits
a_ij = beta_n <y_i, y_j>, beta_n = gamma log n. A token's weight on itself is then
1 / (1 + (n - 1) n^(-gamma (1 - rho))): as n grows it tends to 0 (attention averages everything,
tokens collapse) below gamma_c = 1 / (1 - rho), and to 1 (attention is the identity) above it.

Here, for each n, rho and seed, `tokens` unit vectors in dimension `dim` form an almost-simplex,

    y_i = normalise(sqrt(rho) c + sqrt(1 - rho) g_i),   g_i ~ N(0, I / dim),   c a fixed unit vector,

so <y_i, y_j> = rho up to fluctuations of order 1 / sqrt(dim) (the paper's numerical setting; the
exact simplex is dim -> infinity). The first `queries` tokens attend over all n (themselves
included) through each normalizer with its length factor set to gamma log n, n = the row's
length: critical_softmax (gamma), logn_sparsemax and logn_entmax15 (s = gamma). Per gamma, the
mean over queries of the self weight (the token's weight on itself), the largest weight, the
normalised entropy H / log n and the support fraction (exact non-zeros / n); and gamma_half, the
gamma at which the self weight first reaches 1/2 (interpolated in gamma; None if it never does).
Beside them, the exact-simplex prediction (experiments.theory.simplex_self_weight) where there is
a closed form. Seeds draw new tokens; the summary gives each measure's mean and t interval over seeds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.experiments import intervals, theory
from attnlab.experiments.checks import (
    at_least,
    between,
    check,
    distinct,
    each,
    increasing,
    nonempty,
    one_of,
    positive,
    setting,
)
from attnlab.experiments.config import Lengths
from attnlab.experiments.kind import Kind
from attnlab.normalizers import get, stats

# normalizer name -> (the parameter that multiplies log n, the mapping the theory names)
SCALED = {
    "critical_softmax": ("gamma", "softmax"),
    "logn_sparsemax": ("s", "sparsemax"),
    "logn_entmax15": ("s", "entmax15"),
}
MEASURES = ("self_weight", "max_weight", "normalized_entropy", "support_fraction")


@dataclasses.dataclass(frozen=True)
class Config:
    """normalizers: which maps take the factor gamma log n (see SCALED); gammas: the sweep of gamma
    (increasing; by default 2^(k/4) from 1/64 to 4, so sparsemax's transition, near 1 / (2 log n),
    is inside it too);
    lengths: n (tokens per row); rhos: the simplex's pairwise inner product; dim: the tokens'
    dimension; queries: rows per (n, rho, seed); seeds: token draws (one point each)."""

    normalizers: tuple[str, ...] = setting(tuple(SCALED), nonempty, each(one_of(tuple(SCALED))), distinct)
    gammas: tuple[float, ...] = setting(
        tuple(round(2.0 ** (k / 4), 6) for k in range(-24, 9)), nonempty, each(positive), distinct, increasing
    )
    lengths: Lengths = dataclasses.field(default_factory=lambda: Lengths((64, 256, 1024, 4096, 16384, 65536)))
    rhos: tuple[float, ...] = setting((0.0, 0.5), nonempty, each(between(-0.5, 1.0, "[)")), distinct)
    dim: int = setting(256, at_least(2))
    queries: int = setting(16, at_least(1))
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """One point per (rho, n, seed); each runs every normalizer over every gamma."""
    return [
        {"rho": rho, "n": n, "seed": seed}
        for rho in config.rhos
        for n in config.lengths.values
        for seed in config.seeds
    ]


def tokens(n: int, rho: float, dim: int, seed: int) -> jax.Array:
    """[n, dim] unit vectors with pairwise inner products about rho (see the module docstring)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), n), round(1000 * rho))
    center_key, noise_key = jax.random.split(key)
    center = jax.random.normal(center_key, (dim,))
    center = center / jnp.linalg.norm(center)
    noise = jax.random.normal(noise_key, (n, dim)) / math.sqrt(dim)
    y = math.sqrt(rho) * center + math.sqrt(1.0 - rho) * noise
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)


@jax.jit
def _row_measures(normalizer, logits: jax.Array) -> dict[str, jax.Array]:
    """Per row of logits [Q, n] (row q's own token at column q): the measures, averaged over rows."""
    p = normalizer(logits)
    n = logits.shape[-1]
    own = jnp.take_along_axis(p, jnp.arange(p.shape[0])[:, None], axis=-1)[:, 0]
    return {
        "self_weight": jnp.mean(own),
        "max_weight": jnp.mean(stats.max_weight(p)),
        "normalized_entropy": jnp.mean(stats.entropy(p)) / math.log(n),
        "support_fraction": jnp.mean(stats.support_size(p).astype(jnp.float32)) / n,
    }


def crossing(gammas: list[float], values: list[float], level: float = 0.5) -> float | None:
    """The gamma where `values` (in gamma order) first reach `level`, linearly interpolated between
    grid points; None if they never do, or already do at the first gamma (not located by the grid)."""
    for i, value in enumerate(values):
        if value >= level:
            if i == 0:
                return None
            g0, g1, v0 = gammas[i - 1], gammas[i], values[i - 1]
            return g0 + (level - v0) * (g1 - g0) / (value - v0)
    return None


def run_point(config: Config, point: dict[str, Any]) -> list[dict[str, Any]]:
    n, rho, seed = int(point["n"]), float(point["rho"]), int(point["seed"])
    y = tokens(n, rho, config.dim, seed)
    inner = y[: min(config.queries, n)] @ y.T  # [Q, n]: <y_q, y_j>, the own token at column q
    gammas = list(config.gammas)
    records = []
    for name in config.normalizers:
        parameter, mapping = SCALED[name]
        measured = {m: [] for m in MEASURES}
        for gamma in gammas:
            # The normalizer's own factor (gamma or s) * log n multiplies the logits <y_q, y_j>.
            values = _row_measures(get(name, **{parameter: jnp.float32(gamma)}), inner)  # traced: one compile
            for m in MEASURES:
                measured[m].append(float(values[m]))
        theory_values = [theory.simplex_self_weight(n, gamma * math.log(n), rho, mapping) for gamma in gammas]
        records.append(
            {
                "normalizer": name,
                "mapping": mapping,
                "gammas": gammas,
                **measured,
                "gamma_half": crossing(gammas, measured["self_weight"]),
                "self_weight_theory": theory_values,
                "gamma_half_theory": None if theory_values[0] is None else crossing(gammas, theory_values),
                "gamma_critical_theory": 1.0 / (1.0 - rho) if mapping == "softmax" else None,
            }
        )
    return records


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (normalizer, rho, n): gamma_half's mean and interval over seeds; per (normalizer, rho,
    n, gamma): each measure's."""
    per_gamma = [
        {"normalizer": r["normalizer"], "rho": r["rho"], "n": r["n"], "gamma": g, "seed": r["seed"],
         **{m: r[m][i] for m in MEASURES}}
        for r in records
        for i, g in enumerate(r["gammas"])
    ]  # fmt: skip
    return {
        "gamma_half": intervals.summarize_records(records, by=("normalizer", "rho", "n"), metrics=("gamma_half",)),
        "measures": intervals.summarize_records(per_gamma, by=("normalizer", "rho", "n", "gamma"), metrics=MEASURES),
    }


KIND = Kind(
    name="critical_scaling",
    description="factor gamma log n on almost-simplex tokens: where attention turns from uniform to one-hot, vs theory",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"rhos": "rho", "lengths": "n", "seeds": "seed"},
    figures="attnlab.figures.critical_scaling",
    summarize=summarize,
)
