"""Needle in a haystack: train one small LM per normalizer on passkey retrieval at length L, then
measure retrieval over context length (to >= 8 L) x needle depth, and the attention on the needle.

The SSMax paper's needle figures at small scale. Each model is trained from scratch on
`attnlab.data.needle_train_batches` (b" The magic number for {key} is {value}. " hidden in
filler at a uniformly random depth, the question at the end; only the answer digits are scored)
at L = training.seq_len. Then, for every RoPE base model.rope_theta * f (f in
`rope_theta_factors`), every context length n in `eval_lengths` and every depth in `depths`,
`eval_examples` fresh sequences (a seed apart from training's) give:

  - retrieval accuracy: the fraction of sequences whose every answer digit is the argmax
    prediction (sequence accuracy), and the fraction of answer digits right (digit accuracy);
  - the attention mass on the needle: at the query that predicts the first answer digit, the
    total weight each layer and head puts on the needle sentence's positions, averaged over the
    sequences (uniform attention would put needle_length / n there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnlab.data import NeedleConfig, load_corpus, needle_batch, needle_train_batches
from attnlab.data.tasks import FILLERS
from attnlab.experiments import lm
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


@dataclasses.dataclass(frozen=True)
class Config:
    """normalizers, model, training: as in `length_generalization` (training.seq_len is L);
    key_length, value_length, filler: the task (`attnlab.data.NeedleConfig`); eval_lengths:
    context lengths to test (each >= the task's minimum); depths: needle depths in [0, 1];
    eval_examples: sequences per (length, depth) cell; rope_theta_factors: RoPE bases to test,
    as multiples of model.rope_theta."""

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
    """One point per normalizer: train, then test every (theta, length, depth) cell."""
    return [{"normalizer": spec.label} for spec in config.normalizers]


def run_point(
    config: Config, point: dict[str, Any], *, progress: lm.Progress | None = None, workdir: Path | None = None
) -> list[dict[str, Any]]:
    """Train one model and test it. Records:

    {"record": "training"}: as in `length_generalization` (parameters, history, tokens_per_second,
      compile_seconds, train_seconds, wall_seconds, learned).
    {"record": "retrieval"} per (rope_theta_factor, length, depth): rope_theta, sequence_accuracy,
      digit_accuracy, needle_mass ([layer][head] mean weight on the needle at the first answer
      query), needle_mass_uniform (needle_length / (query position + 1), what uniform weights give).
    """
    normalizer = next(spec for spec in config.normalizers if spec.label == point["normalizer"])
    training = config.training
    corpus = load_corpus().validation if config.filler == "corpus" else None
    batches = needle_train_batches(
        config.task(training.seq_len, 0.0), batch_size=training.batch_size, seed=training.seed, corpus=corpus
    )
    data = {"data": {"task": to_json(config.task(training.seq_len, 0.0))}}
    if corpus is not None:
        data["data"]["filler_corpus"] = lm.corpus_settings(load_corpus(), "validation")
    model, trained = lm.train_model(
        config.model, training, normalizer, batches, settings=data, workdir=workdir, progress=progress
    )
    records = [{"record": "training", **trained, "learned": lm.learned_parameters(model)}]

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
        records.append(
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
    return records


KIND = Kind(
    name="needle",
    description="one LM per normalizer trained on passkey retrieval at L; accuracy over length (to >= 8 L) x depth",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer"},
    figures="attnlab.figures.needle",
)
