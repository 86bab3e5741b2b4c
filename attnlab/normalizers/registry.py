"""Named normalizers, derived from the descriptions: `register`, `get(name, **params)` and the
functional API built on it.

A registry entry names a (mapping, scale policy) pair and how figures show it. Everything else
(its parameters with defaults and ranges, its family, its summary) comes from the two classes'
`Description` s (`attnlab.normalizers.describe`), so adding a normalizer is one described class
and one `register` call.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.typing import ArrayLike

from attnlab.normalizers._rows import check_finite
from attnlab.normalizers.describe import Parameter
from attnlab.normalizers.length_scaling import ASEntmaxScale, CriticalLogN, Llama4Temperature, QwenLogN
from attnlab.normalizers.mappings import Entmax, Entmax15, Softmax, Sparsemax
from attnlab.normalizers.normalizer import Normalizer
from attnlab.normalizers.recent import MultiMax, Sigmoid, SinkSoftmax, Softmax1, Softpick, StableMax, StickBreaking
from attnlab.normalizers.scaling import LogN, Temperature

# Colour-blind-safe Tableau-10 order, then more: a registered normalizer without its own colour
# takes the first one no entry uses yet.
PALETTE = (
    "#4e79a7", "#76b7b2", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#9c755f", "#edc948", "#ff9da7",
    "#17becf", "#bcbd22", "#000000", "#c51b7d", "#542788", "#8c510a", "#01665e", "#bab0ac", "#7f7f7f",
)  # fmt: skip
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered normalizer: `mapping` after the optional `scale` policy, both described classes.

    Fields:
      name: the registry name ("logn_entmax15").
      mapping: a mapping class made with `attnlab.normalizers.describe.described`.
      scale: a scale policy class, or None.
      label: how figures show it (default: the scale's label, then the mapping's).
      summary: one line of math (default: composed from the descriptions).
      color: its colour in every figure (default: the first unused colour of `PALETTE`).
    """

    name: str
    mapping: type
    scale: type | None = None
    label: str = ""
    summary: str = ""
    color: str = ""

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        """The mapping's parameters, then the scale policy's."""
        scale = () if self.scale is None else self.scale.description.parameters
        return (*self.mapping.description.parameters, *scale)

    @property
    def family(self) -> str:
        return self.mapping.description.family

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise ValueError(f"normalizer {self.name!r} has no parameter {name!r}; it has {self.accepted()}")

    def accepted(self) -> str:
        return ", ".join(p.name for p in self.parameters) or "no parameters"

    def check_names(self, names: Any) -> None:
        """ValueError naming the parameters in `names` this normalizer does not take, and those it does."""
        unknown = sorted(set(names) - {p.name for p in self.parameters})
        if unknown:
            raise ValueError(
                f"normalizer {self.name!r} does not take {', '.join(unknown)}; it accepts {self.accepted()}"
            )

    def build(self, **params: Any) -> Normalizer:
        """The Normalizer with `params` bound (the rest at their defaults); params are checked first."""
        self.check_names(params)
        for key, value in params.items():
            check_finite(key, value, where=self.name)
        own = {p.name for p in self.mapping.description.parameters}
        mapping = self.mapping(**{k: v for k, v in params.items() if k in own})
        if hasattr(mapping, "simplified"):
            mapping = mapping.simplified()
        scale = None if self.scale is None else self.scale(**{k: v for k, v in params.items() if k not in own})
        return Normalizer(mapping, scale, name=self.name)


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    mapping: type,
    scale: type | None = None,
    *,
    label: str | None = None,
    summary: str | None = None,
    color: str | None = None,
) -> Entry:
    """Register the normalizer `name` = `mapping` after `scale`; returns its entry.

    `mapping` and `scale` are classes made with `attnlab.normalizers.describe.described` (a
    mapping's description has a family, a scale policy's has family None). Registering the same
    entry again is a no-op; a different entry under a taken name raises ValueError.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"register: name={name!r}; accepted: lower-case letters, digits and _, starting with a letter")
    for role, cls, is_scale in (("mapping", mapping, False), ("scale", scale, True)):
        if cls is None and is_scale:
            continue
        description = getattr(cls, "description", None)
        if description is None or (description.family is None) != is_scale:
            kind = "a scale policy (family None)" if is_scale else "a mapping (with a family)"
            raise ValueError(
                f"register({name!r}): {role}={cls!r} must be a class made with "
                f"attnlab.normalizers.describe.described, describing {kind}"
            )
    if scale is not None:
        shared = {p.name for p in mapping.description.parameters} & {p.name for p in scale.description.parameters}
        if shared:
            raise ValueError(f"register({name!r}): the mapping and the scale policy both take {sorted(shared)}")
    if label is None:
        label = mapping.description.label if scale is None else f"{scale.description.label} {mapping.description.label}"
    if summary is None:
        summary = (
            mapping.description.summary
            if scale is None
            else f"{mapping.description.label} after {scale.description.label}: {scale.description.summary}"
        )
    if color is None:
        previous = _REGISTRY.get(name)
        used = {e.color for e in _REGISTRY.values()}
        color = previous.color if previous else next((c for c in PALETTE if c not in used), PALETTE[-1])
    entry = Entry(name, mapping, scale, label, summary, color)
    if name in _REGISTRY and _REGISTRY[name] != entry:
        raise ValueError(f"register: a different normalizer is already registered as {name!r}")
    _REGISTRY[name] = entry
    return entry


def unregister(name: str) -> Entry:
    """Remove `name` from the registry (a normalizer a test or a notebook registered); returns its entry."""
    entry(name)  # ValueError listing the names for an unknown one
    return _REGISTRY.pop(name)


class _Names(Sequence):
    """The registered names, in registration order (a live view: later registrations appear)."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


