"""Training a small language model inside an experiment, for the kinds that train one per normalizer
(`length_generalization`, `needle`): the model and training settings, the loop with checkpoints
and progress, and the attention statistics of a trained model reduced over log-spaced positions.

In a config file the settings are TOML tables:

    [model]                 # ModelSetting
    layers = 4
    width = 128
    [training]              # TrainingSetting
    seq_len = 128
    steps = 300
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.experiments.checks import at_least, check, distinct, each, positive, setting
from attnlab.experiments.config import to_json
from attnlab.experiments.fingerprint import code_fingerprint
from attnlab.experiments.kind import settings_key
from attnlab.nn import ModelConfig, TransformerLM
from attnlab.normalizers import NormalizerSpec
from attnlab.train import (
    EvalResult,
    Objective,
    OptimizerConfig,
    TrainConfig,
    TrainingDiverged,
    make_mesh,
    shard_batch,
    split_model,
    train,
)
from attnlab.train.evaluate import summarize
from attnlab.train.mesh import host_value, replicated
from attnlab.train.step import Model, eval_sums, model_objective, shareable

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class ModelSetting:
    """A byte-level `TransformerLM`: layers, width, heads (head_dim = width / heads) and the RoPE base."""

    layers: int = setting(4, positive)
    width: int = setting(128, positive)
    heads: int = setting(4, positive)
    rope_theta: float = setting(10_000.0, positive)

    def relations(self) -> Iterator[str]:
        if self.width % self.heads or (self.width // self.heads) % 2:
            yield "{width} must be a multiple of {heads} with an even head_dim (RoPE)"

    def __post_init__(self):
        check(self)

    def model_config(self, normalizer: NormalizerSpec, output: Any = "softmax") -> ModelConfig:
        """The `ModelConfig` of this shape with `normalizer` in every layer and `output` as its
        output normalizer (`attnlab.losses.OutputNormalizer` or a mapping name); a setting with
        more fields (e.g. a positional encoding) extends it."""
        return ModelConfig(
            num_layers=self.layers,
            width=self.width,
            num_heads=self.heads,
            normalizer=normalizer,
            rope_theta=self.rope_theta,
            output=output,
        )

    def build(self, normalizer: NormalizerSpec, seed: int, output: Any = "softmax") -> TransformerLM:
        """A fresh model of `model_config(normalizer, output)`, initialised from `seed`."""
        return TransformerLM(self.model_config(normalizer, output), rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class TrainingSetting:
    """AdamW with warmup and cosine decay to 10%, clipping at 1, decay on matrices only.

    seq_len: the training length L (input tokens per window); batch_size windows per step;
    steps; learning_rate (peak); warmup steps; weight_decay; log_every (steps per history entry);
    checkpoint_every (steps between checkpoints, so an interrupted point resumes); seed (the
    initialisation and the data order; the same for every normalizer). The kinds that sweep
    `seeds` (length_generalization, needle, calibration, distillation, mqar) replace it with each
    point's seed, so there it has no effect.
    """

    seq_len: int = setting(128, at_least(2))
    batch_size: int = setting(16, positive)
    steps: int = setting(300, positive)
    learning_rate: float = setting(2e-3, positive)
    warmup: int = setting(30, at_least(0))
    weight_decay: float = setting(0.1, at_least(0))
    log_every: int = setting(10, positive)
    checkpoint_every: int = setting(100, positive)
    seed: int = setting(0, at_least(0))

    def relations(self) -> Iterator[str]:
        if self.warmup >= self.steps:
            yield "{warmup} must be < {steps}"

    def __post_init__(self):
        check(self)

    def train_config(self) -> TrainConfig:
        optimizer = OptimizerConfig(
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup,
            schedule="cosine",
            weight_decay=self.weight_decay,
        )
        return TrainConfig(
            steps=self.steps, optimizer=optimizer, log_every=self.log_every, checkpoint_every=self.checkpoint_every
        )


@dataclasses.dataclass(frozen=True)
class TuningSetting:
    """A learning-rate sweep per normalizer before the main run, so each is compared at its own best rate.

    learning_rates: the grid (empty: no tuning, every model trains at training.learning_rate);
    seed: the seed of the tuning models (initialisation and data order);
    steps: training steps of a tuning model (0: training.steps; then a tuning model with the
      same seed as a main point *is* that point's model at the chosen rate, restored from its
      checkpoint rather than trained twice).

    A tuning model is trained per (normalizer, rate) and scored by its validation loss (the
    kind's objective on held-out data, after training); each normalizer's main models train at
    the rate with the lowest loss, a rate whose loss is not finite never chosen. The choice is
    made on one seed and with the main run's schedule (or a shorter one): a rate chosen at the
    edge of the grid (`tuning_summary` says so) may not be the best rate.
    """

    learning_rates: tuple[float, ...] = setting((), each(positive), distinct)
    seed: int = setting(0, at_least(0))
    steps: int = setting(0, at_least(0))

    def __post_init__(self):
        check(self)

    @property
    def enabled(self) -> bool:
        return bool(self.learning_rates)


def tuning_points(tuning: TuningSetting, groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tuning points, to run before every main point: one per group (e.g. {"normalizer": label},
    or {"normalizer": label, "width": d}: each group gets its own rate) and rate."""
    return [{**group, "learning_rate": rate} for group in groups for rate in tuning.learning_rates]


def is_tuning(point: dict[str, Any]) -> bool:
    return "learning_rate" in point


def tuning_training(training: TrainingSetting, tuning: TuningSetting, learning_rate: float) -> TrainingSetting:
    """The training of a tuning model: `training` at `learning_rate`, with the tuning seed and steps."""
    steps = tuning.steps or training.steps
    if training.warmup >= steps:
        raise ValueError(f"tuning.steps = {steps} must be > training.warmup = {training.warmup}")
    return dataclasses.replace(training, learning_rate=learning_rate, seed=tuning.seed, steps=steps)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def tuning_record(trained: dict[str, Any], training: TrainingSetting) -> dict[str, Any]:
    """The record of a tuning point from `train_model`'s record (trained with eval batches):
    validation_loss (None when not finite), the last train_loss, and the seed and steps; with
    diverged_at, the step where a model trained with tolerate_divergence diverged."""
    if "validation_loss" not in trained:
        raise ValueError("a tuning model needs a validation loss: train it with eval_batches")
    diverged = {"diverged_at": trained["diverged_at"]} if "diverged_at" in trained else {}
    return {
        "record": "tuning",
        "validation_loss": _finite_or_none(trained["validation_loss"]),
        "train_loss": _finite_or_none(trained["history"][-1]["loss"]),
        "tuning_seed": training.seed,
        "steps": training.steps,
        "model_key": trained["model_key"],
        "train_seconds": trained["train_seconds"],
        **diverged,
    }


def point_training(
    training: TrainingSetting,
    tuning: TuningSetting,
    point: dict[str, Any],
    records: list[dict[str, Any]] | None,
    by: tuple[str, ...] = ("normalizer",),
) -> TrainingSetting:
    """The training of a kind's `point`: at a tuning point, `tuning_training` at its rate; at a main
    point, `main_training` with its seed and the rate chosen for its group (the point's `by` fields)."""
    if is_tuning(point):
        return tuning_training(training, tuning, point["learning_rate"])
    return main_training(training, tuning, records, {k: point[k] for k in by}, point["seed"])


# The fields of a tuning record that are not its point: the rest, less learning_rate, name its group.
TUNING_FIELDS = ("record", "validation_loss", "train_loss", "tuning_seed", "steps", "model_key", "train_seconds",
                 "point_key", "learning_rate", "diverged_at")  # fmt: skip


def tuning_groups(records: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """The fields that name a tuning record's group (e.g. ("normalizer",) or ("normalizer", "width"))."""
    first = next((r for r in records if r.get("record") == "tuning"), None)
    return () if first is None else tuple(k for k in first if k not in TUNING_FIELDS)


def tuning_summary(records: Iterable[dict[str, Any]], by: tuple[str, ...] = ("normalizer",)) -> list[dict[str, Any]]:
    """Per group of tuning records (their `by` fields, in first-seen order): the rates tried
    (ascending), their validation losses (None: not finite), the chosen rate (the lowest loss;
    None when none is finite) and whether it lies at an edge of the grid."""
    groups: dict[tuple, dict[float, float | None]] = {}
    for record in records:
        if record.get("record") == "tuning":
            groups.setdefault(tuple(record[k] for k in by), {})[record["learning_rate"]] = record["validation_loss"]
    out = []
    for group, losses in groups.items():
        rates = sorted(losses)
        finite = [rate for rate in rates if losses[rate] is not None]
        chosen = min(finite, key=lambda rate: losses[rate]) if finite else None
        out.append(
            {
                **dict(zip(by, group, strict=True)),
                "learning_rates": rates,
                "validation_loss": [losses[rate] for rate in rates],
                "chosen": chosen,
                "at_edge": chosen is not None and len(rates) > 1 and chosen in (rates[0], rates[-1]),
            }
        )
    return out


def main_training(
    training: TrainingSetting,
    tuning: TuningSetting,
    records: list[dict[str, Any]] | None,
    group: dict[str, Any],
    seed: int,
) -> TrainingSetting:
    """The training of a main point: `training` with the point's seed and, when tuning is enabled,
    the rate that the tuning records of its `group` (among `records`, the run's records so far)
    chose."""
    training = dataclasses.replace(training, seed=seed)
    if not tuning.enabled:
        return training
    if records is None:
        raise ValueError(
            f"{group}: tuning is enabled, so a main point needs the run's records (the runner passes them)"
        )
    by = tuple(group)
    entry = next((e for e in tuning_summary(records, by) if all(e[k] == v for k, v in group.items())), None)
    tried = entry["learning_rates"] if entry else []
    if tried != sorted(tuning.learning_rates):
        raise ValueError(
            f"{group}: the tuning records have rates {tried}, not the grid {sorted(tuning.learning_rates)}: "
            "the tuning points run before the main ones"
        )
    if entry["chosen"] is None:
        raise ValueError(f"{group}: no rate of {tried} gave a finite validation loss in tuning; widen the grid")
    return dataclasses.replace(training, learning_rate=entry["chosen"])


def _file_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]


# TrainingSetting fields that do not change the trained model or its record.
UNKEYED_TRAINING = ("checkpoint_every",)


def model_settings(
    model_setting: ModelSetting,
    training: TrainingSetting,
    normalizer: NormalizerSpec,
    output: Any = "softmax",
    settings: dict[str, Any] | None = None,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Everything that determines a trained model and its training record: the shape, the
    training (less `UNKEYED_TRAINING`), the normalizer (less its display label), the output, the
    evaluation period, the caller's `settings` (its data, objective and evaluation windows), and
    the code that builds and trains it (this module's fingerprint, `attnlab.experiments.fingerprint`:
    a checkpoint written by other code is not resumed)."""
    training_json = {k: v for k, v in to_json(training).items() if k not in UNKEYED_TRAINING}
    normalizer_json = {k: v for k, v in normalizer.to_json().items() if k != "label"}
    output_json = output.to_json() if hasattr(output, "to_json") else output
    return {
        "model": to_json(model_setting),
        "training": training_json,
        "normalizer": normalizer_json,
        "output": output_json,
        "eval_every": eval_every,
        "code": code_fingerprint(__name__),
        **(settings or {}),
    }


def seed_of(record: dict[str, Any]) -> int:
    """The seed of a training kind's record. Records written before these kinds swept seeds have
    none: each is seed 0 of a single-seed run (every committed config trained with seed 0)."""
    return record.get("seed", 0)


def baseline_label(specs: list[dict[str, Any]]) -> str | None:
    """The label of the first softmax normalizer among `specs` (NormalizerSpec JSON), or None:
    the group every other normalizer is compared with, paired by seed, in a summary."""
    return next((spec["label"] for spec in specs if spec["name"] == "softmax"), None)


def corpus_settings(corpus: Any, split: str = "train") -> dict[str, Any]:
    """What a model key records of a corpus split: its source and a hash of its bytes."""
    return {"source": corpus.source, "digest": corpus.digest, "split": split}


def train_model(
    model_setting: ModelSetting,
    training: TrainingSetting,
    normalizer: NormalizerSpec,
    batches: Iterable[Any],
    *,
    settings: dict[str, Any] | None = None,
    eval_batches: Callable[[], Iterable[Any]] | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
    output: Any = "softmax",
    name: str | None = None,
    objective: Objective | None = None,
    eval_every: int = 0,
    tolerate_divergence: bool = False,
) -> tuple[TransformerLM, dict[str, Any]]:
    """Build and train one model; returns it and a record of the training.

    `settings` describes what else determines the model besides its shape, training, normalizer
    and output: the data `batches` come from, the objective, the evaluation windows (JSON
    values). With `workdir`, the state is checkpointed in the folder workdir/<name>-<key>, the key
    a hash of `model_settings(...)`, every training.checkpoint_every steps: a point interrupted
    mid-training resumes from its last checkpoint, a rerun with the same settings restores the
    finished model, and any changed setting trains a new model in a new folder.
    `progress(description, completed, total)` is called at every history entry. `output` is the
    model's output normalizer (its loss is the training loss) unless `objective` replaces the
    loss (see `attnlab.train.train`). With eval_batches the model is evaluated at the end and,
    with eval_every > 0, every eval_every steps too.

    The record: model_key, parameters, history (one entry per log_every steps: step, loss,
    accuracy, grad_norm, learning_rate, tokens_per_second, elapsed_seconds), validation_loss
    (when eval_batches is given) and evaluations (each evaluation: step, loss, token_accuracy,
    ...; see `attnlab.train.EvalResult.to_json`), train_seconds and tokens_per_second (stepping
    time over the whole training, across resumptions, compiling excluded), compile_seconds
    (compiling the train step in this call: 0 when the checkpoint was already finished),
    wall_seconds (this call).

    With tolerate_divergence (a tuning model: a rate too high for the model is a result, not a
    failure) a training that diverges returns the model at its last finite checkpoint and a record
    of model_key, parameters, diverged_at (the step), history (that step's loss and grad_norm) and
    a NaN validation_loss; otherwise `TrainingDiverged` stops the run.
    """
    started = time.perf_counter()
    model = model_setting.build(normalizer, training.seed, output)
    name = normalizer.label if name is None else name
    determined = model_settings(model_setting, training, normalizer, output, settings, eval_every)
    key = settings_key(determined)
    checkpoint = None if workdir is None else Path(workdir) / f"{_file_name(name)}-{key}"

    def report(entry: dict[str, Any]) -> None:
        if progress is not None:
            progress(f"training {name}: loss {entry['loss']:.3f}", entry["step"], training.steps)

    config = training.train_config()
    if eval_every:
        config = dataclasses.replace(config, eval_every=eval_every)
    try:
        result = train(
            model,
            batches,
            config,
            eval_batches=eval_batches,
            checkpoint=checkpoint,
            metadata={"settings": determined, "model_config": model.config.to_json()},
            progress=False,
            name=name,
            on_record=report,
            objective=objective,
            global_batches=True,
        )
    except TrainingDiverged as error:
        if not tolerate_divergence:
            raise
        record = {
            "model_key": key,
            "parameters": model.num_params(),
            "diverged_at": error.step,
            "history": [{"step": error.step, "loss": error.loss, "grad_norm": error.grad_norm}],
            "validation_loss": float("nan"),
            "train_seconds": None,
            "wall_seconds": time.perf_counter() - started,
        }
        return model, record
    # Over the whole training, resumed runs included: the history's elapsed time is training only.
    train_seconds = result.history[-1]["elapsed_seconds"]
    tokens = training.steps * training.batch_size * training.seq_len
    record = {
        "model_key": key,
        "parameters": model.num_params(),
        "history": result.history,
        "tokens_per_second": tokens / train_seconds,
        "compile_seconds": result.compile_seconds,
        "train_seconds": train_seconds,
    }
    if result.evaluations:
        record["validation_loss"] = result.evaluations[-1]["loss"]
        record["evaluations"] = result.evaluations
    record["wall_seconds"] = time.perf_counter() - started
    return model, record


def position_bins(length: int, num: int) -> np.ndarray:
    """Edges e_0 = 0 < e_1 < ... < e_k = length of about `num` log-spaced bins of query positions:
    position t (row length t + 1) falls in bin i when e_i <= t < e_{i+1}. Short rows get bins of one."""
    edges = np.unique(np.round(np.geomspace(1, length + 1, num + 1)).astype(int) - 1)
    return np.concatenate([edges[edges < length], [length]])


def bin_positions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of values [..., T] over each position bin -> [..., len(edges) - 1]."""
    return np.stack([values[..., a:b].mean(axis=-1) for a, b in itertools.pairwise(edges)], axis=-1)


def _probe_forward(split: Model) -> Callable:
    """forward(params, batch, theta, keys) -> (eval sums, attention statistics), jitted."""

    def forward(params: Any, batch: Any, theta: jax.Array, keys: jax.Array | None) -> tuple[Any, Any]:
        module = split.merge(params)
        logits, stats = module(batch.inputs, rope_theta=theta, statistics=True, mass_keys=keys)
        return eval_sums(logits, batch, model_objective(module)(logits, batch)), stats

    return jax.jit(forward)


@functools.lru_cache(maxsize=16)
def _shared_probe_forward(graphdef: Any) -> Callable:
    """The forward of every model with this graph and no non-parameter state (any seed): compiled once."""
    return _probe_forward(Model.of_graph(graphdef))


class Probe:
    """Measures one trained model on batches: the loss and accuracies of `attnlab.train.evaluate`
    and the attention statistics, from one forward pass per batch, compiled once per input shape
    and model structure (the RoPE base is a traced argument, so changing it does not recompile;
    another seed of the same model reuses the compiled pass)."""

    def __init__(self, model: TransformerLM):
        self.split, self.params = split_model(model)
        self.placed: dict[int, tuple[Any, Any]] = {}  # batch size -> (mesh, parameters on it)
        self.rope_theta = model.config.rope_theta
        shared = shareable(self.split)
        self._forward = _shared_probe_forward(self.split.graphdef) if shared else _probe_forward(self.split)

    def _placed(self, batch_size: int) -> tuple[Any, Any]:
        """The mesh for batches of `batch_size` (the default mesh, as many devices as the batch
        divides over) and the parameters replicated on it, made once per batch size."""
        if batch_size not in self.placed:
            mesh = make_mesh(batch_size=batch_size)
            self.placed[batch_size] = (mesh, jax.device_put(self.params, replicated(mesh)))
        return self.placed[batch_size]

    def measure(
        self, batches: Iterable[Any], *, rope_theta: float | None = None, needle: bool = False
    ) -> tuple[EvalResult, dict[str, np.ndarray]]:
        """(EvalResult, statistics) on `batches` of `attnlab.data.Batch`. The statistics are float64
        [L, B, N, T] per name (max_weight, entropy, support_size; key_mass, the weight on each
        batch's needle_mask positions, with needle=True), B counting every window."""
        theta = jnp.float32(self.rope_theta if rope_theta is None else rope_theta)
        totals: dict[str, Any] = {}
        parts = []
        for batch in batches:
            mesh, params = self._placed(batch.inputs.shape[0])
            # every process builds the whole batch (global_batch): each device takes its rows
            keys = shard_batch(batch.needle_mask, mesh, global_batch=True) if needle else None
            sums, stats = self._forward(params, shard_batch(batch, mesh, global_batch=True), theta, keys)
            totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
            parts.append({name: host_value(value).astype(np.float64) for name, value in stats.items()})
        stats = {name: np.concatenate([p[name] for p in parts], axis=1) for name in parts[0]} if parts else {}
        return summarize(totals, len(parts)), stats


def learned_parameters(model: TransformerLM) -> dict[str, list[list[float]]]:
    """The learned normalizer parameters of every layer, [layer][head], in their natural units
    (alpha, not its logit; a temperature, not its log), named as the normalizer's parameters."""
    out: dict[str, list[list[float]]] = {}
    for block in model.blocks:
        learned = block.attention.normalizer
        stored = {name: getattr(learned, name)[...] for name in learned.spec.learned}
        for name, value in learned.spec.learned_values(stored).items():
            out.setdefault(name, []).append(np.asarray(value, np.float64).reshape(-1).tolist())
    return out
