"""Attention normalizers: logits -> probabilities along one axis, exact, with safe masking.

Functional API (each `f(logits, *, axis=-1, where=None, **params)`, like `jax.nn.softmax`):
`softmax`, `scaled_softmax`, `ssmax`, `sparsemax`, `entmax15`, `entmax`, and the newer
`softmax1`, `sigmoid`, `stablemax`, `softpick`, `multimax` (see `attnlab.normalizers.recent`).
Named normalizers with bound parameters: `get(name, **params)`, with `NAMES` listing them.
Composition: `Normalizer(mapping, scale)` from the mappings (`Softmax`, `Sparsemax`,
`Entmax15`, `Entmax`, ...) and scale policies (`Temperature`, `LogN`).

Each mapping and scale policy describes itself once (`Description`, `Parameter`, `Learn`; see
`attnlab.normalizers.describe`); a new normalizer is a class made with `described(...)` and one
`register(name, mapping, scale)`. `NormalizerSpec` says which normalizer a layer, model or
config uses, which of its parameters are learned, and its display label.
"""

from attnlab.normalizers import stats
from attnlab.normalizers.describe import (
    ELEMENTWISE,
    FAMILIES,
    GENERIC,
    SOFTMAX,
    THRESHOLD,
    Description,
    Learn,
    Parameter,
    described,
)
from attnlab.normalizers.gumbel import gumbel_softmax
from attnlab.normalizers.mappings import Entmax, Entmax15, Softmax, Sparsemax
from attnlab.normalizers.normalizer import Normalizer
from attnlab.normalizers.recent import MultiMax, Sigmoid, Softmax1, Softpick, StableMax
from attnlab.normalizers.registry import (
    NAMES,
    Entry,
    entmax,
    entmax15,
    entries,
    entry,
    get,
    multimax,
    parameters,
    register,
    scaled_softmax,
    sigmoid,
    softmax,
    softmax1,
    softpick,
    sparsemax,
    ssmax,
    stablemax,
    summary,
    unregister,
)
from attnlab.normalizers.scaling import LogN, Temperature
from attnlab.normalizers.spec import NormalizerSpec, as_spec, inverse_mean_log_n

__all__ = [
    "ELEMENTWISE",
    "FAMILIES",
    "GENERIC",
    "NAMES",
    "SOFTMAX",
    "THRESHOLD",
    "Description",
    "Entmax",
    "Entmax15",
    "Entry",
    "Learn",
    "LogN",
    "MultiMax",
    "Normalizer",
    "NormalizerSpec",
    "Parameter",
    "Sigmoid",
    "Softmax",
    "Softmax1",
    "Softpick",
    "Sparsemax",
    "StableMax",
    "Temperature",
    "as_spec",
    "described",
    "entmax",
    "entmax15",
    "entries",
    "entry",
    "get",
    "gumbel_softmax",
    "inverse_mean_log_n",
    "multimax",
    "parameters",
    "register",
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
    "unregister",
]
