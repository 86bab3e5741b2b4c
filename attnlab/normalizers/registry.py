"""Named normalizers: `get(name, **params)` and the functional API built on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from attnlab.normalizers._rows import check_finite
from attnlab.normalizers.mappings import Entmax, Entmax15, Softmax, Sparsemax
from attnlab.normalizers.normalizer import Normalizer
from attnlab.normalizers.recent import MultiMax, Sigmoid, Softmax1, Softpick, StableMax
from attnlab.normalizers.scaling import LogN, Temperature


@dataclasses.dataclass(frozen=True)
class _Entry:
    build: Callable[..., Normalizer]
    defaults: dict[str, Any]
    summary: str


def _entmax_mapping(alpha: Any) -> Any:
    # A Python alpha of 1, 1.5 or 2 selects the exact closed forms; anything else (an array,
    # possibly traced or learned) goes through the general threshold search.
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if float(alpha) == 1.0:
            return Softmax()
        if float(alpha) == 1.5:
            return Entmax15()
        if float(alpha) == 2.0:
            return Sparsemax()
    return Entmax(alpha)


def _logn(s: Any, bias: Any, n: Any) -> LogN:
    return LogN(s=s, bias=bias, n=n)


_LOGN_DEFAULTS = {"s": 0.43, "bias": 0.0, "n": None}

_REGISTRY: dict[str, _Entry] = {
    "softmax": _Entry(lambda: Normalizer(Softmax(), name="softmax"), {}, "exp(z) / sum exp(z)"),
    "scaled_softmax": _Entry(
        lambda temperature: Normalizer(Softmax(), Temperature(temperature), name="scaled_softmax"),
        {"temperature": 1.0},
        "softmax(z / temperature)",
    ),
    "ssmax": _Entry(
        lambda s, bias, n: Normalizer(Softmax(), _logn(s, bias, n), name="ssmax"),
        _LOGN_DEFAULTS,
        "Scalable-Softmax: softmax((s log n + bias) z), n = valid entries of the row",
    ),
    "sparsemax": _Entry(lambda: Normalizer(Sparsemax(), name="sparsemax"), {}, "[z - tau]_+ (exact)"),
    "entmax15": _Entry(lambda: Normalizer(Entmax15(), name="entmax15"), {}, "[z/2 - tau]_+^2 (exact)"),
    "entmax": _Entry(
        lambda alpha: Normalizer(_entmax_mapping(alpha), name="entmax"),
        {"alpha": 1.5},
        "[(alpha-1) z - tau]_+^(1/(alpha-1)), alpha >= 1",
    ),
    "logn_sparsemax": _Entry(
        lambda s, bias, n: Normalizer(Sparsemax(), _logn(s, bias, n), name="logn_sparsemax"),
        _LOGN_DEFAULTS,
        "sparsemax((s log n + bias) z)",
    ),
    "logn_entmax15": _Entry(
        lambda s, bias, n: Normalizer(Entmax15(), _logn(s, bias, n), name="logn_entmax15"),
        _LOGN_DEFAULTS,
        "1.5-entmax((s log n + bias) z)",
    ),
    "logn_entmax": _Entry(
        lambda alpha, s, bias, n: Normalizer(_entmax_mapping(alpha), _logn(s, bias, n), name="logn_entmax"),
        {"alpha": 1.5, **_LOGN_DEFAULTS},
        "alpha-entmax((s log n + bias) z)",
    ),
    "softmax1": _Entry(
        lambda: Normalizer(Softmax1(), name="softmax1"), {}, "exp(z) / (1 + sum exp(z)), off by one: rows sum to < 1"
    ),
    "sigmoid": _Entry(
        lambda bias: Normalizer(Sigmoid(bias), name="sigmoid"),
        {"bias": None},
        "sigmoid(z + bias), bias = -log n by default (n = valid entries of the row); not normalised",
    ),
    "stablemax": _Entry(
        lambda: Normalizer(StableMax(), name="stablemax"), {}, "s(z) / sum s(z); s(x) = x + 1 (x >= 0), 1/(1 - x) else"
    ),
    "softpick": _Entry(
        lambda eps: Normalizer(Softpick(eps), name="softpick"),
        {"eps": 1e-6},
        "relu(exp(z) - 1) / (sum |exp(z) - 1| + eps): exact zeros where z <= 0, rows sum to <= 1",
    ),
    "multimax": _Entry(
        lambda b_low, b_high, slope_low, slope_high: Normalizer(
            MultiMax(b_low, b_high, slope_low, slope_high), name="multimax"
        ),
        {"b_low": 0.0, "b_high": 1.0, "slope_low": 2.0, "slope_high": 0.5},
        "softmax(phi(z)), phi piecewise linear: slope_low below b_low, 1 between, slope_high above b_high",
    ),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)


def parameters(name: str) -> dict[str, Any]:
    """The parameters `name` accepts, with their defaults."""
    return dict(_entry(name).defaults)


def summary(name: str) -> str:
    """One line of math describing the normalizer `name`."""
    return _entry(name).summary


def get(name: str, **params: Any) -> Normalizer:
    """The normalizer `name` with `params` bound, as a callable `f(logits, *, axis=-1, where=None)`.

    Raises ValueError for an unknown name (listing `NAMES`), an unknown parameter (listing the
    accepted ones), a parameter that is not finite (inf or nan) or a value out of range (naming
    the range).
    """
    entry = _entry(name)
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        accepted = ", ".join(entry.defaults) or "no parameters"
        raise ValueError(f"normalizer {name!r} does not take {', '.join(unknown)}; it accepts {accepted}")
    for key, value in params.items():
        check_finite(key, value, where=name)
    return entry.build(**{**entry.defaults, **params})


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; valid names are: {', '.join(NAMES)}")
    return _REGISTRY[name]


def _functional(name: str, doc: str) -> Callable[..., jax.Array]:
    def normalize(logits: Any, *, axis: int = -1, where: Any = None, **params: Any) -> jax.Array:
        return get(name, **params)(logits, axis=axis, where=where)

    normalize.__name__ = normalize.__qualname__ = name
    normalize.__doc__ = doc
    return normalize


_COMMON = """