NAMES: Sequence[str] = _Names()


def entry(name: str) -> Entry:
    """The registry entry of `name`; ValueError listing the names for an unknown one."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; valid names are: {', '.join(NAMES)}")
    return _REGISTRY[name]


def entries() -> tuple[Entry, ...]:
    return tuple(_REGISTRY.values())


def parameters(name: str) -> dict[str, Any]:
    """The parameters `name` accepts, with their defaults."""
    return {p.name: p.default for p in entry(name).parameters}


def summary(name: str) -> str:
    """One line of math describing the normalizer `name`."""
    return entry(name).summary


def get(name: str, **params: Any) -> Normalizer:
    """The normalizer `name` with `params` bound, as a callable `f(logits, *, axis=-1, where=None)`.

    Raises ValueError for an unknown name (listing `NAMES`), an unknown parameter (listing the
    accepted ones), a parameter that is not finite (inf or nan) or a value out of range (naming
    the range).
    """
    return entry(name).build(**params)


_LOGN_SUMMARY = "{}((s log n + bias) z), n = valid entries of the row"
register("softmax", Softmax, color="#4e79a7")
register("scaled_softmax", Softmax, Temperature, label="scaled softmax", summary="softmax(z / temperature)",
         color="#76b7b2")  # fmt: skip
register("ssmax", Softmax, LogN, label="SSMax", summary="Scalable-Softmax: " + _LOGN_SUMMARY.format("softmax"),
         color="#e15759")  # fmt: skip
register("sparsemax", Sparsemax, color="#59a14f")
register("entmax15", Entmax15, color="#f28e2b")
register("entmax", Entmax, color="#b07aa1")
register("logn_sparsemax", Sparsemax, LogN, summary=_LOGN_SUMMARY.format("sparsemax"), color="#9c755f")
register("logn_entmax15", Entmax15, LogN, summary=_LOGN_SUMMARY.format("1.5-entmax"), color="#edc948")
register("logn_entmax", Entmax, LogN, summary=_LOGN_SUMMARY.format("alpha-entmax"), color="#ff9da7")
register("softmax1", Softmax1, color="#17becf")
register("sigmoid", Sigmoid, color="#bcbd22")
register("stablemax", StableMax, color="#000000")
register("softpick", Softpick, color="#c51b7d")
register("multimax", MultiMax, color="#542788")
_LLAMA4_SUMMARY = "{}((1 + attn_scale log(floor(n / floor_scale) + 1)) z): Llama 4's attention temperature tuning"
register("llama4_softmax", Softmax, Llama4Temperature, label="Llama 4 softmax",
         summary=_LLAMA4_SUMMARY.format("softmax"), color="#e6ab02")  # fmt: skip
register("llama4_entmax15", Entmax15, Llama4Temperature, label="Llama 4 1.5-entmax",
         summary=_LLAMA4_SUMMARY.format("1.5-entmax"), color="#a6761d")  # fmt: skip
register("qwen_softmax", Softmax, QwenLogN, label="Qwen log-n softmax",
         summary="softmax(max(1, log n / log seq_length) z): Qwen's log-n attention", color="#66a61e")  # fmt: skip
register("critical_softmax", Softmax, CriticalLogN, label="critical log-n softmax",
         summary="softmax(gamma log(n) z), gamma = 1 fixed: critical attention scaling (ssmax, s = gamma, not learned)",
         color="#e7298a")  # fmt: skip
register("asentmax", Entmax, ASEntmaxScale, label="ASEntmax",
         summary="alpha-entmax((delta + beta (log(n + 1))^gamma) z), beta and gamma learned per head: ASEntmax",
         color="#1b9e77")  # fmt: skip
register("sink_softmax", SinkSoftmax, label="softmax + sink", color="#d95f02")
register("stick_breaking", StickBreaking, label="stick-breaking", color="#7570b3")


def _functional(name: str, doc: str) -> Callable[..., jax.Array]:
    def normalize(logits: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None, **params: Any) -> jax.Array:
        return get(name, **params)(logits, axis=axis, where=where)

    lines = "".join(f"  {p.name}: {p.summary}; {p.accepted()} (default {p.default}).\n" for p in entry(name).parameters)
    normalize.__name__ = normalize.__qualname__ = name
    normalize.__doc__ = doc + _COMMON.format(params=lines)
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

softmax = _functional("softmax", "p = exp(z) / sum exp(z).")
scaled_softmax = _functional(
    "scaled_softmax",
    "p = softmax(z / temperature).",
)
ssmax = _functional(
    "ssmax",
    "Scalable-Softmax, p = softmax((s log n + bias) z) (Nakanishi 2025).",
)
sparsemax = _functional("sparsemax", "p = [z - tau]_+, the Euclidean projection onto the simplex.")
entmax15 = _functional("entmax15", "p = [z/2 - tau]_+^2, exact 1.5-entmax.")
entmax = _functional(
    "entmax",
    "p = [(alpha-1) z - tau]_+^(1/(alpha-1)); alpha = 1 is softmax, 2 is sparsemax.",
)
softmax1 = _functional("softmax1", "Off-by-one softmax, p = exp(z) / (1 + sum exp(z)) (rows sum to < 1).")
sigmoid = _functional(
    "sigmoid",
    "Sigmoid attention, p = sigmoid(z + bias) (Ramapuram et al. 2024); not normalised.",
)
stablemax = _functional(
    "stablemax",
    "StableMax, p = s(z) / sum s(z), s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0) (Prieto et al. 2025).",
)
softpick = _functional(
    "softpick",
    "Softpick, p = relu(exp(z) - 1) / (sum |exp(z) - 1| + eps) (Zuhri et al. 2025); rows sum to <= 1.",
)
multimax = _functional(
    "multimax",
    "MultiMax, p = softmax(phi(z)), phi(x) = x - (slope_low - 1)[b_low - x]_+ + (slope_high - 1)[x - b_high]_+.",
)
llama4_softmax = _functional(
    "llama4_softmax",
    "Llama 4's attention temperature tuning, p = softmax((1 + attn_scale log(floor(n / floor_scale) + 1)) z).",
)
llama4_entmax15 = _functional(
    "llama4_entmax15",
    "1.5-entmax after Llama 4's temperature, p = entmax15((1 + attn_scale log(floor(n / floor_scale) + 1)) z).",
)
qwen_softmax = _functional(
    "qwen_softmax",
    "Qwen's log-n attention, p = softmax(max(1, log n / log seq_length) z).",
)
critical_softmax = _functional(
    "critical_softmax",
    "Critical attention scaling, p = softmax(gamma log(n) z) (Chen et al. 2026).",
)
asentmax = _functional(
    "asentmax",
    "ASEntmax, p = alpha-entmax((delta + beta (log(n + 1))^gamma) z) (Vasylenko et al. 2026).",
)
sink_softmax = _functional(
    "sink_softmax",
    "Softmax with a sink logit, p = exp(z) / (exp(sink) + sum exp(z)) (rows sum to < 1).",
)
stick_breaking = _functional(
    "stick_breaking",
    "Stick-breaking, p_j = sigmoid(z_j) prod_{k > j} sigmoid(-z_k) over the row in order (Tan et al. 2025); "
    "rows sum to < 1.",
)
