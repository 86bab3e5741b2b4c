"""Attention normalizers: logits -> probabilities along one axis, exact, with safe masking.

Functional API (each `f(logits, *, axis=-1, where=None, **params)`, like `jax.nn.softmax`):
`softmax`, `scaled_softmax`, `ssmax`, `sparsemax`, `entmax15`, `entmax`, and the newer
`softmax1`, `sigmoid`, `stablemax`, `softpick`, `multimax` (see `attnlab.normalizers.recent`).
Named normalizers with bound parameters: `get(name, **params)`, with `NAMES` listing them.
Composition: `Normalizer(mapping, scale)` from the mappings (`Softmax`, `Sparsemax`,
`Entmax15`, `Entmax`) and scale policies (`Temperature`, `LogN`).
"""

from attnlab.normalizers import stats
from attnlab.normalizers.gumbel import gumbel_softmax
from attnlab.normalizers.mappings import Entmax, Entmax15, Softmax, Sparsemax
from attnlab.normalizers.normalizer import Normalizer
from attnlab.normalizers.recent import MultiMax, Sigmoid, Softmax1, Softpick, StableMax
from attnlab.normalizers.registry import (
    NAMES,
    entmax,
    entmax15,
    get,
    multimax,
    parameters,
    scaled_softmax,
    sigmoid,
    softmax,
    softmax1,
    softpick,
    sparsemax,
    ssmax,
    stablemax,
    summary,
)
from attnlab.normalizers.scaling import LogN, Temperature

__all__ = [
    "NAMES",
    "Entmax",
    "Entmax15",
    "LogN",
    "MultiMax",
    "Normalizer",
    "Sigmoid",
    "Softmax",
    "Softmax1",
    "Softpick",
    "Sparsemax",
    "StableMax",
    "Temperature",
    "entmax",
    "entmax15",
    "get",
    "gumbel_softmax",
    "multimax",
    "parameters",
    "scaled_softmax",
    "sigmoid",
    "softmax",
    "softmax1",
    "softpick",
    "sparsemax",
    "ssmax",
    "stablemax",
    "stats",
    "summary",
]
