"""Sparsity of attention rows: exact zeros and support size vs row length n and logit scale.

For each normalizer, p = normalizer(c z, where=valid) on rows z with n valid entries, and per row

    zero_fraction = #{i valid : p_i = 0} / n,   support_size = #{i : p_i > 0},   max_weight = max_i p_i

averaged (mean and population std) over the rows of a sweep point. Two inputs:
  (a) "synthetic": rows of i.i.d. N(0, c^2) logits, c in `scales`, for each n in `lengths`,
      `seeds` rows; the same standard-normal rows (drawn from fold_in(seed, n)) for every
      normalizer and every scale, so a change with c or with the normalizer is not sampling noise.
  (b) "model": real pre-normalizer attention logits. A small softmax `TransformerLM` of shape
      `model` (`lm.ModelSetting`) is trained with `lm.train_model` as `training`
      (`lm.TrainingSetting`: training.steps steps on training.seq_len-byte windows of the default
      corpus, Python's stdlib source; training.seed sets the initialisation and the data order),
      then :func:`attnlab.nn.inspect.attention_logits` gives each layer's q.k / sqrt(d) (after
      RoPE) on `model_windows` validation windows of training.seq_len bytes. Causal row t has
      n = t + 1 valid keys; at `model_positions` log-spaced n in [1, training.seq_len], each
      normalizer is applied to c times those rows (c in `model_scales`), averaging over windows and
      heads, per layer.
The model is trained once per process per model setup (`trained_model` is cached, and it is not
checkpointed), so the points of every normalizer share it; a resumed run retrains it identically
from training.seed.

In a config file the model and its training are the `[model]` and `[training]` tables, as in the
other kinds that train a model (a table given replaces this kind's defaults, so list every key):

    [model]
    layers = 3
    width = 96
    heads = 4
    [training]
    seq_len = 256
    steps = 250

Records (one per normalizer x input x n x scale, and x layer for the model): input, normalizer
(label), n (valid keys in the row), scale (c), layer (0-based; None for synthetic), rows (rows
averaged), zero_fraction, support_size, max_weight and each one's population std `<key>_std`
over those rows; model records also carry model_train_loss (the final training history entry's
loss: the mean over the last training.log_every steps) and model_validation_loss (on the
inspected windows), both in nats per byte.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.data import Batch, eval_batches, load_corpus, train_batches
from attnlab.experiments import lm
from attnlab.experiments.checks import at_least, check, distinct, each, nonempty, one_of, positive, setting
from attnlab.experiments.config import Lengths
from attnlab.experiments.kind import Kind
from attnlab.nn import TransformerLM
from attnlab.nn.inspect import attention_logits
from attnlab.normalizers import Normalizer, NormalizerSpec, stats
from attnlab.train.step import token_losses

INPUTS = ("synthetic", "model")
SOFTMAX = NormalizerSpec("softmax")
CACHE_SIZE = 2


def default_model() -> lm.ModelSetting:
    return lm.ModelSetting(layers=3, width=96, heads=4)


def default_training() -> lm.TrainingSetting:
    return lm.TrainingSetting(
        seq_len=256, batch_size=16, steps=250, learning_rate=3e-3, warmup=25, log_every=25, checkpoint_every=250
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Sweep of row length and logit scale for each normalizer, on synthetic and trained-model rows.

    normalizers, lengths, scales, seeds (rows per point), seed: the sweep and the synthetic rows;
    inputs: which of "synthetic", "model" to run; model, training: the softmax LM whose rows are
    inspected (`lm.ModelSetting`, `lm.TrainingSetting`; checkpoint_every is unused, the model is
    not checkpointed); model_windows: validation windows inspected; model_positions: about this
    many log-spaced row lengths; model_scales: the logit scales c applied to the model's rows.
    """

    normalizers: tuple[NormalizerSpec, ...] = (
        NormalizerSpec("softmax"),
        NormalizerSpec("sparsemax"),
        NormalizerSpec("entmax15"),
        NormalizerSpec("entmax", {"alpha": 1.3}, label="entmax α=1.3"),
        NormalizerSpec("logn_sparsemax"),
        NormalizerSpec("logn_entmax15"),
        *(
            NormalizerSpec(name)
            for name in (
                "softmax1",
                "sigmoid",
                "stablemax",
                "softpick",
                "multimax",
                "llama4_softmax",
                "llama4_entmax15",
                "qwen_softmax",
                "critical_softmax",
                "asentmax",
                "sink_softmax",
                "stick_breaking",
            )
        ),
    )
    inputs: tuple[str, ...] = setting(INPUTS, nonempty, each(one_of(INPUTS)), distinct)
    lengths: Lengths = dataclasses.field(default_factory=lambda: Lengths.log_spaced(10, 100_000, 13))
    scales: tuple[float, ...] = setting((0.5, 1.0, 2.0, 4.0), nonempty, each(positive), distinct)
    seeds: int = setting(8, at_least(1))
    seed: int = setting(0, at_least(0))
    model_windows: int = setting(8, at_least(1))
    model_positions: int = setting(12, at_least(1))
    model_scales: tuple[float, ...] = setting((1.0,), nonempty, each(positive), distinct)
    model: lm.ModelSetting = dataclasses.field(default_factory=default_model)
    training: lm.TrainingSetting = dataclasses.field(default_factory=default_training)

    def __post_init__(self):
        check(self)


