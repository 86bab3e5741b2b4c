"""`Batch`, the one shape every data source in `attnlab.data` yields, and the checks they share.

A batch is next-token prediction with teacher forcing: `targets[b, t]` is the token that follows
`inputs[b, t]`, and the loss is averaged over the positions where `loss_mask` is True.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np


class DataError(ValueError):
    """A bad corpus, path, window or task setting; the message names the value and what is accepted."""


class Batch(NamedTuple):
    """B sequences of L byte tokens (ids 0..255) and what to predict at each position.

    Fields:
      inputs: int32 [B, L], the tokens the model reads.
      targets: int32 [B, L], targets[b, t] = the token after inputs[b, t] (for every source here,
        targets[:, :-1] == inputs[:, 1:]).
      loss_mask: bool [B, L], the positions that are scored: all True for corpus text; the answer
        positions for the synthetic tasks.
      needle_mask: bool [B, L] or None, the input positions holding the needle sentence
        (`attnlab.data.needle_batch` only).
    """

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    needle_mask: np.ndarray | None = None


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers; False for bools, which Python counts as ints."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """True for finite Python and NumPy real numbers, bools excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def check_positive_int(value: Any, where: str) -> int:
    """`value` as an int when it is an integer >= 1 (not a bool); DataError naming `where` otherwise."""
    if not is_int(value) or value < 1:
        raise DataError(f"{where}={value!r}; accepted: an integer >= 1")
    return int(value)


def check_seed(seed: Any, where: str) -> int:
    """`seed` as an int when it is an integer >= 0 (what np.random.default_rng accepts)."""
    if not is_int(seed) or seed < 0:
        raise DataError(f"{where}={seed!r}; accepted: an integer >= 0")
    return int(seed)
