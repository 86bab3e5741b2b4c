"""`NormalizerSpec`: which normalizer an attention layer uses, and which of its parameters it learns.

A layer holds the learned parameters (one per head, shape [N, 1, 1]) and, at each call, turns
their current values into an `attnlab.normalizers.Normalizer` with `spec.build(learned)`. The
NNX and Linen layers share this file: only the storage of the parameters differs.

Learned parameters and their parametrisations (N = number of query heads):

    s               [N, 1, 1]  SSMax's s, raw (the paper's parametrisation)      log-n names
    bias            [N, 1, 1]  SSMax's additive bias, scale = s log n + bias     log-n names
    alpha_logit     [N, 1, 1]  alpha = clip(1 + sigmoid(alpha_logit), 1.01, 2)   entmax, logn_entmax
    log_temperature [N, 1, 1]  temperature = exp(log_temperature) > 0            scaled_softmax
    multimax_b_low, multimax_b_high                [N, 1, 1]  the modulator's bends   multimax
    multimax_log_slope_low, multimax_log_slope_high [N, 1, 1]  slope = exp(.) > 0     multimax

alpha's parametrisation keeps it inside [1.01, 2] whatever the optimiser does (an unconstrained
alpha drifts below 1: entmax issue #39).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import normalizers
from attnlab.normalizers import Normalizer, Softmax
from attnlab.normalizers._rows import check_finite

LOGN_NAMES = ("ssmax", "logn_sparsemax", "logn_entmax15", "logn_entmax")
ALPHA_NAMES = ("entmax", "logn_entmax")
TEMPERATURE_NAMES = ("scaled_softmax",)
MULTIMAX_NAMES = ("multimax",)
MULTIMAX_LEARNED = ("multimax_b_low", "multimax_b_high", "multimax_log_slope_low", "multimax_log_slope_high")
S_INIT_RULES = ("inverse_mean_log_n",)
PAPER_S = 0.43
ALPHA_MIN, ALPHA_MAX = 1.01, 2.0


def inverse_mean_log_n(train_length: int) -> float:
    """1 / mean_{n=1..L} log n = L / log(L!): the s that makes s log n average 1 over a length-L causal row."""
    if isinstance(train_length, bool) or not isinstance(train_length, int) or train_length < 2:
        raise ValueError(f"inverse_mean_log_n: train_length must be an int >= 2; got {train_length!r}")
    return train_length / math.lgamma(train_length + 1)


def alpha_from_logit(w: Any) -> jax.Array:
    """alpha = clip(1 + sigmoid(w), 1.01, 2): entmax's alpha, never below 1.01 nor above 2."""
    return jnp.clip(1.0 + jax.nn.sigmoid(jnp.asarray(w)), ALPHA_MIN, ALPHA_MAX)


