"""The training loop: compile, step, log, evaluate, checkpoint, resume.

`train(model, batches, config)` trains an NNX language model in place on an iterator of
`attnlab.data.Batch` and returns its history. With `checkpoint=FOLDER` the state is saved (with
orbax, see `attnlab.train.checkpoint`) every `checkpoint_every` steps and at the end, keeping the
last `keep_checkpoints`; calling `train` again with the same folder resumes from the newest saved
step, skipping the batches it had consumed (its saved data position; the data iterator must be
deterministic, as `attnlab.data.train_batches` is, for the resumed run to equal an uninterrupted one).

A non-finite loss or gradient norm stops training with `TrainingDiverged`, naming the model, the
step and the values; it is checked at every history record (each syncs the device anyway), so a
diverged state is never saved.

The compiled steps are reused: a model of the same structure (its nnx graph: the same config, any
seed), trained with the same optimizer settings, step count and mesh and its own loss as one
trained before in this process, gets that model's compiled train and eval steps instead of compiling
them again (a sweep over seeds compiles once per normalizer). The compiled program depends on
nothing else: the parameters and the optimizer state are its arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from attnlab.train import checkpoint as checkpoints
from attnlab.train.evaluate import accumulate
from attnlab.train.mesh import MeshConfig, batch_devices, host_value, make_mesh, shard_batch
from attnlab.train.optimizer import OptimizerConfig, check_count, decay_mask, learning_rate_schedule, make_optimizer
from attnlab.train.step import (
    Model,
    Objective,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    shareable,
    split_model,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long to train and how often to look.

    Fields:
      steps: optimizer steps in all (a resumed run continues to this number).
      optimizer: an `OptimizerConfig` (AdamW, schedule, clipping).
      log_every: record the mean training metrics every this many steps (each record syncs the
        device once).
      eval_every: evaluate on the validation batches every this many steps (0: only at the end).
      checkpoint_every: save the state every this many steps when a checkpoint folder is given
        (0: only at the end).
      keep_checkpoints: the newest saves kept in the checkpoint folder (older ones are deleted).
    """

    steps: int = 1000
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        check_count(self.steps, "TrainConfig.steps", 1)
        check_count(self.log_every, "TrainConfig.log_every", 1)
        check_count(self.eval_every, "TrainConfig.eval_every", 0)
        check_count(self.checkpoint_every, "TrainConfig.checkpoint_every", 0)
        check_count(self.keep_checkpoints, "TrainConfig.keep_checkpoints", 1)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f"TrainConfig.optimizer must be an OptimizerConfig; got {self.optimizer!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss or gradient norm at `step` (1-based, as in the history)."""

    def __init__(self, message: str, *, step: int, loss: float, grad_norm: float):
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


@dataclasses.dataclass
class TrainResult:
    """history: one record per log point {step, loss, accuracy, grad_norm, learning_rate,
    tokens_per_second, elapsed_seconds}, metrics averaged over the steps since the last record;
    evaluations: {step, loss, token_accuracy, sequence_accuracy, ...} per evaluation;
    compile_seconds: compiling the train step (about 0 when reused, see the module docstring);
    train_seconds: stepping (compile excluded);
    tokens: input tokens consumed by the steps of this call."""

    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    state: TrainState
    compile_seconds: float
    train_seconds: float
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _every(done: int, period: int) -> bool:
    return period > 0 and done % period == 0


def _host_metrics(pending: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
    """Each step's metrics as floats (waits for the device)."""
    return [{name: float(host_value(value)) for name, value in metrics.items()} for metrics in pending]


def _mean_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([m[name] for m in steps])) for name in steps[0]}


def _diverged(
    name: str, step: int, loss: float, grad_norm: float, optimizer: OptimizerConfig, found: str = ""
) -> TrainingDiverged:
    """The error for a model that diverged at `step` (`found`: what else was not finite)."""
    return TrainingDiverged(
        f"training {name!r} diverged at step {step}: {found}loss = {loss}, grad_norm = {grad_norm}; lower the "
        f"learning rate ({optimizer.learning_rate}), lengthen the warmup ({optimizer.warmup_steps} steps) "
        f"or clip the gradients (clip_norm = {optimizer.clip_norm})",
        step=step,
        loss=loss,
        grad_norm=grad_norm,
    )


