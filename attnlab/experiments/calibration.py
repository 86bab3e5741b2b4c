"""Calibration of the output layer: one byte-level LM per output normalizer, before and after temperature scaling.

For each output normalizer (`attnlab.losses.OutputNormalizer`: softmax, softmax with label
smoothing, 1.5-entmax, sparsemax, alpha-entmax) a `TransformerLM` with softmax attention is
trained at L = training.seq_len on the default corpus with the output's own loss
(cross-entropy, or the matching Fenchel-Young loss), once per seed in `seeds`: the seed sets the
initialisation and the order of the training windows, the same for every output under one seed
(training.seed is replaced by the point's), and the optimizer is the same for all. Its
next-byte predictions p = output.probabilities(z) are then scored on `eval_windows` validation
windows of L bytes spread evenly over the validation split: every position of `fit_windows` of
them (evenly interleaved) is the held-out set on which one temperature T is fitted
(`attnlab.calibration.fit_temperature`: NLL for softmax, the output's Fenchel-Young loss for
a sparse one), and every position of the remaining windows is scored with z and with z / T:

    accuracy, NLL, the fraction of targets given probability 0, the NLL over the others,
    Brier score, mean confidence and support, ECE (equal-width and equal-mass bins),
    the output's training loss, and the reliability diagram's bins.

Records (per output and seed): see `run_point`. The summary (`summarize`) gives the mean and
Student-t 95% interval over seeds of every score before and after scaling (a seed whose NLL is
+inf is left out of the NLL's), and of the fitted temperature, with each output's paired
difference to softmax's scores on the seeds both ran (`attnlab.experiments.intervals`).
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
from attnlab.experiments import intervals, lm
from attnlab.experiments.checks import at_least, check, distinct, each, multiple_of, nonempty, setting
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
STAGES = ("before", "after")  # scored with z, and with z / T
SCORES = ("accuracy", "nll", "nll_nonzero", "zero_target_fraction", "brier", "confidence", "support",
          "ece_width", "ece_mass")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """outputs: the output normalizers, one model each (a mapping name or a table {mapping, alpha,
    label_smoothing}); model, training: as in the other training kinds (attention is softmax;
    training.seed is replaced by the point's); seeds: one model per output and seed, the seed
    fixing its initialisation and the order of its training windows (the same for every output);
    eval_windows: validation windows of training.seq_len bytes at evenly spaced offsets, every
    position scored; fit_windows: this many of them, evenly interleaved, fit the temperature, the
    rest are the test set; bins: reliability bins (equal-width and equal-mass); tuning: the
    learning-rate sweep per output before the main run (`lm.TuningSetting`), scored by the
    output's own loss on the fit windows (never the test windows)."""

    outputs: tuple[OutputNormalizer, ...] = DEFAULT_OUTPUTS
    model: lm.ModelSetting = dataclasses.field(default_factory=lm.ModelSetting)
    training: lm.TrainingSetting = dataclasses.field(default_factory=lm.TrainingSetting)
    eval_windows: int = setting(256, multiple_of(EVAL_BATCH))
    fit_windows: int = setting(64, at_least(1))
    bins: int = setting(15, at_least(1))
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)
    tuning: lm.TuningSetting = dataclasses.field(default_factory=lm.TuningSetting)

    def relations(self) -> Iterator[str]:
        if self.fit_windows >= self.eval_windows:
            yield "{fit_windows} must be in [1, {eval_windows}) (the rest of the windows are the test set)"

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """The tuning points (output x learning rate; none without tuning), then one point per seed x
    output normalizer, seed first (an interrupted run has whole seeds): train, fit T, score."""
    groups = [{"output": output.label} for output in config.outputs]
    main = [{**group, "seed": seed} for seed in config.seeds for group in groups]
    return lm.tuning_points(config.tuning, groups) + main


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
    config: Config,
    point: dict[str, Any],
    *,
    progress: lm.Progress | None = None,
    workdir: Path | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one model with its output normalizer (initialisation and data order from the point's
    seed, the learning rate its output's tuning chose among `records`), fit T on the fit windows,
    score the test windows (the same windows whatever the seed); or, at a tuning point, train one
    at the point's rate and score it by the output's loss on the fit windows ({"record":
    "tuning"}, see `lm.tuning_record`). Records (the runner adds the point to each):

    {"record": "training", "output"}: parameters, history (the output's own training loss),
      learning_rate, tokens_per_second, compile_seconds, train_seconds, wall_seconds (see `lm.train_model`).
    {"record": "calibration", "output"}: mapping, alpha, label_smoothing, temperature (fitted),
      fit_examples, test_examples, and "before" / "after" (logits z and z / T on the test
      positions), each with accuracy, nll (+inf when a target has probability 0),
      zero_target_fraction, nll_nonzero, brier, confidence, support, ece_width, ece_mass
      (see `attnlab.calibration.scores`), loss (the output's training loss) and reliability
      {width, mass: {edges, count, confidence, accuracy}} (empty bins: null).
    """
    output = next(o for o in config.outputs if o.label == point["output"])
    training = lm.point_training(config.training, config.tuning, point, records, ("output",))
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
        tolerate_divergence=lm.is_tuning(point),
    )
    if "diverged_at" in trained:  # a tuning model at a rate too high: nothing to score
        return [lm.tuning_record(trained, training)]
    if progress is not None:
        progress(f"scoring {output.label}", 0, 1)
    logits, targets = validation_logits(model, config)
    vocab, fit = logits.shape[-1], fit_mask(config)
    fit_logits, fit_labels = logits[fit].reshape(-1, vocab), targets[fit].reshape(-1)
    test_logits, test_labels = logits[~fit].reshape(-1, vocab), targets[~fit].reshape(-1)
    if lm.is_tuning(point):
        fit_loss = float(jnp.mean(output.loss(jnp.asarray(fit_logits), jnp.asarray(fit_labels))))
        return [lm.tuning_record({**trained, "validation_loss": fit_loss}, training)]
    temperature = calibration.fit_temperature(fit_logits, fit_labels, output=output)
    return [
        {"record": "training", "output": output.label, **trained, "learning_rate": training.learning_rate},
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


def baseline_label(outputs: list[dict[str, Any]]) -> str | None:
    """The label of the first plain softmax output (no label smoothing) among `outputs`
    (OutputNormalizer JSON), or None: the output every other one is compared with."""
    parsed = [OutputNormalizer.parse(output) for output in outputs]
    return next((o.label for o in parsed if o.mapping == "softmax" and not o.label_smoothing), None)


def summary_of(records: list[dict[str, Any]], baseline: str | None = "softmax") -> dict[str, Any]:
    """Means and Student-t 95% intervals over seeds (see `intervals.summarize_records`):

    {"tuning": per output, the learning rates tried and chosen (`lm.tuning_summary`);
     "scores": per (output, stage): each of SCORES, stage "before" (z) or "after" (z / T), with the
       paired difference to the `baseline` output (a label; None: no pairs) at the same stage;
     "temperature": per output: the fitted temperature}

    A score that is null for a seed (an NLL of +inf) is summarised over the other seeds. A record
    without a seed (written before seeds were swept) is seed 0.
    """
    scored = [r for r in records if r.get("record") == "calibration"]
    rows = [
        {"output": r["output"], "stage": stage, "seed": lm.seed_of(r), **{k: r[stage].get(k) for k in SCORES}}
        for r in scored for stage in STAGES
    ]  # fmt: skip
    temperatures = [{"output": r["output"], "seed": lm.seed_of(r), "temperature": r["temperature"]} for r in scored]
    against = None if baseline is None else {"output": baseline}
    return {
        "tuning": lm.tuning_summary(records, ("output",)),
        "scores": intervals.summarize_records(rows, by=("output", "stage"), metrics=SCORES, baseline=against),
        "temperature": intervals.summarize_records(temperatures, by=("output",), metrics=("temperature",)),
    }


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's summary: `summary_of` against the config's first plain softmax output."""
    return summary_of(records, baseline_label([output.to_json() for output in config.outputs]))


KIND = Kind(
    name="calibration",
    description="one LM per output normalizer: accuracy, NLL, ECE and reliability before and after temperature scaling",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"outputs": "output", "seeds": "seed"},
    figures="attnlab.figures.calibration",
    summarize=summarize,
)
