"""The optimizer: AdamW with warmup, constant or cosine decay, decay on matrices only, clipping.

    lr(t) = peak * t / warmup                                   t < warmup
          = peak                                                constant schedule
          = peak * (f + (1 - f) (1 + cos(pi u)) / 2),  u = (t - warmup) / (steps - warmup)   cosine
    update = -lr(t) * (adam(clip(g)) + weight_decay * w * [w is a kernel or an embedding])

Weight decay applies only to the matrices of the model (`kernel`, `embedding`); norms' scales,
biases and the learned normalizer parameters (SSMax's s and bias, entmax's alpha, temperatures)
are not decayed, so decay cannot pull s toward 0 (which would turn SSMax into uniform attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine")
DECAYED_NAMES = ("kernel", "embedding")


def check_count(value: Any, name: str, low: int) -> None:
    """ValueError naming `name` unless value is an int >= low (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def _number(value: Any, field: str, low: float, high: float | None = None, *, closed_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if closed_low else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if closed_low else '>'} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"OptimizerConfig.{field} must be a number {bound}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings (see the module docstring for the schedule).

    Fields:
      learning_rate: the peak learning rate.
      warmup_steps: linear warmup from 0 to the peak.
      schedule: "cosine" (decay to final_fraction * peak at the last step) or "constant".
      final_fraction: the cosine schedule's floor, as a fraction of the peak.
      weight_decay: decoupled decay, on kernels and embeddings only.
      b1, b2, eps: Adam's moments and epsilon.
      clip_norm: clip the global gradient norm to this (None: no clipping).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    final_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        _number(self.learning_rate, "learning_rate", 0.0, closed_low=False)
        check_count(self.warmup_steps, "OptimizerConfig.warmup_steps", 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; accepted: {', '.join(SCHEDULES)}")
        _number(self.final_fraction, "final_fraction", 0.0, 1.0)
        _number(self.weight_decay, "weight_decay", 0.0)
        _number(self.b1, "b1", 0.0, 1.0)
        _number(self.b2, "b2", 0.0, 1.0)
        _number(self.eps, "eps", 0.0, closed_low=False)
        if self.clip_norm is not None:
            _number(self.clip_norm, "clip_norm", 0.0, closed_low=False)

    @classmethod
    def ssmax_paper(cls, steps: int) -> OptimizerConfig:
        """The SSMax paper's recipe (AdamW b=(0.9, 0.95), lr 6e-4, weight decay 0.1, clip 1.0, warmup
        1000 steps) at small scale: warmup is min(1000, steps // 10) so a short run still decays.
        The paper does not state its decay; cosine to 10% is assumed here (as in nanoGPT)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"OptimizerConfig.ssmax_paper: steps must be an int >= 1; got {steps!r}")
        return cls(learning_rate=6e-4, warmup_steps=min(1000, steps // 10), weight_decay=0.1, clip_norm=1.0)


PRESETS = {"ssmax_paper": OptimizerConfig.ssmax_paper}


def learning_rate_schedule(config: OptimizerConfig, steps: int) -> optax.Schedule:
    """lr(t) for t = 0 .. steps - 1 (see the module docstring)."""
    warmup = min(config.warmup_steps, steps)
    if config.schedule == "constant" or steps <= warmup:
        decay = optax.constant_schedule(config.learning_rate)
    else:
        decay = optax.cosine_decay_schedule(config.learning_rate, steps - warmup, alpha=config.final_fraction)
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def _leaf_name(path: tuple) -> str:
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params: Any) -> Any:
    """True for the leaves named `kernel` or `embedding` (the matrices), False elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in DECAYED_NAMES, params)


def make_optimizer(config: OptimizerConfig, steps: int, params: Any) -> optax.GradientTransformation:
    """clip_by_global_norm (if set) then AdamW with the schedule, decaying `decay_mask(params)`."""
    adamw = optax.adamw(
        learning_rate_schedule(config, steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask(params),
    )
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
