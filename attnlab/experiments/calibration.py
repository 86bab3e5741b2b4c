"""Calibration of the output layer: one byte-level LM per output normalizer, before and after temperature scaling.

For each output normalizer (`attnlab.losses.OutputNormalizer`: softmax, softmax with label
smoothing, 1.5-entmax, sparsemax, alpha-entmax) a `TransformerLM` with softmax attention is
trained at L = training.seq_len on the default corpus with the output's own loss
(cross-entropy, or the matching Fenchel-Young loss), the same data, initialisation and
optimizer for each. Its next-byte predictions p = output.probabilities(z) are then scored on
`eval_windows` validation windows of L bytes spread evenly over the validation split: every
position of `fit_windows` of them (evenly interleaved) is the held-out set on which one
temperature T is fitted
(`attnlab.calibration.fit_temperature`: NLL for softmax, the output's Fenchel-Young loss for
a sparse one), and every position of the remaining windows is scored with z and with z / T:

    accuracy, NLL, the fraction of targets given probability 0, the NLL over the others,
    Brier score, mean confidence and support, ECE (equal-width and equal-mass bins),
    the output's training loss, and the reliability diagram's bins.

Records (per output): see `run_point`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import calibration
from attnlab.data import load_corpus, spread_batches, train_batches
from attnlab.experiments import lm
from attnlab.experiments.checks import at_least, check, multiple_of, setting
from attnlab.experiments.kind import Kind
from attnlab.losses import OutputNormalizer
from attnlab.normalizers import NormalizerSpec

DEFAULT_OUTPUTS = (
    OutputNormalizer("softmax"),
    OutputNormalizer("softmax", label_smoothing=0.1),
    OutputNormalizer("entmax", alpha=1.25),
    OutputNormalizer("entmax15"),
    OutputNormalizer("sparsemax"),
)
ATTENTION = NormalizerSpec("softmax")
EVAL_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Config:
    """outputs: the output normalizers, one model each (a mapping name or a table {mapping, alpha,
    label_smoothing}); model, training: as in the other training kinds (attention is softmax);
    eval_windows: validation windows of training.seq_len bytes at evenly spaced offsets, every
    position scored; fit_windows: this many of them, evenly interleaved, fit the temperature, the
    rest are the test set; bins: reliability bins (equal-width and equal-mass)."""

    outputs: tuple[OutputNormalizer, ...] = DEFAULT_OUTPUTS
    model: lm.ModelSetting = dataclasses.field(default_factory=lm.ModelSetting)
    training: lm.TrainingSetting = dataclasses.field(default_factory=lm.TrainingSetting)
    eval_windows: int = setting(256, multiple_of(EVAL_BATCH))
    fit_windows: int = setting(64, at_least(1))
    bins: int = setting(15, at_least(1))

    def relations(self) -> Iterator[str]:
        if self.fit_windows >= self.eval_windows:
            yield "{fit_windows} must be in [1, {eval_windows}) (the rest of the windows are the test set)"

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """One point per output normalizer: train, fit T, score."""
    return [{"output": output.label} for output in config.outputs]


def fit_mask(config: Config) -> np.ndarray:
    """bool [eval_windows]: the fit_windows windows (evenly interleaved) that fit T; the rest are scored."""
    mask = np.zeros(config.eval_windows, bool)
    mask[np.linspace(0, config.eval_windows - 1, config.fit_windows).round().astype(int)] = True
    return mask


def validation_logits(model: Any, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(logits [W, L, V] float32, targets [W, L]) on the eval_windows validation windows."""
    windows = spread_batches(
        load_corpus().validation, seq_len=config.training.seq_len, count=config.eval_windows,
        batch_size=EVAL_BATCH, name="validation split",
    )  # fmt: skip
    forward = jax.jit(lambda tokens: model(tokens))
    logits = [np.asarray(forward(jnp.asarray(batch.inputs))) for batch in windows]
    return np.concatenate(logits), np.concatenate([batch.targets for batch in windows])


def _report(output: OutputNormalizer, logits: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, Any]:
    """calibration.scores of output.probabilities(logits), the output's loss, and the reliability bins."""
    probs = np.asarray(output.probabilities(jnp.asarray(logits)), np.float64)
    report = calibration.scores(probs, labels, bins=bins)
    report["loss"] = float(jnp.mean(output.loss(jnp.asarray(logits), jnp.asarray(labels))))
    report["reliability"] = {}
    for scheme in calibration.SCHEMES:
        found = calibration.reliability_bins(probs, labels, bins=bins, scheme=scheme)
        report["reliability"][scheme] = {
            "edges": found.edges.tolist(),
            "count": found.count.tolist(),
            "confidence": [None if np.isnan(x) else float(x) for x in found.confidence],
            "accuracy": [None if np.isnan(x) else float(x) for x in found.accuracy],
        }
    return report


def run_point(
    config: Config, point: dict[str, Any], *, progress: lm.Progress | None = None, workdir: Path | None = None
) -> list[dict[str, Any]]:
    """Train one model with its output normalizer, fit T on the fit windows, score the test windows. Records:

    {"record": "training", "output"}: parameters, history (the output's own training loss),
      tokens_per_second, compile_seconds, train_seconds, wall_seconds (see `lm.train_model`).
    {"record": "calibration", "output"}: mapping, alpha, label_smoothing, temperature (fitted),
      fit_examples, test_examples, and "before" / "after" (logits z and z / T on the test
      positions), each with accuracy, nll (+inf when a target has probability 0),
      zero_target_fraction, nll_nonzero, brier, confidence, support, ece_width, ece_mass
      (see `attnlab.calibration.scores`), loss (the output's training loss) and reliability
      {width, mass: {edges, count, confidence, accuracy}} (empty bins: null).
    """
    output = next(o for o in config.outputs if o.label == point["output"])
    training = config.training
    corpus = load_corpus()
    batches = train_batches(corpus.train, seq_len=training.seq_len, batch_size=training.batch_size, seed=training.seed)
    model, trained = lm.train_model(
        config.model,
        training,
        ATTENTION,
        batches,
        settings={"data": lm.corpus_settings(corpus)},
        workdir=workdir,
        progress=progress,
        output=output,
        name=f"output_{output.label}",
    )
    if progress is not None:
        progress(f"scoring {output.label}", 0, 1)
    logits, targets = validation_logits(model, config)
    vocab, fit = logits.shape[-1], fit_mask(config)
    fit_logits, fit_labels = logits[fit].reshape(-1, vocab), targets[fit].reshape(-1)
    test_logits, test_labels = logits[~fit].reshape(-1, vocab), targets[~fit].reshape(-1)
    temperature = calibration.fit_temperature(fit_logits, fit_labels, output=output)
    return [
        {"record": "training", "output": output.label, **trained},
        {
            "record": "calibration",
            "output": output.label,
            **output.to_json(),
            "temperature": temperature,
            "fit_examples": int(fit_labels.size),
            "test_examples": int(test_labels.size),
            "before": _report(output, test_logits, test_labels, config.bins),
            "after": _report(output, test_logits / temperature, test_labels, config.bins),
        },
    ]


KIND = Kind(
    name="calibration",
    description="one LM per output normalizer: accuracy, NLL, ECE and reliability before and after temperature scaling",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"outputs": "output"},
    figures="attnlab.figures.calibration",
)
