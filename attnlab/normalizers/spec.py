"""`NormalizerSpec`: which normalizer, its parameters, which of them are learned, and its label.

One class serves the attention layers (which learn parameters per head), the Transformer config
(one spec per layer) and the experiment configs (TOML tables), derived from the registry entry
and the parameters' descriptions (`attnlab.normalizers.describe`):

    NormalizerSpec("ssmax")                                    learns s per head (s's default), from 0.43
    NormalizerSpec("ssmax", learn=())                          s fixed at 0.43
    NormalizerSpec("ssmax", learn=("s", "bias"), params={"s": 0.3})
    NormalizerSpec("entmax", learn=("alpha",), label="α-entmax (learned α)")
    NormalizerSpec("entmax", params={"alpha": 1.3})            fixed alpha

In TOML: "ssmax", or {name = "ssmax", learn = ["bias"], s = 0.3, label = "SSMax s=0.3"}.

A layer stores each learned parameter p as w, shape [N, 1, 1] (one per query head), under the
name of its parametrisation (`Learn.stored_name`: "s", "bias", "alpha_logit",
"log_temperature", ...), and uses p = `Learn.to_value(w)` at each call. `params` give the fixed
values and the start values of the learned ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnlab.normalizers import registry
from attnlab.normalizers._rows import check_finite
from attnlab.normalizers.describe import Parameter
from attnlab.normalizers.normalizer import Normalizer

# TOML keys of the spec itself; every other key of a table is a parameter of the normalizer.
SPEC_KEYS = ("name", "label", "learn")
_REPLACED = {
    "learn_s": "learn = [...] listing s (or learn = [] for a fixed s)",
    "s_init": "s = <start value>",
    "train_length": "s = attnlab.nn.inverse_mean_log_n(L), computed and written as a number",
    "learn_bias": 'learn = ["s", "bias"]',
    "bias_init": "bias = <start value> with bias in learn",
    "learn_alpha": 'learn = ["alpha"]',
    "alpha_init": 'alpha = <start value> with "alpha" in learn',
    "learn_temperature": 'learn = ["temperature"]',
    "learn_multimax": 'learn = ["b_low", "b_high", "slope_low", "slope_high"]',
}


def inverse_mean_log_n(train_length: int) -> float:
    """1 / mean_{n=1..L} log n = L / log(L!): the s that makes s log n average 1 over a length-L causal row."""
    if isinstance(train_length, bool) or not isinstance(train_length, int) or train_length < 2:
        raise ValueError(f"inverse_mean_log_n: train_length must be an int >= 2; got {train_length!r}")
    return train_length / math.lgamma(train_length + 1)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class NormalizerSpec:
    """A registered normalizer, its parameter values, which parameters a layer learns, and its label.

    Fields:
      name: a name from `attnlab.normalizers.NAMES`.
      params: parameter values (numbers), as a mapping or (name, value) pairs: fixed values, and
        the start values of learned parameters; the rest take their defaults.
      label: what figures and tables show (default: the name).
      learn: the parameters a layer learns per head (each must be learnable: its description has
        a `learn` parametrisation). None: those its description learns by default (SSMax's s).

    Bad values raise ValueError naming the field, the value and what is accepted. A plain string
    is accepted wherever a spec is, meaning `NormalizerSpec(name=...)`.
    """

    name: str = "softmax"
    params: Any = ()
    label: str = ""
    learn: Any = None

    def __post_init__(self):
        where = "NormalizerSpec"
        entry = registry.entry(self.name)  # ValueError naming the valid names
        object.__setattr__(self, "params", self._check_params(self.params, entry))
        object.__setattr__(self, "learn", self._check_learn(self.learn, entry))
        if not isinstance(self.label, str):
            raise ValueError(f"{where}.label must be a string; got {self.label!r}")
        if not self.label:
            object.__setattr__(self, "label", self.name)
        for name in self.learn:
            parameter = entry.parameter(name)
            start = self.start(name)
            if start is None:
                raise ValueError(
                    f"{where}: learning {name!r} of {self.name!r} needs a start value: params={{{name!r}: ...}}"
                )
            low_high = parameter.learn.start_range
            if low_high is not None and not low_high[0] <= start <= low_high[1]:
                raise ValueError(
                    f"{where}: {name!r} learned as {parameter.learn.formula} cannot start at {start!r}; "
                    f"accepted: [{low_high[0]:g}, {low_high[1]:.7g}]"
                )
        # Building once with the start values runs the normalizer's own range checks now.
        self.build()

    @staticmethod
    def _check_params(params: Any, entry: registry.Entry) -> tuple[tuple[str, float], ...]:
        if isinstance(params, Mapping):
            items = list(params.items())
        elif isinstance(params, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in params):
            items = [tuple(p) for p in params]
        else:
            raise ValueError(f"NormalizerSpec.params must be a mapping of parameter names to numbers; got {params!r}")
        for key, value in items:
            if key in _REPLACED:
                raise ValueError(f"NormalizerSpec.params: {key!r} is no longer a key; write {_REPLACED[key]}")
            entry.check_names([key])
            if not _is_number(value):
                raise ValueError(f"NormalizerSpec.params[{key!r}] must be a number; got {value!r}")
            check_finite(key, value, where=entry.name)
        return tuple(sorted((key, float(value)) for key, value in items))

    @staticmethod
    def _check_learn(learn: Any, entry: registry.Entry) -> tuple[str, ...]:
        if learn is None:
            return tuple(p.name for p in entry.parameters if p.learned_by_default)
        if isinstance(learn, str) or not isinstance(learn, (tuple, list, set, frozenset)):
            raise ValueError(f"NormalizerSpec.learn must be a list of parameter names; got {learn!r}")
        learnable = [p.name for p in entry.parameters if p.learn is not None]
        for name in learn:
            if name not in learnable:
                raise ValueError(
                    f"NormalizerSpec.learn: {entry.name!r} cannot learn {name!r}; "
                    f"learnable: {', '.join(learnable) or 'nothing'}"
                )
        return tuple(p.name for p in entry.parameters if p.name in set(learn))

    @classmethod
    def parse(cls, value: Any, where: str = "normalizer") -> NormalizerSpec:
        """A spec from itself, a registry name, or a table {name, label, learn, <parameters>} (a config file)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise ValueError(
                f"{where}: expected a normalizer name or a table with name = one of {', '.join(registry.NAMES)}; "
                f"got {value!r}"
            )
        table = dict(value)
        for key in _REPLACED:
            if key in table:
                raise ValueError(f"{where}: {key!r} is no longer a key; write {_REPLACED[key]}")
        name, label, learn = table.pop("name"), table.pop("label", ""), table.pop("learn", None)
        try:
            return cls(name, table, label, None if learn is None else tuple(learn))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: {error}") from None

    @property
    def entry(self) -> registry.Entry:
        return registry.entry(self.name)

    @property
    def family(self) -> str:
        return self.entry.family

    @property
    def fixed(self) -> dict[str, float]:
        """The given parameter values (fixed ones and start values), as a dict."""
        return dict(self.params)

    def start(self, name: str) -> Any:
        """The value of parameter `name` before any learning: given, else its default."""
        return self.fixed.get(name, self.entry.parameter(name).default)

    def _learned_parameters(self) -> tuple[Parameter, ...]:
        return tuple(self.entry.parameter(name) for name in self.learn)

    @property
    def learned(self) -> tuple[str, ...]:
        """The names a layer stores the learned parameters under (`Learn.stored_name`: s, alpha_logit, ...)."""
        return tuple(p.learn.stored_name(p.name) for p in self._learned_parameters())

    @property
    def softmax_type(self) -> bool:
        """Whether the normalizer is plain softmax after its scale policy (`Normalizer.softmax_type`)."""
        return self.build().softmax_type

    def initial_params(self, num_heads: int) -> dict[str, np.ndarray]:
        """Start values of the stored learned parameters, each float32 [num_heads, 1, 1]."""
        return {
            p.learn.stored_name(p.name): np.full((num_heads, 1, 1), p.learn.from_value(self.start(p.name)), np.float32)
            for p in self._learned_parameters()
        }

    def learned_values(self, learned: Mapping[str, Any]) -> dict[str, Any]:
        """The learned parameters' values (natural units: alpha, not its logit) from their stored ones."""
        return {p.name: p.learn.to_value(learned[p.learn.stored_name(p.name)]) for p in self._learned_parameters()}

    def build(self, learned: Mapping[str, Any] | None = None) -> Normalizer:
        """The Normalizer for the stored learned parameters' current values (arrays [N, 1, 1]), or at
        the start values when `learned` is None."""
        values = self.fixed
        if learned is not None:
            missing = sorted(set(self.learned) - set(learned))
            if missing:
                raise ValueError(f"NormalizerSpec.build: missing learned parameters {missing} for {self.name!r}")
            values.update(self.learned_values(learned))
        return registry.get(self.name, **values)

    def to_json(self) -> dict[str, Any]:
        """{name, label, <given parameters>, learn (when not the default)}: the TOML table's form."""
        out: dict[str, Any] = {"name": self.name, "label": self.label, **self.fixed}
        if self.learn != type(self)(self.name).learn:
            out["learn"] = list(self.learn)
        return out


def as_spec(normalizer: Any, where: str = "normalizer") -> NormalizerSpec:
    """A registry name, a table or a NormalizerSpec -> a NormalizerSpec (ValueError naming `where` otherwise)."""
    if not isinstance(normalizer, (str, Mapping, NormalizerSpec)):
        raise ValueError(
            f"{where} must be a name from attnlab.normalizers.NAMES or an attnlab.normalizers.NormalizerSpec; "
            f"got {type(normalizer).__name__}"
        )
    return NormalizerSpec.parse(normalizer, where)