def _divergence(name: str, steps: list[dict[str, float]], first: int, config: TrainConfig) -> TrainingDiverged | None:
    """The error for the first of `steps` (numbered from `first`) whose loss or grad_norm is NaN or inf."""
    for step, metrics in enumerate(steps, start=first):
        loss, grad_norm = metrics["loss"], metrics["grad_norm"]
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            return _diverged(name, step, loss, grad_norm, config.optimizer)
    return None


def _data_position(saved: dict[str, Any], folder: str | Path) -> int:
    """The batches consumed when the checkpoint was saved (its metadata's data_position)."""
    position = saved.get("data_position")
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise checkpoints.CheckpointError(
            f"checkpoint folder {str(folder)!r} has no valid data_position (an int >= 0; got {position!r}): "
            "it was not saved by attnlab.train.train; delete it to train anew"
        )
    return position


def _data_digest(batches: Iterable[Any], global_batches: bool) -> str:
    """A hash of validation batches (each leaf's dtype, shape and bytes, in order): what a
    checkpoint's saved evaluations were measured on. With per-process shares on several processes,
    the hash of every process's hash, so that all processes agree (a collective: all must call it)."""
    hasher = hashlib.blake2b(digest_size=8)
    for batch in batches:
        for leaf in jax.tree.leaves(batch):
            array = np.ascontiguousarray(leaf)
            hasher.update(f"{array.dtype}{array.shape}".encode())
            hasher.update(array.tobytes())
    if global_batches or jax.process_count() == 1:
        return hasher.hexdigest()
    from jax.experimental import multihost_utils

    everyone = np.asarray(multihost_utils.process_allgather(np.frombuffer(hasher.digest(), np.uint8)))
    return hashlib.blake2b(everyone.tobytes(), digest_size=8).hexdigest()


def _mesh_for(mesh: Mesh | MeshConfig | None, batch_size: int) -> Mesh:
    """The mesh to train on for a global batch of `batch_size` rows: `mesh` itself, checked (a
    ValueError when the batch does not divide over its batch axes), or one made from a MeshConfig."""
    if mesh is None or isinstance(mesh, MeshConfig):
        return make_mesh(mesh, batch_size=batch_size)
    if batch_size % batch_devices(mesh):
        raise ValueError(
            f"train: the batch size {batch_size} must be a multiple of the {batch_devices(mesh)} ways the mesh "
            f"{dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))} splits it (data x fsdp)"
        )
    return mesh


class _Key:
    """A pytree as a cache key: equal when its structure and its (hashable) leaves are equal."""

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple(leaves))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)


@functools.lru_cache(maxsize=16)
def _optimizer(config: OptimizerConfig, steps: int, mask: _Key) -> tuple[Any, Any]:
    """(optimizer, schedule): `make_optimizer` decaying `mask`, and its learning-rate schedule; one
    object per settings, so the steps compiled with it can be reused."""
    return make_optimizer(config, steps, mask.tree), learning_rate_schedule(config, steps)


@functools.lru_cache(maxsize=16)
def _compiled_steps(graphdef, optimizer, mesh, schedule, shardings: _Key) -> tuple[Any, Any]:
    model = Model.of_graph(graphdef)
    train_step = make_train_step(model, optimizer, mesh, schedule, None, shardings.tree)
    return train_step, make_eval_step(model, mesh, shardings.tree.params)


def _steps(model: Model, optimizer, mesh, schedule, objective, shardings: _Key) -> tuple[Any, Any]:
    """(train_step, eval_step) for `model`: the ones compiled for a model of the same graph and
    settings if any (see the module docstring). Built anew, and not kept, for a model that is not
    `shareable` or with a caller's objective (a new function per call, which may hold a teacher)."""
    if objective is not None or not shareable(model):
        return (
            make_train_step(model, optimizer, mesh, schedule, objective, shardings.tree),
            make_eval_step(model, mesh, shardings.tree.params),
        )
    return _compiled_steps(model.graphdef, optimizer, mesh, schedule, shardings)


