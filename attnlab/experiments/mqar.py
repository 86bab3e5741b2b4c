"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023): recall accuracy versus model
width, per normalizer, with a 95% interval over seeds.

Each point trains one small LM from scratch (`layers` layers, width d, `heads` heads of
head_dim = d / heads, RoPE) on MQAR sequences (`attnlab.data.mqar_batch`: `num_kv_pairs`
key-value pairs, keys from the lower half of the `vocab_size` tokens and values from the upper
half, then one query of every key at power-law gaps, `power_a`) of L = training.seq_len tokens;
the loss is the cross-entropy at the query positions only (the batches' loss_mask, N per
sequence). Then `eval_examples` held-out sequences, the same for every point (drawn from seeds no
training stream uses), give

  - accuracy: the fraction of queries whose argmax prediction is the key's value (Zoology's
    metric), and sequence_accuracy: the fraction of sequences with every query right;
  - eval_loss: the cross-entropy at the query positions (nats).

A point is (normalizer, width, seed). The seed is the model's initialisation and the training
stream's (which sequences, in which order), so every normalizer and width sees the same data
under one seed: the paired differences against softmax in the summary compare models that differ
only in their normalizer. The summary (`summarize`) gives, per normalizer and width, each
metric's mean and Student-t 95% interval over the seeds, and the paired difference to softmax at
the same width on the seeds both have (`attnlab.experiments.intervals`). A model either solves
MQAR or stalls on a plateau (typically half the pairs, or chance), so the summary also counts,
per normalizer and width, the seeds whose accuracy reached SOLVED, with the exact interval of that
proportion and Fisher's exact test against softmax's count: a mean and t interval over three
values of a two- or three-state outcome describe it poorly.

Zoology's MQAR differs in ways that stay: its vocabulary is 8192 (ours at most 256, byte
tokens), its fillers are random tokens (ours 0), it leaves the slot after a query blank (ours
holds the value), its attention models have learned absolute positions, dropout 0.1 and no MLP
(ours RoPE, no dropout, an MLP per block).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.data import Batch, MQARConfig, mqar_batch
from attnlab.data.tasks import MAX_VOCAB
from attnlab.experiments import intervals, lm
from attnlab.experiments.checks import (
    at_least,
    between,
    check,
    distinct,
    each,
    increasing,
    multiple_of,
    nonempty,
    noted,
    positive,
    setting,
)
from attnlab.experiments.config import to_json
from attnlab.experiments.kind import Kind
from attnlab.normalizers import NormalizerSpec
from attnlab.train import evaluate

DEFAULT_NORMALIZERS = (
    NormalizerSpec("softmax"),
    NormalizerSpec("ssmax"),
    NormalizerSpec("sparsemax"),
    NormalizerSpec("entmax15"),
    NormalizerSpec("asentmax"),
)
EVAL_BATCH = 64  # held-out sequences per evaluation batch
# Training streams draw their batch seeds from [0, TRAINING_SEEDS); evaluation batch j has seed
# TRAINING_SEEDS + j and validation batch j (which scores learning rates in tuning) seed
# TRAINING_SEEDS + VALIDATION_SEEDS + j, so no two of the three sets share a batch.
TRAINING_SEEDS = 2**31
VALIDATION_SEEDS = 2**20
METRICS = ("accuracy", "sequence_accuracy", "eval_loss", "train_loss")
GROUPS = ("normalizer", "width")
# Held-out accuracy at which a model counts as having solved the task: the models of the committed
# runs end at 1.000, near 0.5 (two of four pairs) or near 0.25 (chance), nothing in between.
SOLVED = 0.99


