"""The training and evaluation steps: pure functions of (state, batch), jit-compiled against a mesh.

The model is split once into its graph (static) and its parameters (a pytree); each step merges
them back inside jit, so the step is one compiled function of plain arrays:

    loss(w) = sum_{b,t} m[b,t] l(logits_w(x)[b,t], y[b,t]) / max(1, sum m)      m = loss_mask
    state' = (step + 1, w + optimizer_update(grad loss(w)), optimizer state')

The per-token loss l is the model's own (`TransformerLM.token_losses`: the loss of its output
normalizer, cross-entropy for softmax; cross-entropy for a model without one), or any
`Objective` the caller passes, e.g. a distillation loss against a teacher's logits.

The batch is split over the mesh's data x fsdp axes; parameters and optimizer state are placed by
`state_shardings` (replicated over "data", split over "fsdp" and "tensor" by logical axis: see
attnlab.train.sharding). XLA inserts the collectives (the gradient all-reduce or reduce-scatter,
the parameter all-gathers), so one device and many run the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from attnlab.train.mesh import batch_sharded, replicated
from attnlab.train.sharding import optimizer_shardings, param_shardings


class TrainState(NamedTuple):
    """step: int32 scalar (completed steps); params: the model's nnx.Param state; opt_state: optax's."""

    step: jax.Array
    params: Any
    opt_state: Any


class Model(NamedTuple):
    """A model split for pure functions: graphdef + non-parameter state (both fixed during training)."""

    graphdef: Any
    rest: Any

    def merge(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    @classmethod
    def of_graph(cls, graphdef: Any) -> Model:
        """The model of every `shareable` split with this graph (its non-parameter state is empty)."""
        return cls(graphdef, nnx.State({}))


def shareable(model: Model) -> bool:
    """Whether a program compiled for `model` serves every model of its graph (any seed): it has no
    non-parameter state, which the program would hold as constants, and its graph is hashable (a
    cache key; nnx graphs compare by structure and static attributes)."""
    if jax.tree.leaves(model.rest):
        return False
    try:
        hash(model.graphdef)
    except TypeError:
        return False
    return True


def split_model(module: nnx.Module) -> tuple[Model, Any]:
    """(Model, params): the module's graph and fixed state, and its nnx.Param state."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef, rest), params


def state_shardings(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> TrainState:
    """The shardings of a TrainState on `mesh`: the step replicated, the parameters by logical axis
    (`param_shardings`), the optimizer state as its parameters."""
    params_sharding = param_shardings(params, mesh)
    return TrainState(replicated(mesh), params_sharding, optimizer_shardings(optimizer, params, params_sharding, mesh))


def init_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """(state, shardings): a fresh TrainState (step 0, `params`, the optimizer's initial state)
    placed on `mesh` by `state_shardings`, the optimizer state initialised in place."""
    shardings = state_shardings(optimizer, params, mesh)
    params = jax.device_put(params, shardings.params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step, params, jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)), shardings


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy -log softmax(logits)[target] per position, logits [B, T, V], targets [B, T] -> [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


Objective = Callable[[jax.Array, Any], jax.Array]
"""objective(logits [B, T, V], batch) -> per-token losses [B, T] (masked and averaged by the step)."""


def model_objective(module: nnx.Module) -> Objective:
    """The module's own per-token loss (its `token_losses(logits, targets)`), or cross-entropy."""
    losses = getattr(module, "token_losses", None)
    if losses is None:
        return lambda logits, batch: token_losses(logits, batch.targets)
    return lambda logits, batch: losses(logits, batch.targets)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(values * mask) / max(1, sum(mask)), with unscored positions contributing exactly 0."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values * mask, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(
    model: Model,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    schedule: optax.Schedule | None = None,
    objective: Objective | None = None,
    shardings: TrainState | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """step(state, batch) -> (state', metrics) compiled for `mesh`; state is donated and kept on
    `shardings` (a TrainState of shardings, see `state_shardings`; default: replicated).

    metrics: loss (masked mean of the per-token loss: `objective`, default the model's own),
    accuracy (of the argmax on scored positions), grad_norm (before clipping) and learning_rate
    (used for this step), each a float32 scalar.
    """

    def loss_fn(params: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
        module = model.merge(params)
        logits = module(batch.inputs)
        per_token = (objective or model_objective(module))(logits, batch)
        loss = masked_mean(per_token, batch.loss_mask)
        correct = (jnp.argmax(logits, axis=-1) == batch.targets).astype(jnp.float32)
        return loss, masked_mean(correct, batch.loss_mask)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree_utils.tree_norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    placed = replicated(mesh) if shardings is None else shardings
    return jax.jit(
        step,
        in_shardings=(placed, batch_sharded(mesh)),
        out_shardings=(placed, replicated(mesh)),
        donate_argnums=0,
    )


def eval_sums(logits: jax.Array, batch: Any, losses: jax.Array | None = None) -> dict[str, jax.Array]:
    """The sums `make_eval_step` returns (see there), from logits [B, T, V], the batch and the
    per-token losses [B, T] (default: cross-entropy)."""
    losses = token_losses(logits, batch.targets) if losses is None else losses
    mask = batch.loss_mask.astype(jnp.float32)
    right = (jnp.argmax(logits, axis=-1) == batch.targets).astype(jnp.float32)
    scored = jnp.sum(mask, axis=1) > 0
    all_right = jnp.all((right > 0) | (mask == 0), axis=1) & scored
    return {
        "loss_sum": jnp.sum(jnp.where(mask > 0, losses, 0.0), axis=0),
        "count": jnp.sum(mask, axis=0),
        "correct": jnp.sum(right * mask, axis=0),
        "sequences": jnp.sum(scored.astype(jnp.float32)),
        "sequences_correct": jnp.sum(all_right.astype(jnp.float32)),
    }


def make_eval_step(
    model: Model, mesh: Mesh, params_sharding: Any = None
) -> Callable[[Any, Any, jax.Array], dict[str, jax.Array]]:
    """eval_step(params, batch, rope_theta) -> sums over the batch, for `evaluate` to accumulate
    (params on `params_sharding`, e.g. `state_shardings(...).params`; default: replicated):

      loss_sum [T], count [T]: sum over b of m[b,t] l[b,t], and of m[b,t]   (per position; l is the
        model's own per-token loss, see the module docstring)
      correct [T]: scored positions whose argmax is the target
      sequences, sequences_correct: examples with a scored position, and those right at every one.
    rope_theta is a traced scalar, so raising it for evaluation does not recompile.
    """

    def eval_step(params: Any, batch: Any, rope_theta: jax.Array) -> dict[str, jax.Array]:
        module = model.merge(params)
        logits = module(batch.inputs, rope_theta=rope_theta)
        return eval_sums(logits, batch, model_objective(module)(logits, batch))

    params_sharding = replicated(mesh) if params_sharding is None else params_sharding
    return jax.jit(
        eval_step,
        in_shardings=(params_sharding, batch_sharded(mesh), replicated(mesh)),
        out_shardings=replicated(mesh),
    )
