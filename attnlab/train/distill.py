"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student fits the labels and a frozen
teacher's temperature-softened predictions.

Per position, with student logits s, teacher logits t (both [V]), label y and temperature T > 0,

    p   = softmax(s)        p_T = softmax(s / T)        q_T = softmax(t / T)
    l(s) = (1 - w) CE(s, y) + w T^2 KL(q_T || p_T)
         = (1 - w) (-log p_y) + w T^2 sum_v q_T,v (log q_T,v - log p_T,v)

and its gradient with respect to the student logits (the teacher's are constants)

    dl/ds = (1 - w) (p - e_y) + w T (p_T - q_T).

The KL term's own gradient is (p_T - q_T) / T, and for T large compared with the spread of the
logits p_T - q_T ~ J (s - t) / T with J = (I - 11^T / V) / V, so it shrinks as 1 / T^2. The T^2
factor undoes that: in that limit the soft gradient is w (s - t - mean(s - t)) / V whatever T
(matching logits), so changing T changes what the teacher passes on, not how hard it pushes.

`distillation_objective(teacher, ...)` is an `attnlab.train.Objective`: inside the student's
training step it runs the teacher on batch.inputs and returns l per position, which the step
masks with batch.loss_mask and averages.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.train.step import Objective, token_losses


def _check(temperature: Any, weight: Any, where: str) -> None:
    """Raise ValueError unless temperature > 0 and 0 <= weight <= 1 (traced values pass unchecked)."""
    if not isinstance(temperature, jax.core.Tracer):
        real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
        if not real or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"{where}: temperature={temperature!r}; accepted: a finite number > 0 (1: no softening)")
    if not isinstance(weight, jax.core.Tracer):
        real = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
        if not real or not 0 <= weight <= 1:
            raise ValueError(
                f"{where}: weight={weight!r}; accepted: a number in [0, 1] (0: labels only, 1: teacher only)"
            )


def soft_target_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
    """KL(softmax(t / T) || softmax(s / T)) = sum_v q_v (log q_v - log p_v), per position.

    student_logits, teacher_logits: [..., V] -> [...], float32, >= 0 (0 when s = t + a constant).
    The teacher's logits are constants (stop_gradient); entries with q_v = 0 contribute 0.
    """
    _check(temperature, 0.0, "soft_target_kl")
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_q = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    q = jnp.exp(log_q)
    return jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=-1)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float,
    weight: float,
) -> jax.Array:
    """Per-position distillation loss (1 - w) CE(s, y) + w T^2 KL(softmax(t / T) || softmax(s / T)).

    Args:
      student_logits: [..., V], the model being trained.
      teacher_logits: [..., V], treated as constants (no gradient flows into them).
      labels: int [...], the targets, in [0, V).
      temperature: T > 0, the softening of both distributions in the KL term (1: none).
      weight: w in [0, 1], the share of the soft term (0: plain cross-entropy; 1: teacher only).

    Returns float32 [...]. The gradient with respect to student_logits is
    (1 - w) (softmax(s) - e_y) + w T (softmax(s / T) - softmax(t / T)); see the module docstring.
    Raises ValueError for temperature <= 0 or weight outside [0, 1], naming the value.
    """
    _check(temperature, weight, "distillation_loss")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student_logits {student_logits.shape} and teacher_logits "
            f"{teacher_logits.shape} must have the same shape [..., V]"
        )
    hard = token_losses(student_logits, labels)
    soft = soft_target_kl(student_logits, teacher_logits, temperature=temperature)
    return (1.0 - weight) * hard + weight * temperature**2 * soft


def distillation_objective(teacher: nnx.Module, *, temperature: float, weight: float) -> Objective:
    """The `Objective` that trains a student on `distillation_loss` against a frozen `teacher`.

    objective(student_logits [B, T, V], batch) -> [B, T]: runs teacher(batch.inputs) (same vocabulary)
    and returns distillation_loss(student_logits, teacher_logits, batch.targets). The teacher's
    state is taken now (later changes to the module are not seen) and enters the student's step as
    constants: its parameters get no gradient and no optimizer update.
    """
    _check(temperature, weight, "distillation_objective")
    graphdef, state = nnx.split(teacher)

    def objective(student_logits: jax.Array, batch: Any) -> jax.Array:
        teacher_logits = nnx.merge(graphdef, state)(batch.inputs)
        return distillation_loss(student_logits, teacher_logits, batch.targets, temperature=temperature, weight=weight)

    return objective
