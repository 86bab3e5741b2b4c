"""Evaluation: mean loss, loss per position (length generalisation), and task accuracy.

For batches of windows [B, T] with scored positions m[b, t]:

    loss               = sum_{b,t} m CE / sum_{b,t} m
    per_position_loss  [T] = sum_b m[b,t] CE[b,t] / sum_b m[b,t]      (NaN where nothing is scored)
    token_accuracy     = scored positions whose argmax is the target / scored positions
    sequence_accuracy  = examples right at every scored position / examples with a scored position

Evaluating windows longer than the training length measures length generalisation; `rope_theta`
raises the rotary base for that call only (the SSMax paper uses 50x the training base).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from attnlab.train.mesh import MeshConfig, host_value, make_mesh, shard_batch
from attnlab.train.sharding import param_shardings
from attnlab.train.step import make_eval_step, split_model

SUMMED = ("loss_sum", "count", "correct", "sequences", "sequences_correct")


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `evaluate` measured; see the module docstring. per_position_loss is float64 [T]."""

    loss: float
    per_position_loss: np.ndarray
    token_accuracy: float
    sequence_accuracy: float
    scored_tokens: int
    batches: int

    def to_json(self, *, per_position: bool = False) -> dict[str, Any]:
        """Plain JSON values (the per-position curve only when asked: it has T entries)."""
        out = {
            "loss": self.loss,
            "token_accuracy": self.token_accuracy,
            "sequence_accuracy": self.sequence_accuracy,
            "scored_tokens": self.scored_tokens,
            "batches": self.batches,
        }
        if per_position:
            out["per_position_loss"] = [None if np.isnan(x) else float(x) for x in self.per_position_loss]
        return out


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def accumulate(
    eval_step: Callable, params: Any, batches: Iterable[Any], rope_theta: Any, mesh: Mesh, global_batches: bool = False
) -> EvalResult:
    """Run a compiled `make_eval_step` over `batches` (see `shard_batch` for global_batches) and
    reduce the sums into an EvalResult."""
    totals: dict[str, Any] = {}
    theta = None if rope_theta is None else jnp.asarray(rope_theta, jnp.float32)
    count = 0
    for batch in batches:
        sums = eval_step(params, shard_batch(batch, mesh, global_batch=global_batches), theta)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        count += 1
    return summarize(totals, count)


def summarize(totals: dict[str, Any], batches: int) -> EvalResult:
    """An EvalResult from the sums of `make_eval_step` (`eval_sums`) added over `batches` batches."""
    if not batches:
        raise ValueError("evaluate: the evaluation batches are empty (no window fits; see the data's seq_len)")
    totals = {name: host_value(value).astype(np.float64) for name, value in totals.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        per_position = np.where(totals["count"] > 0, totals["loss_sum"] / totals["count"], np.nan)
    scored = totals["count"].sum()
    return EvalResult(
        loss=_ratio(totals["loss_sum"].sum(), scored),
        per_position_loss=per_position,
        token_accuracy=_ratio(totals["correct"].sum(), scored),
        sequence_accuracy=_ratio(totals["sequences_correct"], totals["sequences"]),
        scored_tokens=int(scored),
        batches=batches,
    )


def evaluate(
    module: nnx.Module,
    batches: Iterable[Any],
    *,
    rope_theta: float | None = None,
    mesh: Mesh | MeshConfig | None = None,
    global_batches: bool = False,
) -> EvalResult:
    """Evaluate a language model (e.g. `attnlab.nn.TransformerLM`) on batches of `attnlab.data.Batch`.

    rope_theta: the RoPE base for this evaluation (default: the one each layer was built with).
    mesh: split each batch over these devices, the parameters as in training (a mesh, or a
      `MeshConfig` to make one for the first batch's size; default: every device on the data axis).
    global_batches: every process passes the whole global batches (see `shard_batch`); default:
      each passes its share.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return summarize({}, 0)  # the error for no batches
    if not isinstance(mesh, Mesh):
        processes = 1 if global_batches else jax.process_count()
        mesh = make_mesh(mesh, batch_size=jax.tree.leaves(first)[0].shape[0] * processes)
    model, params = split_model(module)
    sharding = param_shardings(params, mesh)
    params = jax.device_put(params, sharding)
    step = make_eval_step(model, mesh, sharding)
    return accumulate(step, params, itertools.chain([first], batches), rope_theta, mesh, global_batches)