def train(
    model: nnx.Module,
    batches: Iterable[Any],
    config: TrainConfig,
    *,
    eval_batches: Callable[[], Iterable[Any]] | None = None,
    mesh: Mesh | MeshConfig | None = None,
    checkpoint: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    name: str = "model",
    description: str = "train",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    objective: Objective | None = None,
    global_batches: bool = False,
) -> TrainResult:
    """Train `model` (updated in place) on `batches` for `config.steps` steps.

    Args:
      model: an NNX module mapping tokens [B, T] to logits [B, T, V] (e.g. `TransformerLM`).
      batches: an iterator of `attnlab.data.Batch` (inputs, targets, loss_mask), global batch
        [B, T] on one host (each host's share on several).
      eval_batches: a function returning fresh validation batches, used every eval_every steps
        and at the end. A checkpoint keeps its evaluations with a hash of the batches they were
        measured on: restored with other eval_batches, it drops them (a message on stderr) and
        evaluates again, and a finished checkpoint saved without a final evaluation (its model
        trained with no eval_batches) is evaluated on them once restored. (Evaluations saved by
        attnlab before the hash was kept are trusted as they are.)
      mesh: a device mesh (`make_mesh`), or a `MeshConfig` to make one for the batch size
        (default: `MeshConfig()`, every device on the data axis, as many as the batch divides over);
        the batch is split over its data x fsdp axes, the state placed by `state_shardings`.
      checkpoint: a folder: save the state there (atomically, keeping the last
        config.keep_checkpoints) and resume from its newest step if it holds one.
      metadata: JSON values saved in the checkpoint (e.g. the model config). Its "settings", if
        given, must equal those of the checkpoint resumed (else CheckpointError).
      progress: show a progress bar with step, loss and tokens per second.
      name: the model's name in a `TrainingDiverged` message.
      on_record: called with each history entry ({step, loss, ...}) as it is recorded, e.g. to
        drive a caller's own progress display (with progress=False).
      objective: the per-token training loss, objective(logits [B, T, V], batch) -> [B, T]
        (default: the model's own `token_losses`, cross-entropy for a model without one).
        Evaluation always reports the model's own loss.
      global_batches: every process passes the whole global batches and each device takes its
        rows (as the experiment kinds do); default: each process passes its share (see
        `shard_batch`). The same for eval_batches.

    Raises:
      TrainingDiverged: a loss or gradient norm became NaN or inf (the checkpoint keeps the last
        finite state).
      CheckpointError: the checkpoint folder is unreadable, made with other settings or for
        another model, or holds NaN/inf.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("train: the batches are empty")
    batches = itertools.chain([first], batches)
    mesh = _mesh_for(mesh, jax.tree.leaves(first)[0].shape[0] * (1 if global_batches else jax.process_count()))
    split, params = split_model(model)
    optimizer, schedule = _optimizer(config.optimizer, config.steps, _Key(decay_mask(params)))
    state, shardings = init_state(optimizer, params, mesh)
    history: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    position = 0  # batches consumed before this call
    saving = checkpoint is not None
    current_data = _data_digest(eval_batches(), global_batches) if saving and eval_batches is not None else None
    evaluated_on: str | None = None  # the hash of the data the evaluations were measured on
    if saving and checkpoints.latest_step(checkpoint) is not None:
        state, saved = checkpoints.restore(checkpoint, state, settings=(metadata or {}).get("settings"))
        history, evaluations = saved.get("history", []), saved.get("evaluations", [])
        evaluated_on = saved.get("eval_data_digest")
        position = _data_position(saved, checkpoint)
        if saved.get("train_config") not in (None, config.to_json()):
            print(f"{checkpoint}: resuming with a different TrainConfig than the one saved", file=sys.stderr)
        if evaluations and eval_batches is not None and evaluated_on not in (None, current_data):
            print(
                f"{checkpoint}: its evaluations were measured on other validation data; evaluating again",
                file=sys.stderr,
            )
            evaluations = []
    if current_data is not None:
        evaluated_on = current_data
    start = int(host_value(state.step))
    train_step, eval_step = _steps(split, optimizer, mesh, schedule, objective, _Key(shardings))
    eval_step = eval_step if eval_batches is not None else None
    iterator: Iterator[Any] = itertools.islice(batches, position, None)

    def save(state: TrainState, done: int) -> None:
        bad = checkpoints.first_nonfinite(state)
        if bad is not None:  # finite metrics but an update that overflowed
            last = history[-1]
            found = f"{bad} holds NaN or inf after a step with "
            raise _diverged(name, done, last["loss"], last["grad_norm"], config.optimizer, found)
        extra = {
            "history": history,
            "evaluations": evaluations,
            "eval_data_digest": evaluated_on,
            "train_config": config.to_json(),
            "data_position": position + done - start,
        }
        checkpoints.save(checkpoint, state, {**(metadata or {}), **extra}, keep=config.keep_checkpoints)

    def evaluate_at(state: TrainState, done: int) -> None:
        result = accumulate(eval_step, state.params, eval_batches(), None, mesh, global_batches)
        evaluations.append({"step": done, **result.to_json()})

    timing = {"compile": 0.0, "train": 0.0, "tokens": 0}
    window: dict[str, Any] = {"start": time.perf_counter(), "tokens": 0, "pending": []}

    def record(done: int) -> dict[str, Any]:
        """Average the metrics since the last record (waiting for the device) and start a new window;
        TrainingDiverged if a step's loss or gradient norm in the window is not finite."""
        steps = _host_metrics(window["pending"])
        diverged = _divergence(name, steps, done - len(steps) + 1, config)
        if diverged is not None:
            raise diverged
        metrics = _mean_metrics(steps)
        elapsed = time.perf_counter() - window["start"]
        timing["train"] += elapsed
        timing["tokens"] += window["tokens"]
        previous = history[-1]["elapsed_seconds"] if history else 0.0
        entry = {"step": done, **metrics, "tokens_per_second": window["tokens"] / elapsed}
        history.append({**entry, "elapsed_seconds": previous + elapsed})
        window.update(start=time.perf_counter(), tokens=0, pending=[])
        return entry

    with _progress(progress and jax.process_index() == 0) as bar:
        task = bar.add_task(description, total=config.steps, completed=start, loss="-", speed="-")
        for step in range(start, config.steps):
            try:
                batch = shard_batch(next(iterator), mesh, global_batch=global_batches)
            except StopIteration:
                raise ValueError(f"train: the batches ran out after {step} of {config.steps} steps") from None
            if step == start:
                began = time.perf_counter()
                train_step = train_step.lower(state, batch).compile()
                timing["compile"] = time.perf_counter() - began
                window["start"] = time.perf_counter()
            state, metrics = train_step(state, batch)
            window["pending"].append(metrics)
            window["tokens"] += batch.inputs.size
            done = step + 1
            last = done == config.steps
            evaluate_now = eval_step is not None and (last or _every(done, config.eval_every))
            checkpoint_now = checkpoint is not None and (last or _every(done, config.checkpoint_every))
            if last or evaluate_now or checkpoint_now or _every(done, config.log_every):
                entry = record(done)
                bar.update(task, loss=f"{entry['loss']:.3f}", speed=f"{entry['tokens_per_second']:,.0f}")
                if on_record is not None:
                    on_record(entry)
            if evaluate_now:
                evaluate_at(state, done)
            if checkpoint_now:
                save(state, done)
            if evaluate_now or checkpoint_now:
                window["start"] = time.perf_counter()  # evaluation and saving are not training time
            bar.advance(task)
    if eval_step is not None and not any(e["step"] == config.steps for e in evaluations):
        evaluate_at(state, config.steps)  # restored finished, from a training that did not evaluate at its end
    nnx.update(model, jax.tree.map(host_value, state.params))
    return TrainResult(history, evaluations, state, timing["compile"], timing["train"], timing["tokens"])