@dataclasses.dataclass(frozen=True)
class Config:
    """normalizers: the attention normalizers (one model per normalizer x width x seed);
    widths: model widths d (each a multiple of `heads` with an even head_dim d / heads, for RoPE);
    layers, heads: the model's depth and heads per layer; vocab_size, num_kv_pairs, power_a: the
    task (`attnlab.data.MQARConfig`; sequences of training.seq_len tokens, every key queried
    once); training: how each model is trained (`lm.TrainingSetting`; its seed is replaced by the
    point's); eval_examples: held-out sequences (a multiple of 64), the same for every point;
    eval_every: steps between evaluations during training (0: only at the end); seeds: one model
    per seed, the seed fixing its initialisation and its training data; tuning: the learning-rate
    sweep per normalizer and width before the main run (`lm.TuningSetting`, scored by the loss at
    the queries of eval_examples validation sequences, apart from the evaluation's)."""

    normalizers: tuple[NormalizerSpec, ...] = DEFAULT_NORMALIZERS
    widths: tuple[int, ...] = setting((16, 32, 64), nonempty, each(positive), increasing, distinct)
    layers: int = setting(2, positive)
    heads: int = setting(2, positive)
    vocab_size: int = setting(32, between(4, MAX_VOCAB))
    num_kv_pairs: int = setting(4, positive)
    power_a: float = setting(0.01, noted(positive, "1 is uniform"))
    training: lm.TrainingSetting = dataclasses.field(
        default_factory=lambda: lm.TrainingSetting(
            seq_len=32, batch_size=64, steps=2000, learning_rate=3e-3, warmup=50, log_every=25, checkpoint_every=500
        )
    )
    eval_examples: int = setting(1024, multiple_of(EVAL_BATCH))
    eval_every: int = setting(0, noted(at_least(0), "0: only at the end"))
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)
    tuning: lm.TuningSetting = dataclasses.field(
        default_factory=lambda: lm.TuningSetting(learning_rates=(3e-4, 1e-3, 3e-3, 1e-2), seed=0)
    )

    def relations(self) -> Iterator[str]:
        bad = [w for w in self.widths if w % self.heads or (w // self.heads) % 2]
        if bad:
            yield (
                "{widths} must each be a multiple of {heads} with an even head_dim = width / heads (RoPE); "
                f"{', '.join(map(str, bad))} {'is' if len(bad) == 1 else 'are'} not"
            )
        try:
            self.task()
        except ValueError as err:
            yield f"{{num_kv_pairs}}, {{vocab_size}} and {{training.seq_len}} make no MQAR task: {err}"

    def __post_init__(self):
        check(self)

    def task(self) -> MQARConfig:
        """The MQAR task every point trains and is evaluated on."""
        return MQARConfig(
            seq_len=self.training.seq_len,
            num_pairs=self.num_kv_pairs,
            vocab_size=self.vocab_size,
            power_a=self.power_a,
        )


def points(config: Config) -> list[dict[str, Any]]:
    """The tuning points (width x normalizer x learning rate; none without tuning), then one point
    per seed x width x normalizer, seed first: an interrupted run has whole seeds."""
    groups = [{"normalizer": spec.label, "width": width} for width in config.widths for spec in config.normalizers]
    main = [{**group, "seed": seed} for seed in config.seeds for group in groups]
    return lm.tuning_points(config.tuning, groups) + main


def training_batches(task: MQARConfig, *, batch_size: int, seed: int) -> Iterator[Batch]:
    """The endless training stream of one seed: batch i is `mqar_batch(task, seed=s_i)` with s_i the
    i-th draw from [0, 2^31) of numpy's PCG64 seeded with `seed`; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    while True:
        yield mqar_batch(task, batch_size=batch_size, seed=int(rng.integers(0, TRAINING_SEEDS)))


def evaluation_batches(task: MQARConfig, examples: int, *, validation: bool = False) -> list[Batch]:
    """The held-out sequences: `examples` / 64 batches, batch j drawn with seed 2^31 + j (the
    evaluation's) or, with validation=True, 2^31 + 2^20 + j (tuning's)."""
    first = TRAINING_SEEDS + (VALIDATION_SEEDS if validation else 0)
    return [mqar_batch(task, batch_size=EVAL_BATCH, seed=first + j) for j in range(examples // EVAL_BATCH)]


def run_point(
    config: Config,
    point: dict[str, Any],
    *,
    progress: lm.Progress | None = None,
    workdir: Path | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one model on MQAR (at the learning rate that tuning chose for its normalizer and width
    among `records`) and score it on the held-out sequences; or, at a tuning point, train one at
    the point's rate and score it on the validation sequences ({"record": "tuning"}, see
    `lm.tuning_record`). One record:

    {"record": "training", "normalizer", "width", "seed"}: accuracy (queries answered right),
      sequence_accuracy (sequences with every query right), eval_loss (nats at the queries),
      train_loss and train_accuracy (the last history entry's: means over its log_every steps),
      steps, layers, heads, head_dim, parameters, history (per log_every steps: step, loss,
      accuracy, grad_norm, learning_rate, tokens_per_second, elapsed_seconds), evaluations (on
      the validation sequences, every eval_every steps and at the end: step, loss,
      token_accuracy, sequence_accuracy, ...), validation_loss, learning_rate (the rate it
      trained at), tokens_per_second, compile_seconds, train_seconds, wall_seconds (see
      `lm.train_model`), learned (each learned normalizer parameter, [layer][head]).
    """
    normalizer = next(spec for spec in config.normalizers if spec.label == point["normalizer"])
    width = point["width"]
    model_setting = lm.ModelSetting(layers=config.layers, width=width, heads=config.heads)
    tuning = lm.is_tuning(point)
    training = lm.point_training(config.training, config.tuning, point, records, GROUPS)
    seed = training.seed
    task = config.task()
    validation = evaluation_batches(task, config.eval_examples, validation=True)
    model, trained = lm.train_model(
        model_setting,
        training,
        normalizer,
        training_batches(task, batch_size=training.batch_size, seed=seed),
        settings={"data": {"task": to_json(task)}, "validation": {"examples": config.eval_examples}},
        eval_batches=lambda: validation,
        workdir=workdir,
        progress=progress,
        name=f"mqar_{normalizer.label}_d{width}_seed{seed}",
        eval_every=config.eval_every,
        tolerate_divergence=tuning,
    )
    if tuning:
        return [lm.tuning_record(trained, training)]
    final = evaluate(model, evaluation_batches(task, config.eval_examples), global_batches=True)
    return [
        {
            "record": "training",
            **point,
            "accuracy": final.token_accuracy,
            "sequence_accuracy": final.sequence_accuracy,
            "eval_loss": final.loss,
            "train_loss": trained["history"][-1]["loss"],
            "train_accuracy": trained["history"][-1]["accuracy"],
            "steps": training.steps,
            "learning_rate": training.learning_rate,
            "layers": config.layers,
            "heads": config.heads,
            "head_dim": width // config.heads,
            **trained,
            "learned": lm.learned_parameters(model),
        }
    ]


def summary_of(records: list[dict[str, Any]], baseline: str | None = "softmax") -> dict[str, Any]:
    """Per normalizer and width, each of METRICS' mean and Student-t 95% interval over seeds, and
    the paired difference to the `baseline` normalizer (a label) at the same width on common seeds
    (see `intervals.summarize_records`); records of other kinds of record are ignored."""
    trained = [r for r in records if r.get("record") == "training"]
    against = None if baseline is None else {"normalizer": baseline}
    return {
        **intervals.summarize_records(trained, by=GROUPS, metrics=METRICS, baseline=against),
        "solved": solved_counts(trained, baseline),
        "tuning": lm.tuning_summary(records, GROUPS),
    }


def solved_counts(trained: list[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    """Per normalizer and width (first-seen order): the seeds whose accuracy reached SOLVED, of the
    seeds with an accuracy, with the Clopper-Pearson 95% interval of that proportion and, against
    the `baseline` normalizer at the same width, Fisher's exact two-sided p (None for the baseline
    itself or without one)."""
    counts: dict[tuple, list[float]] = {}
    for record in trained:
        if record.get("accuracy") is not None:
            counts.setdefault((record["normalizer"], record["width"]), []).append(float(record["accuracy"]))
    solved = {group: (sum(a >= SOLVED for a in accuracies), len(accuracies)) for group, accuracies in counts.items()}
    out = []
    for (normalizer, width), (k, n) in solved.items():
        base = solved.get((baseline, width))
        p = None if base is None or normalizer == baseline else intervals.fisher_exact((k, n), base)
        interval = intervals.binomial_interval(k, n, name=f"solved, {normalizer} at width {width}")
        out.append({"normalizer": normalizer, "width": width, "solved": k, "seeds": n,
                    "proportion": interval.to_json(), "fisher_p_against_baseline": p})  # fmt: skip
    return out


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's summary: `summary_of` against the config's softmax normalizer."""
    return summary_of(records, lm.baseline_label([spec.to_json() for spec in config.normalizers]))


KIND = Kind(
    name="mqar",
    description="multi-query associative recall (Zoology): accuracy vs model width per normalizer, over seeds",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "widths": "width", "seeds": "seed"},
    figures="attnlab.figures.mqar",
    summarize=summarize,
)
