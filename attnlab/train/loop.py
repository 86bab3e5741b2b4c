"""The training loop: compile, step, log, evaluate, checkpoint, resume.

`train(model, batches, config)` trains an NNX language model in place on an iterator of
`attnlab.data.Batch` and returns its history. With `checkpoint=PATH` the state is saved every
`checkpoint_every` steps and at the end; calling `train` again with the same path resumes from the
saved step, skipping the batches already used (the data iterator must be deterministic, as
`attnlab.data.train_batches` is, for the resumed run to equal an uninterrupted one).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from attnlab.train import checkpoint as checkpoints
from attnlab.train.evaluate import accumulate
from attnlab.train.mesh import host_value, make_mesh, replicated, shard_batch
from attnlab.train.optimizer import OptimizerConfig, check_count, learning_rate_schedule, make_optimizer
from attnlab.train.step import Objective, TrainState, make_eval_step, make_train_step, split_model


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long to train and how often to look.

    Fields:
      steps: optimizer steps in all (a resumed run continues to this number).
      optimizer: an `OptimizerConfig` (AdamW, schedule, clipping).
      log_every: record the mean training metrics every this many steps (each record syncs the
        device once).
      eval_every: evaluate on the validation batches every this many steps (0: only at the end).
      checkpoint_every: save the state every this many steps when a checkpoint path is given
        (0: only at the end).
    """

    steps: int = 1000
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        check_count(self.steps, "TrainConfig.steps", 1)
        check_count(self.log_every, "TrainConfig.log_every", 1)
        check_count(self.eval_every, "TrainConfig.eval_every", 0)
        check_count(self.checkpoint_every, "TrainConfig.checkpoint_every", 0)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f"TrainConfig.optimizer must be an OptimizerConfig; got {self.optimizer!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    """history: one record per log point {step, loss, accuracy, grad_norm, learning_rate,
    tokens_per_second, elapsed_seconds}, metrics averaged over the steps since the last record;
    evaluations: {step, loss, token_accuracy, sequence_accuracy, ...} per evaluation;
    compile_seconds: compiling the train step; train_seconds: stepping (compile excluded);
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


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    stacked = [{k: host_value(v) for k, v in m.items()} for m in pending]
    return {name: float(np.mean([m[name] for m in stacked])) for name in stacked[0]}


def train(
    model: nnx.Module,
    batches: Iterable[Any],
    config: TrainConfig,
    *,
    eval_batches: Callable[[], Iterable[Any]] | None = None,
    mesh: Mesh | None = None,
    checkpoint: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "train",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train `model` (updated in place) on `batches` for `config.steps` steps.

    Args:
      model: an NNX module mapping tokens [B, T] to logits [B, T, V] (e.g. `TransformerLM`).
      batches: an iterator of `attnlab.data.Batch` (inputs, targets, loss_mask), global batch
        [B, T] on one host (each host's share on several).
      eval_batches: a function returning fresh validation batches, used every eval_every steps
        and at the end.
      mesh: a "data" mesh (default: all devices); the batch is split over it.
      checkpoint: save here (atomically) and resume from here if it exists.
      metadata: JSON values saved in the checkpoint (e.g. the model config).
      progress: show a progress bar with step, loss and tokens per second.
      on_record: called with each history entry ({step, loss, ...}) as it is recorded, e.g. to
        drive a caller's own progress display (with progress=False).
      objective: the per-token training loss, objective(logits [B, T, V], batch) -> [B, T]
        (default: the model's own `token_losses`, cross-entropy for a model without one).
        Evaluation always reports the model's own loss.
    """
    mesh = make_mesh() if mesh is None else mesh
    split, params = split_model(model)
    optimizer = make_optimizer(config.optimizer, config.steps, params)
    schedule = learning_rate_schedule(config.optimizer, config.steps)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    state = jax.device_put(state, replicated(mesh))
    history: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    if checkpoint is not None and Path(checkpoint).exists():
        state, saved = checkpoints.restore(checkpoint, state)
        history, evaluations = saved.get("history", []), saved.get("evaluations", [])
        if saved.get("train_config") not in (None, config.to_json()):
            print(f"{checkpoint}: resuming with a different TrainConfig than the one saved", file=sys.stderr)
    start = int(host_value(state.step))
    train_step = make_train_step(split, optimizer, mesh, schedule, objective)
    eval_step = make_eval_step(split, mesh) if eval_batches is not None else None
    iterator: Iterator[Any] = itertools.islice(iter(batches), start, None)

    def save(state: TrainState) -> None:
        extra = {"history": history, "evaluations": evaluations, "train_config": config.to_json()}
        checkpoints.save(checkpoint, state, {**(metadata or {}), **extra})

    timing = {"compile": 0.0, "train": 0.0, "tokens": 0}
    window: dict[str, Any] = {"start": time.perf_counter(), "tokens": 0, "pending": []}

    def record(done: int) -> dict[str, Any]:
        """Average the metrics since the last record (waiting for the device) and start a new window."""
        metrics = _mean_metrics(window["pending"])
        elapsed = time.perf_counter() - window["start"]
        timing["train"] += elapsed
        timing["tokens"] += window["tokens"]
        previous = history[-1]["elapsed_seconds"] if history else 0.0
        entry = {"step": done, **metrics, "tokens_per_second": window["tokens"] / elapsed}
        history.append({**entry, "elapsed_seconds": previous + elapsed})
        window.update(start=time.perf_counter(), tokens=0, pending=[])
        return entry

    with _progress(progress) as bar:
        task = bar.add_task(description, total=config.steps, completed=start, loss="-", speed="-")
        for step in range(start, config.steps):
            try:
                batch = shard_batch(next(iterator), mesh)
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
                result = accumulate(eval_step, state.params, eval_batches(), None, mesh)
                evaluations.append({"step": done, **result.to_json()})
            if checkpoint_now:
                save(state)
            if evaluate_now or checkpoint_now:
                window["start"] = time.perf_counter()  # evaluation and saving are not training time
            bar.advance(task)
    nnx.update(model, jax.device_get(state.params))
    return TrainResult(history, evaluations, state, timing["compile"], timing["train"], timing["tokens"])
