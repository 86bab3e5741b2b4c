"""Length generalisation: train one small LM per normalizer at length L, evaluate out to >= 8 L.

The SSMax paper's Figures 4-6 at small scale. For each normalizer (default: softmax, SSMax,
SSMax without the learned s, SSMax with a learned bias, sparsemax, 1.5-entmax, alpha-entmax with
alpha learned per head) a byte-level `TransformerLM` is trained at L = training.seq_len on the
default corpus (`attnlab.data.load_corpus()`: the Python standard library's source), once per
seed in `seeds`: the seed sets the initialisation and the order of the training windows, the same
for every normalizer under one seed (training.seed is replaced by the point's). It is then
evaluated on validation windows of
`eval_length` tokens, once with each RoPE base training.rope_theta * f for f in
`rope_theta_factors` (1: as trained; the paper raises it 50x with no retraining):

  - the loss at every position t (nats per byte), averaged over `eval_windows` windows;
  - per layer, averaged over heads and the same windows and over log-spaced bins of
    positions: the largest attention weight, the entropy (nats) and the support size (exact
    non-zeros) of each query's row, and the zero fraction 1 - support / (t + 1).

A model whose loss stays flat beyond L generalises; a largest weight that falls with t is
attention fading inside a trained model.

Records (one "training" record and one "evaluation" record per theta factor, per normalizer and
seed): see `run_point`. The summary (`summarize`) gives the mean and Student-t 95% interval over
seeds of each normalizer's validation and final training loss, and per RoPE factor of its loss
over the window, within L, beyond L and over the last eighth, with each normalizer's paired
difference to softmax on the seeds both ran (`attnlab.experiments.intervals`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.data import eval_batches, load_corpus, train_batches
from attnlab.experiments import intervals, lm
from attnlab.experiments.checks import at_least, check, distinct, each, nonempty, positive, setting
from attnlab.experiments.kind import Kind
from attnlab.normalizers import NormalizerSpec

DEFAULT_NORMALIZERS = (
    NormalizerSpec("softmax"),
    NormalizerSpec("ssmax"),
    NormalizerSpec("ssmax", learn=(), label="SSMax (fixed s)"),
    NormalizerSpec("ssmax", learn=("s", "bias"), label="SSMax + bias"),
    NormalizerSpec("sparsemax"),
    NormalizerSpec("entmax15"),
    NormalizerSpec("entmax", learn=("alpha",), label="α-entmax (learned α)"),
)
TRAINING_METRICS = ("validation_loss", "train_loss")
EVALUATION_METRICS = ("loss", "loss_within", "loss_beyond", "loss_last_eighth")
# Windows of length L from the second half of the validation split (the evaluation windows come
# from its start) score every model: its validation_loss, and at a tuning point its rate.
TUNING_WINDOWS = 32


@dataclasses.dataclass(frozen=True)
class Config:
    """normalizers: the models to train (see `NormalizerSpec`); model, training: their shape and
    training (`lm.ModelSetting`, `lm.TrainingSetting`; its seed is replaced by the point's);
    seeds: one model per normalizer and seed, the seed fixing its initialisation and the order
    of its training windows (the same for every normalizer); tuning: the learning-rate sweep per
    normalizer before the main run (`lm.TuningSetting`; scored by the loss on TUNING_WINDOWS
    windows of length L from the second half of the validation split); eval_length: evaluation window length
    (>= training.seq_len; the paper's question needs >= 8 L); eval_windows: validation windows
    (contiguous, from the start of the validation split); rope_theta_factors: RoPE
    bases to evaluate with, as multiples of model.rope_theta; position_bins: about this many
    log-spaced bins of positions for the statistics."""

    normalizers: tuple[NormalizerSpec, ...] = DEFAULT_NORMALIZERS
    model: lm.ModelSetting = dataclasses.field(default_factory=lm.ModelSetting)
    training: lm.TrainingSetting = dataclasses.field(default_factory=lm.TrainingSetting)
    eval_length: int = setting(1024, at_least(2))
    eval_windows: int = setting(32, at_least(1))
    rope_theta_factors: tuple[float, ...] = setting((1.0, 50.0), nonempty, each(positive), distinct)
    position_bins: int = setting(24, at_least(1))
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)
    tuning: lm.TuningSetting = dataclasses.field(default_factory=lm.TuningSetting)

    def relations(self) -> Iterator[str]:
        if self.eval_length < self.training.seq_len:
            yield "{eval_length} must be >= {training.seq_len} (the point is to evaluate beyond the training length)"

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """The tuning points (normalizer x learning rate; none without tuning), then one point per
    seed x normalizer, seed first (an interrupted run has whole seeds): train, then evaluate."""
    labels = [spec.label for spec in config.normalizers]
    main = [{"normalizer": label, "seed": seed} for seed in config.seeds for label in labels]
    return lm.tuning_points(config.tuning, [{"normalizer": label} for label in labels]) + main


def _windows(data: np.ndarray, length: int, count: int) -> list[Any]:
    """The first `count` contiguous validation windows of `length` tokens, in batches of up to 4."""
    return list(eval_batches(data, seq_len=length, batch_size=min(4, count), max_batches=-(-count // 4)))


def statistics_record(stats: dict[str, np.ndarray], edges: np.ndarray) -> dict[str, Any]:
    """Per layer, per position bin: the means over windows and heads of the statistics [L, B, N, T]."""
    length = stats["max_weight"].shape[-1]
    row_length = np.arange(1, length + 1, dtype=np.float64)
    out = {"position_edges": edges.tolist()}
    for name, values in stats.items():
        out[name] = lm.bin_positions(values.mean(axis=(1, 2)), edges).tolist()
    zero_fraction = 1.0 - stats["support_size"] / row_length
    out["zero_fraction"] = lm.bin_positions(zero_fraction.mean(axis=(1, 2)), edges).tolist()
    return out


def run_point(
    config: Config,
    point: dict[str, Any],
    *,
    progress: lm.Progress | None = None,
    workdir: Path | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one model (initialisation and data order from the point's seed, the learning rate
    its normalizer's tuning chose among `records`) and evaluate it; or, at a tuning point, train
    one model at the point's rate and score it. Records (the runner adds the point to each):

    {"record": "tuning"}: see `lm.tuning_record` (validation_loss on TUNING_WINDOWS windows of
      length L from the second half of the validation split).
    {"record": "training"}: parameters, history, validation_loss (on the same windows as tuning),
      evaluations, learning_rate (the rate it trained at), tokens_per_second,
      compile_seconds, train_seconds, wall_seconds (see `lm.train_model`), learned (the learned
      normalizer parameters per layer and head at the end: s, bias, alpha...).
    {"record": "evaluation"} per rope_theta_factor: rope_theta, per_position_loss [eval_length]
      (nats per byte at each position t, the token after t + 1 bytes of context), loss_within
      (mean over t < L), loss_beyond (mean over t >= L), loss_last_eighth (mean over the last
      eval_length / 8 positions), position_edges (bin edges of t) and, per layer and bin,
      max_weight, entropy (nats), support_size and zero_fraction.
    """
    normalizer = next(spec for spec in config.normalizers if spec.label == point["normalizer"])
    corpus = load_corpus()
    training = lm.point_training(config.training, config.tuning, point, records)
    length = training.seq_len

    batches = train_batches(corpus.train, seq_len=length, batch_size=training.batch_size, seed=training.seed)
    data = {"data": lm.corpus_settings(corpus)}
    held_out = _windows(corpus.validation[corpus.validation.size // 2 :], length, TUNING_WINDOWS)
    model, trained = lm.train_model(
        config.model,
        training,
        normalizer,
        batches,
        settings=data,
        eval_batches=lambda: held_out,
        workdir=workdir,
        progress=progress,
        tolerate_divergence=lm.is_tuning(point),
    )
    if lm.is_tuning(point):
        return [lm.tuning_record(trained, training)]
    out = [{"record": "training", **trained, "learning_rate": training.learning_rate,
            "learned": lm.learned_parameters(model)}]  # fmt: skip

    long_windows = _windows(corpus.validation, config.eval_length, config.eval_windows)
    edges = lm.position_bins(config.eval_length, config.position_bins)
    probe = lm.Probe(model)
    for i, factor in enumerate(config.rope_theta_factors):
        if progress is not None:
            progress(f"evaluating {normalizer.label} at {config.eval_length}", i, len(config.rope_theta_factors))
        theta = config.model.rope_theta * factor
        result, stats = probe.measure(long_windows, rope_theta=theta)
        loss = result.per_position_loss
        out.append(
            {
                "record": "evaluation",
                "rope_theta_factor": factor,
                "rope_theta": theta,
                "per_position_loss": [float(x) for x in loss],
                "loss": result.loss,
                "loss_within": float(np.nanmean(loss[:length])),
                "loss_beyond": float(np.nanmean(loss[length:])) if config.eval_length > length else None,
                "loss_last_eighth": float(np.nanmean(loss[-max(1, config.eval_length // 8) :])),
                **statistics_record(stats, edges),
            }
        )
    return out


def summary_of(records: list[dict[str, Any]], baseline: str | None = "softmax") -> dict[str, Any]:
    """Means and Student-t 95% intervals over seeds (see `intervals.summarize_records`):

    {"tuning": per normalizer, the learning rates tried and chosen (`lm.tuning_summary`; empty without tuning);
     "training": per normalizer: validation_loss, train_loss (the last history entry's);
     "evaluation": per (normalizer, rope_theta_factor): loss, loss_within, loss_beyond, loss_last_eighth}

    each with the paired difference to the `baseline` normalizer (a label; None: no pairs) on
    the seeds both ran. A record without a seed (written before seeds were swept) is seed 0.
    """
    against = None if baseline is None else {"normalizer": baseline}
    trained = [
        {"normalizer": r["normalizer"], "seed": lm.seed_of(r), "validation_loss": r.get("validation_loss"),
         "train_loss": r["history"][-1]["loss"]}
        for r in records if r.get("record") == "training"
    ]  # fmt: skip
    evaluated = [
        {"normalizer": r["normalizer"], "rope_theta_factor": r["rope_theta_factor"], "seed": lm.seed_of(r),
         **{metric: r.get(metric) for metric in EVALUATION_METRICS}}
        for r in records if r.get("record") == "evaluation"
    ]  # fmt: skip
    return {
        "tuning": lm.tuning_summary(records),
        "training": intervals.summarize_records(
            trained, by=("normalizer",), metrics=TRAINING_METRICS, baseline=against
        ),
        "evaluation": intervals.summarize_records(
            evaluated, by=("normalizer", "rope_theta_factor"), metrics=EVALUATION_METRICS, baseline=against
        ),
    }


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's summary: `summary_of` against the config's first softmax normalizer."""
    return summary_of(records, lm.baseline_label([spec.to_json() for spec in config.normalizers]))


KIND = Kind(
    name="length_generalization",
    description=(
        "one LM per normalizer trained at length L; loss, max weight, entropy and sparsity vs position to >= 8 L"
    ),
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "seeds": "seed"},
    figures="attnlab.figures.length_generalization",
    summarize=summarize,
)