def derived_values(config: Config) -> dict[str, Any]:
    """The model row lengths the config implies, recorded with it."""
    return {"model_row_lengths": list(model_row_lengths(config.training.seq_len, config.model_positions))}


def points(config: Config) -> list[dict[str, Any]]:
    """Synthetic: one point per (normalizer, n), every scale in it. Model: one per normalizer
    (the model is trained at the first one, then reused)."""
    out = []
    if "synthetic" in config.inputs:
        out += [
            {"input": "synthetic", "normalizer": spec.label, "n": n}
            for spec in config.normalizers
            for n in config.lengths.values
        ]
    if "model" in config.inputs:
        out += [{"input": "model", "normalizer": spec.label} for spec in config.normalizers]
    return out


def model_row_lengths(seq_len: int, count: int) -> tuple[int, ...]:
    """`count` log-spaced row lengths n in [1, seq_len] (rounded, distinct): query positions n - 1."""
    return Lengths.log_spaced(1, seq_len, count).values


@jax.jit
def row_sparsity(normalizer: Normalizer, logits: jax.Array, where: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per row of logits [..., n] (valid entries `where`, default all): float32 [...] zero_fraction
    (valid entries with p exactly 0, over the valid count), support_size (p > 0) and max_weight."""
    p = normalizer(logits, where=where)
    valid = jnp.ones(logits.shape, bool) if where is None else jnp.broadcast_to(where, logits.shape)
    count = jnp.sum(valid, axis=-1).astype(jnp.float32)
    zeros = jnp.sum(valid & (p == 0), axis=-1).astype(jnp.float32)
    return {
        "zero_fraction": zeros / count,
        "support_size": stats.support_size(p).astype(jnp.float32),
        "max_weight": stats.max_weight(p).astype(jnp.float32),
    }


def _summary(measured: dict[str, np.ndarray], axes: tuple[int, ...]) -> dict[str, Any]:
    """Mean and population std of each statistic over `axes` (the rows of one sweep point)."""
    out = {}
    for name, values in measured.items():
        out[name] = values.mean(axis=axes)
        out[f"{name}_std"] = values.std(axis=axes)
    return out


def _synthetic(config: Config, normalizer: Normalizer, n: int) -> list[dict[str, Any]]:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), n)
    scales = jnp.asarray(config.scales, jnp.float32)
    rows = scales[:, None, None] * jax.random.normal(key, (config.seeds, n), jnp.float32)  # [C, seeds, n]
    measured = {k: np.asarray(v, np.float64) for k, v in row_sparsity(normalizer, rows).items()}
    summary = _summary(measured, (1,))
    return [
        {
            "scale": scale,
            "layer": None,
            "n": n,
            "rows": config.seeds,
            **{k: float(v[i]) for k, v in summary.items()},
        }
        for i, scale in enumerate(config.scales)
    ]


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """The config fields that decide the trained model and the rows taken from it (the cache key)."""

    model: lm.ModelSetting
    training: lm.TrainingSetting
    windows: int
    positions: int

    @classmethod
    def of(cls, config: Config) -> ModelSetup:
        return cls(config.model, config.training, config.model_windows, config.model_positions)


def _remember(cache: dict, key: Any, value: Any) -> Any:
    """Store value under key, keeping the CACHE_SIZE most recent entries."""
    cache[key] = value
    while len(cache) > CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return value


_TRAINED: dict[tuple[lm.ModelSetting, lm.TrainingSetting], tuple[TransformerLM, dict[str, Any]]] = {}
_ROWS: dict[ModelSetup, dict[str, Any]] = {}


def trained_model(
    model: lm.ModelSetting, training: lm.TrainingSetting, progress: lm.Progress | None = None
) -> tuple[TransformerLM, dict[str, Any]]:
    """The softmax `TransformerLM` of `model`, trained as `training` on the default corpus's train
    split by `lm.train_model`, and its training record (history...); cached per process."""
    key = (model, training)
    if key not in _TRAINED:
        batches = train_batches(
            load_corpus().train,
            seq_len=training.seq_len,
            batch_size=training.batch_size,
            seed=training.seed,
            name="train split",
        )
        _remember(_TRAINED, key, lm.train_model(model, training, SOFTMAX, batches, progress=progress))
    return _TRAINED[key]


def validation_windows(setup: ModelSetup) -> Batch:
    """The first `setup.windows` contiguous validation windows of training.seq_len bytes."""
    return next(
        eval_batches(
            load_corpus().validation,
            seq_len=setup.training.seq_len,
            batch_size=setup.windows,
            max_batches=1,
            name="validation split",
        )
    )


@nnx.jit
def _inspect(model: TransformerLM, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    return attention_logits(model, inputs), jnp.mean(token_losses(model(inputs), targets))


def trained_model_rows(setup: ModelSetup, progress: lm.Progress | None = None) -> dict[str, Any]:
    """The trained model's attention rows at the chosen row lengths, on the validation windows
    (cached per process).

    Returns logits float32 [L, B, N, P, T] (row p is query position lengths[p] - 1 of every window,
    layer and head), where bool [P, T] (its causal keys), the row lengths, and the model's
    training loss (the final history entry's) and its validation loss on the windows (nats per byte).
    """
    if setup in _ROWS:
        return _ROWS[setup]
    model, record = trained_model(setup.model, setup.training, progress)
    windows = validation_windows(setup)
    logits, validation_loss = _inspect(model, jnp.asarray(windows.inputs), jnp.asarray(windows.targets))
    seq_len = setup.training.seq_len
    lengths = model_row_lengths(seq_len, setup.positions)
    queries = np.asarray(lengths) - 1
    rows = {
        "logits": logits[:, :, :, queries, :],
        "where": jnp.arange(seq_len)[None, :] <= queries[:, None],
        "lengths": lengths,
        "train_loss": float(record["history"][-1]["loss"]),
        "validation_loss": float(validation_loss),
    }
    return _remember(_ROWS, setup, rows)


def _model(config: Config, normalizer: Normalizer, progress: lm.Progress | None) -> list[dict[str, Any]]:
    rows = trained_model_rows(ModelSetup.of(config), progress)
    records = []
    for scale in config.model_scales:
        measured = row_sparsity(normalizer, scale * rows["logits"], rows["where"])
        measured = {k: np.asarray(v, np.float64) for k, v in measured.items()}  # [L, B, N, P]
        summary = _summary(measured, (1, 2))  # over windows and heads: [L, P]
        layers, count = rows["logits"].shape[0], config.model_windows * config.model.heads
        for layer in range(layers):
            for p, n in enumerate(rows["lengths"]):
                records.append(
                    {
                        "scale": scale,
                        "layer": layer,
                        "n": n,
                        "rows": count,
                        **{k: float(v[layer, p]) for k, v in summary.items()},
                        "model_train_loss": rows["train_loss"],
                        "model_validation_loss": rows["validation_loss"],
                    }
                )
    return records


def run_point(config: Config, point: dict[str, Any], *, progress: lm.Progress | None = None) -> list[dict[str, Any]]:
    """The records of one point (see the module docstring); `progress(description, completed,
    total)` follows the model's training at the first model point."""
    spec = next(s for s in config.normalizers if s.label == point["normalizer"])
    normalizer = spec.build()
    if point["input"] == "synthetic":
        return _synthetic(config, normalizer, int(point["n"]))
    return _model(config, normalizer, progress)


KIND = Kind(
    name="sparsity",
    description=(
        "exact-zero fraction and support size vs row length and logit scale, on Gaussian and trained-model rows"
    ),
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "lengths": "n", "inputs": "input"},
    figures="attnlab.figures.sparsity",
    derived=derived_values,
)