def alpha_to_logit(alpha: float) -> float:
    """The w with 1 + sigmoid(w) = alpha, for 1 < alpha < 2."""
    return math.log((alpha - 1.0) / (2.0 - alpha))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class NormalizerSpec:
    """An attention normalizer and the parameters an attention layer learns for it, per head.

    Fields:
      name: a name from `attnlab.normalizers.NAMES`.
      params: fixed parameters passed to `attnlab.normalizers.get(name, ...)` (numbers), e.g.
        {"temperature": 2.0} for scaled_softmax or {"alpha": 1.3} for entmax. Parameters the spec
        governs (s for log-n names; bias, alpha, temperature when learned) are not accepted here.
      learn_s: log-n names (ssmax, logn_sparsemax, logn_entmax15, logn_entmax): learn one s per head
        (default). False keeps s fixed at its initial value ("SSMax without learned s").
      s_init: the initial (or fixed) s: a number > 0 (paper: 0.43) or "inverse_mean_log_n",
        s = 1 / mean_{n=1..L} log n for L = train_length.
      train_length: L for s_init="inverse_mean_log_n".
      learn_bias: log-n names: learn one additive bias per head, scale = s log n + bias.
      bias_init: its initial value (default 0).
      learn_alpha: entmax, logn_entmax: learn alpha per head as clip(1 + sigmoid(w), 1.01, 2).
      alpha_init: its initial value, in [1.01, 2).
      learn_temperature: scaled_softmax: learn the temperature per head as exp(log_temperature),
        initialised at params["temperature"] (default 1).
      learn_multimax: multimax: learn its b_low, b_high and (as logs) slope_low, slope_high per
        head, initialised at params (or the registry defaults). Learned bends are not kept ordered.

    Bad values (including inf or nan in s_init, bias_init, alpha_init or params) raise ValueError
    naming the field and what is accepted. A plain string is accepted wherever a spec is, meaning
    `NormalizerSpec(name=...)`.
    """

    name: str = "softmax"
    params: Any = ()
    learn_s: bool = True
    s_init: float | str = PAPER_S
    train_length: int | None = None
    learn_bias: bool = False
    bias_init: float = 0.0
    learn_alpha: bool = False
    alpha_init: float = 1.5
    learn_temperature: bool = False
    learn_multimax: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in normalizers.NAMES:
            raise ValueError(f"NormalizerSpec.name={self.name!r}; accepted: {', '.join(normalizers.NAMES)}")
        for flag in ("learn_s", "learn_bias", "learn_alpha", "learn_temperature", "learn_multimax"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"NormalizerSpec.{flag} must be True or False; got {getattr(self, flag)!r}")
        for field in ("s_init", "bias_init", "alpha_init"):
            check_finite(field, getattr(self, field), where="NormalizerSpec")
        object.__setattr__(self, "params", self._check_params(self.params))
        self._check_applicable()
        self._check_s()
        if not _is_number(self.bias_init):
            raise ValueError(f"NormalizerSpec.bias_init must be a number; got {self.bias_init!r}")
        if self.learn_alpha and not (_is_number(self.alpha_init) and ALPHA_MIN <= self.alpha_init < ALPHA_MAX):
            raise ValueError(
                f"NormalizerSpec.alpha_init={self.alpha_init!r}; accepted: a number in [{ALPHA_MIN}, {ALPHA_MAX}) "
                "(alpha = clip(1 + sigmoid(w), 1.01, 2) cannot start at 2)"
            )
        # Building once with the initial values runs the normalizers' own range checks now.
        self.build(self.initial_params(1))

    def _check_params(self, params: Any) -> tuple[tuple[str, float], ...]:
        if isinstance(params, Mapping):
            items = list(params.items())
        elif isinstance(params, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in params):
            items = list(params)
        else:
            raise ValueError(f"NormalizerSpec.params must be a mapping of parameter names to numbers; got {params!r}")
        accepted = normalizers.parameters(self.name)
        governed = {
            "s": "s is set by s_init (learn_s=False freezes it)",
            "bias": "bias is learned with learn_bias=True; set its start with bias_init",
            "alpha": "alpha is learned with learn_alpha=True; set its start with alpha_init",
        }
        for key, value in items:
            if key not in accepted:
                names = ", ".join(accepted) or "none"
                raise ValueError(f"NormalizerSpec.params: {self.name!r} does not take {key!r}; it accepts: {names}")
            if key == "s" or (key == "bias" and self.learn_bias) or (key == "alpha" and self.learn_alpha):
                raise ValueError(f"NormalizerSpec.params: {key!r} is not accepted here; {governed[key]}")
            if not _is_number(value):
                raise ValueError(f"NormalizerSpec.params[{key!r}] must be a number; got {value!r}")
            check_finite(key, value, where="NormalizerSpec.params")
        return tuple(sorted((key, float(value)) for key, value in items))

    def _check_applicable(self) -> None:
        def only(field: str, names: tuple[str, ...]) -> None:
            if self.name not in names:
                raise ValueError(
                    f"NormalizerSpec.{field} applies only to {', '.join(names)}; the normalizer is {self.name!r}"
                )

        if self.learn_bias:
            only("learn_bias", LOGN_NAMES)
        if self.bias_init != 0.0:
            only("bias_init", LOGN_NAMES)
        if self.learn_alpha:
            only("learn_alpha", ALPHA_NAMES)
        if self.learn_temperature:
            only("learn_temperature", TEMPERATURE_NAMES)
        if self.learn_multimax:
            only("learn_multimax", MULTIMAX_NAMES)
        if self.s_init != PAPER_S or self.train_length is not None:
            only("s_init" if self.s_init != PAPER_S else "train_length", LOGN_NAMES)
        if self.bias_init != 0.0 and not self.learn_bias:
            raise ValueError(
                "NormalizerSpec.bias_init needs learn_bias=True; a fixed bias goes in params={'bias': ...}"
            )
        if self.alpha_init != 1.5 and not self.learn_alpha:
            raise ValueError(
                "NormalizerSpec.alpha_init needs learn_alpha=True; a fixed alpha goes in params={'alpha': ...}"
            )

    def _check_s(self) -> None:
        if isinstance(self.s_init, str):
            if self.s_init not in S_INIT_RULES:
                raise ValueError(
                    f"NormalizerSpec.s_init={self.s_init!r}; accepted: a number > 0 or {', '.join(S_INIT_RULES)}"
                )
            if self.train_length is None:
                raise ValueError("NormalizerSpec.s_init='inverse_mean_log_n' needs train_length (an int >= 2)")
            inverse_mean_log_n(self.train_length)
        elif not (_is_number(self.s_init) and self.s_init > 0):
            raise ValueError(
                f"NormalizerSpec.s_init={self.s_init!r}; accepted: a number > 0 or {', '.join(S_INIT_RULES)}"
            )
        elif self.train_length is not None:
            raise ValueError("NormalizerSpec.train_length is used only with s_init='inverse_mean_log_n'")

    @property
    def fixed(self) -> dict[str, float]:
        """The fixed parameters, as a dict."""
        return dict(self.params)

    @property
    def s(self) -> float | None:
        """The initial (or fixed) s for log-n names; None otherwise."""
        if self.name not in LOGN_NAMES:
            return None
        if isinstance(self.s_init, str):
            return inverse_mean_log_n(self.train_length)
        return float(self.s_init)

    @property
    def learned(self) -> tuple[str, ...]:
        """Names of the parameters a layer learns for this spec (see the module docstring)."""
        names = []
        if self.name in LOGN_NAMES and self.learn_s:
            names.append("s")
        if self.learn_bias:
            names.append("bias")
        if self.learn_alpha:
            names.append("alpha_logit")
        if self.learn_temperature:
            names.append("log_temperature")
        if self.learn_multimax:
            names.extend(MULTIMAX_LEARNED)
        return tuple(names)

    @property
    def softmax_type(self) -> bool:
        """Whether the mapping is softmax (softmax, scaled_softmax, ssmax): weights are never exactly zero."""
        return isinstance(self.build(self.initial_params(1)).mapping, Softmax)

    def initial_params(self, num_heads: int) -> dict[str, np.ndarray]:
        """Initial values of the learned parameters, each float32 [num_heads, 1, 1]."""
        multimax = {**normalizers.parameters("multimax"), **self.fixed} if self.learn_multimax else {}
        start = {
            "s": self.s,
            "bias": self.bias_init,
            "alpha_logit": alpha_to_logit(self.alpha_init) if self.learn_alpha else None,
            "log_temperature": math.log(self.fixed.get("temperature", 1.0)) if self.learn_temperature else None,
        }
        if self.learn_multimax:
            start["multimax_b_low"], start["multimax_b_high"] = multimax["b_low"], multimax["b_high"]
            start["multimax_log_slope_low"] = math.log(multimax["slope_low"])
            start["multimax_log_slope_high"] = math.log(multimax["slope_high"])
        return {name: np.full((num_heads, 1, 1), start[name], np.float32) for name in self.learned}

    def build(self, learned: Mapping[str, Any]) -> Normalizer:
        """The Normalizer for the current values of the learned parameters (arrays [N, 1, 1])."""
        missing = sorted(set(self.learned) - set(learned))
        if missing:
            raise ValueError(f"NormalizerSpec.build: missing learned parameters {missing} for {self.name!r}")
        params: dict[str, Any] = self.fixed
        if self.name in LOGN_NAMES:
            params["s"] = learned["s"] if self.learn_s else self.s
        if self.learn_bias:
            params["bias"] = learned["bias"]
        if self.learn_alpha:
            params["alpha"] = alpha_from_logit(learned["alpha_logit"])
        if self.learn_temperature:
            params["temperature"] = jnp.exp(learned["log_temperature"])
        if self.learn_multimax:
            params["b_low"], params["b_high"] = learned["multimax_b_low"], learned["multimax_b_high"]
            params["slope_low"] = jnp.exp(learned["multimax_log_slope_low"])
            params["slope_high"] = jnp.exp(learned["multimax_log_slope_high"])
        return normalizers.get(self.name, **params)


def as_spec(normalizer: str | NormalizerSpec, where: str = "normalizer") -> NormalizerSpec:
    """A registry name or a NormalizerSpec -> a NormalizerSpec."""
    if isinstance(normalizer, NormalizerSpec):
        return normalizer
    if isinstance(normalizer, str):
        if normalizer not in normalizers.NAMES:
            raise ValueError(f"{where}={normalizer!r}; accepted names: {', '.join(normalizers.NAMES)}")
        return NormalizerSpec(name=normalizer)
    raise ValueError(
        f"{where} must be a name from attnlab.normalizers.NAMES or an attnlab.nn.NormalizerSpec; "
        f"got {type(normalizer).__name__}"
    )