Args:
  logits: array [..., n, ...]; half precision is computed in float32 and returned as given.
  axis: the axis normalised over.
  where: optional bool array broadcasting against `logits`; False entries are masked.
{params}
Returns:
  Array of the shape and dtype of `logits`: >= 0, summing to 1 over the valid entries of each
  row, exactly 0 on masked entries (with zero gradient), all zeros for a row with nothing valid.
"""

softmax = _functional("softmax", "p = exp(z) / sum exp(z)." + _COMMON.format(params=""))
scaled_softmax = _functional(
    "scaled_softmax",
    "p = softmax(z / temperature)." + _COMMON.format(params="  temperature: > 0; scalar or one per row.\n"),
)
ssmax = _functional(
    "ssmax",
    "Scalable-Softmax, p = softmax((s log n + bias) z) (Nakanishi 2025)."
    + _COMMON.format(
        params="  s: > 0 (paper: 0.43); bias: additive; n: defaults to the row's number of valid entries.\n"
    ),
)
sparsemax = _functional(
    "sparsemax", "p = [z - tau]_+, the Euclidean projection onto the simplex." + _COMMON.format(params="")
)
entmax15 = _functional("entmax15", "p = [z/2 - tau]_+^2, exact 1.5-entmax." + _COMMON.format(params=""))
entmax = _functional(
    "entmax",
    "p = [(alpha-1) z - tau]_+^(1/(alpha-1)); alpha = 1 is softmax, 2 is sparsemax."
    + _COMMON.format(params="  alpha: >= 1; a float or an array (one per row, e.g. [H, 1, 1]); differentiable.\n"),
)
softmax1 = _functional(
    "softmax1", "Off-by-one softmax, p = exp(z) / (1 + sum exp(z)) (rows sum to < 1)." + _COMMON.format(params="")
)
sigmoid = _functional(
    "sigmoid",
    "Sigmoid attention, p = sigmoid(z + bias) (Ramapuram et al. 2024); not normalised."
    + _COMMON.format(params="  bias: default None, meaning -log n with n the row's number of valid entries.\n"),
)
stablemax = _functional(
    "stablemax",
    "StableMax, p = s(z) / sum s(z), s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0) (Prieto et al. 2025)."
    + _COMMON.format(params=""),
)
softpick = _functional(
    "softpick",
    "Softpick, p = relu(exp(z) - 1) / (sum |exp(z) - 1| + eps) (Zuhri et al. 2025); rows sum to <= 1."
    + _COMMON.format(params="  eps: > 0 (default 1e-6).\n"),
)
multimax = _functional(
    "multimax",
    "MultiMax, p = softmax(phi(z)), phi(x) = x - (slope_low - 1)[b_low - x]_+ + (slope_high - 1)[x - b_high]_+."
    + _COMMON.format(params="  b_low <= b_high; slope_low, slope_high > 0 (defaults 0, 1, 2, 0.5).\n"),
)
