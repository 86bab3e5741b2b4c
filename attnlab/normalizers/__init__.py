"""Attention normalizers: logits -> probabilities along one axis, exact, with safe masking.

Functional API (each `f(logits, *, axis=-1, where=None, **params)`, like `jax.nn.softmax`):
`softmax`, `scaled_softmax`, `ssmax`, `sparsemax`, `entmax15`, `entmax`, and the newer
`softmax1`, `sink_softmax`, `sigmoid`, `stablemax`, `softpick`, `multimax`, `stick_breaking` (see
`attnlab.normalizers.recent`), and the length-scaled `llama4_softmax`, `llama4_entmax15`,
`qwen_softmax`, `critical_softmax`, `asentmax` (see `attnlab.normalizers.length_scaling`).
Named normalizers with bound parameters: `get(name, **params)`, with `NAMES` listing them.
Composition: `Normalizer(mapping, scale)` from the mappings (`Softmax`, `Sparsemax`,
`Entmax15`, `Entmax`, ...) and scale policies (`Temperature`, `LogN`, `Llama4Temperature`,
`QwenLogN`, `CriticalLogN`, `ASEntmaxScale`).

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
from attnlab.normalizers.length_scaling import ASEntmaxScale, CriticalLogN, Llama4Temperature, QwenLogN
from attnlab.normalizers.mappings import Entmax, Entmax15, Softmax, Sparsemax
from attnlab.normalizers.normalizer import Normalizer
from attnlab.normalizers.recent import MultiMax, Sigmoid, SinkSoftmax, Softmax1, Softpick, StableMax, StickBreaking
from attnlab.normalizers.registry import (
    NAMES,
    Entry,
    asentmax,
    critical_softmax,
    entmax,
    entmax15,
    entries,
    entry,
    get,
    llama4_entmax15,
    llama4_softmax,
    multimax,
    parameters,
    qwen_softmax,
    register,
    scaled_softmax,
    sigmoid,
    sink_softmax,
    softmax,
    softmax1,
    softpick,
    sparsemax,
    ssmax,
    stablemax,
    stick_breaking,
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
    "ASEntmaxScale",
    "CriticalLogN",
    "Description",
    "Entmax",
    "Entmax15",
    "Entry",
    "Learn",
    "Llama4Temperature",
    "LogN",
    "MultiMax",
    "Normalizer",
    "NormalizerSpec",
    "Parameter",
    "QwenLogN",
    "Sigmoid",
    "SinkSoftmax",
    "Softmax",
    "Softmax1",
    "Softpick",
    "Sparsemax",
    "StableMax",
    "StickBreaking",
    "Temperature",
    "as_spec",
    "asentmax",
    "critical_softmax",
    "described",
    "entmax",
    "entmax15",
    "entries",
    "entry",
    "get",
    "gumbel_softmax",
    "inverse_mean_log_n",
    "llama4_entmax15",
    "llama4_softmax",
    "multimax",
    "parameters",
    "qwen_softmax",
    "register",
    "scaled_softmax",
    "sigmoid",
    "sink_softmax",
    "softmax",
    "softmax1",
    "softpick",
    "sparsemax",
    "ssmax",
    "stablemax",
    "stats",
    "stick_breaking",
    "summary",
    "unregister",
]
