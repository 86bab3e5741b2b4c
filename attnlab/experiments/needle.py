"""Needle in a haystack: train one small LM per normalizer on passkey retrieval at length L, then
measure retrieval over context length (to >= 8 L) x needle depth, and the attention on the needle.

The SSMax paper's needle figures at small scale. Each model is trained from scratch on
`attnlab.data.needle_train_batches` (b" The magic number for {key} is {value}. " hidden in
filler at a uniformly random depth, the question at the end; only the answer digits are scored)
at L = training.seq_len. Then, for every RoPE base model.rope_theta * f (f in
`rope_theta_factors`), every context length n in `eval_lengths` and every depth in `depths`,
`eval_examples` fresh sequences (drawn from seeds apart from training's, the same for every
model) give:

  - retrieval accuracy: the fraction of sequences whose every answer digit is the argmax
    prediction (sequence accuracy), and the fraction of answer digits right (digit accuracy);
  - the attention mass on the needle: at the query that predicts the first answer digit, the
    total weight each layer and head puts on the needle sentence's positions, averaged over the
    sequences (uniform attention would put needle_length / n there).

A model is trained per normalizer and seed in `seeds`: the seed sets the initialisation and the
training stream (which sequences, in which order), the same for every normalizer under one seed
(training.seed is replaced by the point's). The summary (`summarize`) gives the mean and
Student-t 95% interval over seeds of the sequence and digit accuracy per (normalizer, RoPE
factor, length) (means over the depths) and within L (lengths <= L) and beyond it, and of the
final training loss, each with the paired difference to softmax on the seeds both ran
(`attnlab.experiments.intervals`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.data import NeedleConfig, load_corpus, needle_batch, needle_train_batches
from attnlab.data.tasks import FILLERS
from attnlab.experiments import intervals, lm
from attnlab.experiments.checks import (
    at_least,
    between,
    check,
    distinct,
    each,
    increasing,
    nonempty,
    one_of,
    positive,
    setting,
)
from attnlab.experiments.config import to_json
from attnlab.experiments.kind import Kind
from attnlab.normalizers import NormalizerSpec

DEFAULT_NORMALIZERS = (
    NormalizerSpec("softmax"),
    NormalizerSpec("ssmax"),
    NormalizerSpec("sparsemax"),
    NormalizerSpec("entmax15"),
)
EVAL_SEED_OFFSET = 1_000_003  # evaluation sequences are drawn apart from the training stream
HELD_OUT_SEED_OFFSET = 2_000_003  # and the held-out sequences that score a model, apart from both
ACCURACIES = ("sequence_accuracy", "digit_accuracy")
# Accuracies over the cells of lengths <= L (within) and > L (beyond), L the training length.
SPAN_METRICS = tuple(f"{a}_{span}" for span in ("within", "beyond") for a in ACCURACIES)


@dataclasses.dataclass(frozen=True)
class Config:
    """normalizers, model, training: as in `length_generalization` (training.seq_len is L; its
    seed is replaced by the point's); seeds: one model per normalizer and seed, the seed fixing
    its initialisation and its training sequences (the same for every normalizer);
    key_length, value_length, filler: the task (`attnlab.data.NeedleConfig`); eval_lengths:
    context lengths to test (each >= the task's minimum); depths: needle depths in [0, 1];
    eval_examples: sequences per (length, depth) cell; rope_theta_factors: RoPE bases to test,
    as multiples of model.rope_theta; tuning: the learning-rate sweep per normalizer before the
    main run (`lm.TuningSetting`; scored by the loss on the `held_out` sequences)."""

    normalizers: tuple[NormalizerSpec, ...] = DEFAULT_NORMALIZERS
    model: lm.ModelSetting = dataclasses.field(default_factory=lambda: lm.ModelSetting(layers=2, width=64, heads=4))
    training: lm.TrainingSetting = dataclasses.field(
        default_factory=lambda: lm.TrainingSetting(batch_size=32, steps=1500, learning_rate=3e-3, warmup=50)
    )
    key_length: int = setting(4, at_least(1))
    value_length: int = setting(4, at_least(1))
    filler: str = setting("random", one_of(FILLERS))
    eval_lengths: tuple[int, ...] = setting((128, 256, 512, 1024), nonempty, each(at_least(1)), increasing, distinct)
    depths: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75, 1.0), nonempty, each(between(0, 1)), distinct)
    eval_examples: int = setting(32, at_least(1))
    rope_theta_factors: tuple[float, ...] = setting((1.0, 50.0), nonempty, each(positive), distinct)
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)
    tuning: lm.TuningSetting = dataclasses.field(default_factory=lm.TuningSetting)

    def relations(self) -> Iterator[str]:
        for n in (self.training.seq_len, *self.eval_lengths):
            try:
                self.task(n, 0.0)
            except ValueError as err:
                yield f"the needle does not fit: {err}"
                return

    def __post_init__(self):
        check(self)

    def task(self, seq_len: int, depth: float) -> NeedleConfig:
        return NeedleConfig(
            seq_len=seq_len,
            depth=depth,
            key_length=self.key_length,
            value_length=self.value_length,
            filler=self.filler,
        )


def points(config: Config) -> list[dict[str, Any]]:
    """The tuning points (normalizer x learning rate; none without tuning), then one point per
    seed x normalizer, seed first (an interrupted run has whole seeds): train, then test every
    (theta, length, depth) cell."""
    labels = [spec.label for spec in config.normalizers]
    main = [{"normalizer": label, "seed": seed} for seed in config.seeds for label in labels]
    return lm.tuning_points(config.tuning, [{"normalizer": label} for label in labels]) + main


def held_out(config: Config, length: int, corpus: np.ndarray | None) -> list[Any]:
    """The sequences that score a model at the training length: eval_examples per depth, drawn
    apart from both the training stream and the retrieval tests (`HELD_OUT_SEED_OFFSET`)."""
    return [
        needle_batch(config.task(length, depth), batch_size=config.eval_examples,
                     seed=HELD_OUT_SEED_OFFSET + i, corpus=corpus)
        for i, depth in enumerate(config.depths)
    ]  # fmt: skip


def run_point(
    config: Config,
    point: dict[str, Any],
    *,
    progress: lm.Progress | None = None,
    workdir: Path | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one model (initialisation and training sequences from the point's seed, the learning
    rate its normalizer's tuning chose among `records`) and test it on the same sequences whatever
    the seed; or, at a tuning point, train one model at the point's rate and score it. Records
    (the runner adds the point to each):

    {"record": "tuning"}: see `lm.tuning_record` (validation_loss: the loss on the answer digits
      of `held_out` sequences at L).
    {"record": "training"}: as in `length_generalization` (parameters, history, validation_loss,
      evaluations, learning_rate, tokens_per_second, compile_seconds, train_seconds, wall_seconds,
      learned).
    {"record": "retrieval"} per (rope_theta_factor, length, depth): rope_theta, sequence_accuracy,
      digit_accuracy, needle_mass ([layer][head] mean weight on the needle at the first answer
      query), needle_mass_uniform (needle_length / (query position + 1), what uniform weights give).
    """
    normalizer = next(spec for spec in config.normalizers if spec.label == point["normalizer"])
    training = lm.point_training(config.training, config.tuning, point, records)
    corpus = load_corpus().validation if config.filler == "corpus" else None
    batches = needle_train_batches(
        config.task(training.seq_len, 0.0), batch_size=training.batch_size, seed=training.seed, corpus=corpus
    )
    data = {"data": {"task": to_json(config.task(training.seq_len, 0.0))}}
    if corpus is not None:
        data["data"]["filler_corpus"] = lm.corpus_settings(load_corpus(), "validation")
    validation = held_out(config, training.seq_len, corpus)
    model, trained = lm.train_model(
        config.model,
        training,
        normalizer,
        batches,
        settings=data,
        eval_batches=lambda: validation,
        workdir=workdir,
        progress=progress,
        tolerate_divergence=lm.is_tuning(point),
    )
    if lm.is_tuning(point):
        return [lm.tuning_record(trained, training)]
    out = [{"record": "training", **trained, "learning_rate": training.learning_rate,
            "learned": lm.learned_parameters(model)}]  # fmt: skip

    probe = lm.Probe(model)
    cells = [(f, n, d) for f in config.rope_theta_factors for n in config.eval_lengths for d in config.depths]
    for i, (factor, length, depth) in enumerate(cells):
        if progress is not None:
            progress(f"testing {normalizer.label}: n={length}, depth={depth}", i, len(cells))
        task = config.task(length, depth)
        seed = EVAL_SEED_OFFSET + i
        batch = needle_batch(task, batch_size=config.eval_examples, seed=seed, corpus=corpus)
        theta = config.model.rope_theta * factor
        result, stats = probe.measure([batch], rope_theta=theta, needle=True)
        query = length - config.value_length  # the input position whose target is the first digit
        mass = stats["key_mass"][:, :, :, query].mean(axis=1)  # [L, N]
        out.append(
            {
                "record": "retrieval",
                "rope_theta_factor": factor,
                "rope_theta": theta,
                "length": length,
                "depth": depth,
                "sequence_accuracy": result.sequence_accuracy,
                "digit_accuracy": result.token_accuracy,
                "needle_mass": mass.tolist(),
                "needle_mass_uniform": task.needle_length / (query + 1),
            }
        )
    return out


def summary_of(records: list[dict[str, Any]], seq_len: int, baseline: str | None = "softmax") -> dict[str, Any]:
    """Means and Student-t 95% intervals over seeds (see `intervals.summarize_records`):

    {"tuning": per normalizer, the learning rates tried and chosen (`lm.tuning_summary`);
     "training": per normalizer: train_loss (the last history entry's), validation_loss (on the
       held-out sequences; None in files written before it was recorded);
     "retrieval": per (normalizer, rope_theta_factor, length): sequence_accuracy, digit_accuracy
       (each the mean over the depths);
     "spans": per (normalizer, rope_theta_factor): sequence_accuracy_within, digit_accuracy_within
       (the mean over the cells of lengths <= seq_len, the training length L),
       sequence_accuracy_beyond, digit_accuracy_beyond (lengths > L; null when none is)}

    each with the paired difference to the `baseline` normalizer (a label; None: no pairs) on
    the seeds both ran. A record without a seed (written before seeds were swept) is seed 0.
    """
    against = None if baseline is None else {"normalizer": baseline}
    trained = [
        {"normalizer": r["normalizer"], "seed": lm.seed_of(r), "train_loss": r["history"][-1]["loss"],
         "validation_loss": r.get("validation_loss")}
        for r in records if r.get("record") == "training"
    ]  # fmt: skip
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("record") == "retrieval":
            cells.setdefault((r["normalizer"], r["rope_theta_factor"], lm.seed_of(r)), []).append(r)
    by_length, by_span = [], []
    for (label, factor, seed), found in cells.items():
        group = {"normalizer": label, "rope_theta_factor": factor, "seed": seed}
        for length in sorted({r["length"] for r in found}):
            at = [r for r in found if r["length"] == length]
            by_length.append({**group, "length": length, **{a: float(np.mean([r[a] for r in at])) for a in ACCURACIES}})
        spans = {
            "within": [r for r in found if r["length"] <= seq_len],
            "beyond": [r for r in found if r["length"] > seq_len],
        }
        means = {f"{a}_{span}": float(np.mean([r[a] for r in rows])) if rows else None
                 for span, rows in spans.items() for a in ACCURACIES}  # fmt: skip
        by_span.append({**group, **means})
    return {
        "tuning": lm.tuning_summary(records),
        "training": intervals.summarize_records(
            trained, by=("normalizer",), metrics=("train_loss", "validation_loss"), baseline=against
        ),
        "retrieval": intervals.summarize_records(
            by_length, by=("normalizer", "rope_theta_factor", "length"), metrics=ACCURACIES, baseline=against
        ),
        "spans": intervals.summarize_records(
            by_span,
            by=("normalizer", "rope_theta_factor"),
            metrics=SPAN_METRICS,
            baseline=against,
        ),
    }


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's summary: `summary_of` at the training length against the config's first softmax normalizer."""
    specs = [spec.to_json() for spec in config.normalizers]
    return summary_of(records, config.training.seq_len, lm.baseline_label(specs))


KIND = Kind(
    name="needle",
    description="one LM per normalizer trained on passkey retrieval at L; accuracy over length (to >= 8 L) x depth",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "seeds": "seed"},
    figures="attnlab.figures.needle",
    summarize=summarize,
)
