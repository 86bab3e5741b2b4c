"""Closed-form predictions that experiments store beside their measurements."""

from __future__ import annotations

import math

EULER_GAMMA = 0.5772156649015329


def peak_max_weight(n: int, gap: float, factor: float = 1.0) -> float:
    """Max softmax weight on a row of n logits, one `gap` above the other n - 1, all times `factor`.

    1 / (1 + (n - 1) exp(-factor * gap)): with factor 1 this is softmax's fading
    1 / (1 + (n-1) e^-5) on the SSMax paper's Figure 1 input (gap 5); with SSMax's
    factor s log n it is 1 / (1 + (n - 1) n^(-s gap)).
    """
    return 1.0 / (1.0 + (n - 1) * math.exp(-factor * gap))


def gaussian_expected_max(n: int) -> float:
    """E[max of n i.i.d. N(0, 1)] ~ sqrt(2 ln n) - (ln ln n + ln 4 pi) / (2 sqrt(2 ln n)) + gamma / sqrt(2 ln n)."""
    root = math.sqrt(2.0 * math.log(n))
    return root - (math.log(math.log(n)) + math.log(4.0 * math.pi)) / (2.0 * root) + EULER_GAMMA / root


def gaussian_softmax_max_weight(n: int, sigma: float) -> float | None:
    """E[max softmax weight] for n i.i.d. N(0, sigma^2) logits, ~ exp(sigma M_n - sigma^2 / 2) / n.

    The approximation replaces the sum of exponentials by its mean n e^(sigma^2/2), which holds
    only for sigma well below sqrt(2 ln n); returns None outside sigma <= sqrt(2 ln n) / 2 or n < 16.
    """
    if n < 16 or sigma > math.sqrt(2.0 * math.log(n)) / 2.0:
        return None
    return math.exp(sigma * gaussian_expected_max(n) - sigma**2 / 2.0) / n


def required_gap(n: int, target: float, factor: float = 1.0) -> float:
    """The gap g at which one logit g above n - 1 equal ones gets softmax weight `target`:
    1 / (1 + (n - 1) exp(-factor g)) = target  <=>  g = log((n - 1) target / (1 - target)) / factor.
    (The SSMax paper's Figure 3: for softmax g grows like log n; SSMax's factor s log n keeps it flat.)"""
    return math.log((n - 1) * target / (1.0 - target)) / factor


def simplex_self_weight(n: int, factor: float, rho: float, mapping: str) -> float | None:
    """The weight a token puts on itself in the simplex model of Chen et al. ("Critical attention
    scaling in long-context transformers", ICLR 2026): n unit tokens with <y_i, y_j> = rho (i != j),
    logits factor * <y_i, y_j>, so the self logit stands a gap g = factor (1 - rho) above n - 1 equal ones.

        softmax    1 / (1 + (n - 1) e^(-g))           with factor = gamma log n: 1 / (1 + (n - 1) n^(-gamma (1 - rho))),
                                                      -> 0 below gamma_c = 1 / (1 - rho), -> 1 above it
        sparsemax  min(1, ((n - 1) g + 1) / n)        one-hot once g >= 1, i.e. gamma >= 1 / ((1 - rho) log n)

    None for other mappings (no closed form here)."""
    gap = factor * (1.0 - rho)
    if mapping == "softmax":
        return peak_max_weight(n, gap)
    if mapping == "sparsemax":
        return min(1.0, ((n - 1) * gap + 1.0) / n)
    return None
