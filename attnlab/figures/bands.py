"""Means over seeds and their 95% Student t intervals, for the figures of the kinds that train
models: curves averaged over seeds with a band, summary intervals as error bars.

A curve measured once per seed (a training history, the loss at each position) is drawn as its
mean over the seeds with the band mean +- t_{n-1, 0.975} sd / sqrt(n) at each x, the interval
`attnlab.experiments.intervals.t_interval` gives for one x; with one seed the curve is drawn alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import intervals, lm

BAND_ALPHA = 0.18


@functools.cache
def _t_factor(n: int, level: float) -> float:
    return intervals.t_quantile(0.5 + level / 2.0, n - 1) / math.sqrt(n)


def curve_band(
    curves: Sequence[Sequence[float | None]], level: float = intervals.LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) at each x of curves of equal length, one per seed (None: not measured).
    Where fewer than two seeds have a value, low and high are NaN (no band); where none has, all three are."""
    y = np.array([[np.nan if v is None else v for v in curve] for curve in curves], dtype=float)  # [seeds, x]
    if y.ndim != 2:
        raise ValueError(f"curve_band needs curves of one length; got lengths {[len(c) for c in curves]}")
    count = np.sum(np.isfinite(y), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(y, axis=0) / count
        sd = np.sqrt(np.nansum((y - mean) ** 2, axis=0) / (count - 1))
    half = np.array([_t_factor(int(n), level) if n >= 2 else np.nan for n in count]) * sd
    mean = np.where(count > 0, mean, np.nan)
    return mean, mean - half, mean + half


def from_summary(entries: Sequence[dict | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of summary intervals (`Interval.to_json()`; None: not measured, NaN); an
    interval of one seed has low = high = mean (no error bar)."""
    mean = np.array([np.nan if e is None else e["mean"] for e in entries], dtype=float)
    low = np.array([np.nan if e is None else e["mean"] if e["low"] is None else e["low"] for e in entries], float)
    high = np.array([np.nan if e is None else e["mean"] if e["high"] is None else e["high"] for e in entries], float)
    return mean, low, high


def errors(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """matplotlib's yerr, [2, x]: the distances below and above the mean (0 where there is no interval)."""
    return np.nan_to_num(np.stack([mean - low, high - mean]), nan=0.0)


def draw(ax: plt.Axes, x, mean: np.ndarray, low: np.ndarray, high: np.ndarray, *, color, **line) -> None:
    """The mean as a line (keywords `line` to plot) and, where defined, its interval as a band."""
    ax.plot(x, mean, color=color, **line)
    if np.any(np.isfinite(low)):
        ax.fill_between(x, low, high, color=color, alpha=BAND_ALPHA, lw=0)


def seeds_in(records: Sequence[dict]) -> list[int]:
    """The seeds of the records, sorted (a record without one, written before seeds were swept, is seed 0)."""
    return sorted({lm.seed_of(r) for r in records})


def note(seeds: int, level: float = intervals.LEVEL) -> str:
    """What a figure says of its statistics: 'mean and 95% t interval over 3 seeds', or 'one seed'."""
    return f"mean and {round(100 * level)}% t interval over {seeds} seeds" if seeds > 1 else "one seed"
