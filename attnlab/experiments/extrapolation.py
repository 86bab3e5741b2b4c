"""Length extrapolation on associative recall: train at tens of tokens, test at 16x to ~1000x that
length, per normalizer and positional encoding, with 95% intervals over seeds.

The ASEntmax paper's synthetic setting at small scale (Vasylenko et al., "Long-Context
Generalization with Sparse Attention", ICLR 2026; deep-spin/asentmax): models trained on recall
sequences of 32-64 tokens are tested on the same task at 64 to 65,536 tokens, softmax against
SSMax, entmax with and without length scaling and ASEntmax, with RoPE and without it (NoPE heads
beside ALiBi heads, their "NAPE"). Here the task is the lab's multi-query associative recall
(`attnlab.data.mqar_batch`, as the `mqar` kind): `num_kv_pairs` key-value pairs at the start, each
key queried once later in a background of one filler token (the paper's MQMTAR also sets its pairs
in a background of one space token), the loss at the queries only. With `power_a` = 1 the query
slots are uniform over the sequence, so in a sequence of n tokens a query sits at any distance up
to n from its pair: the task does not change with the length, only how far back and among how
many filler tokens the answer lies. The default, one pair (the answer is the one value in the
sequence: passkey retrieval with a one-token key), is what a 2-layer width-64 model learns within
a CPU sweep of 54 models (every model answers all queries by step ~100); with 2 pairs the same
model stayed at about 0.72 query accuracy through 3000 steps (the second query answered by
elimination, the first at chance), with 4 pairs at 0.3 after 1000 (guessing: 0.25): the
induction circuit that associative recall needs forms too slowly for that budget.
The filler tokens are identical, so a query whose pair lies among n of them is the SSMax paper's
Figure 1 row inside a trained model: one key that matches and n - 1 that all score the same, the
weight on the match fading as n grows unless the logits grow too.

A point is (seed, normalizer, positional encoding): one small `TransformerLM` (the `[model]`
shape, with `ModelConfig.positional` = "rope", "none" or "alibi", and, with `adaptive_scale`,
ASEntmax's beta and gamma computed from each query for the normalizers with ASEntmax's scale
policy) trained at L = training.seq_len on the seed's stream of sequences (the seed fixes the
initialisation and the data: the same for every normalizer and encoding under one seed). It is
then tested at every length n in `eval_lengths` on `eval_examples` held-out sequences of n
tokens, the same for every point (sequence i of length n is drawn with seed 2^31 + i, a seed no
training stream draws):

  - accuracy: the fraction of queries whose argmax prediction is the key's value;
  - sequence_accuracy: the fraction of sequences with every query right;
  - loss: the cross-entropy at the queries (nats).

The summary (`summarize`) gives, per (normalizer, positional encoding, length), each metric's
mean and Student-t 95% interval over the seeds, and its paired difference to softmax with the
same encoding at the same length on the seeds both ran (`attnlab.experiments.intervals`).

Differences from the paper that stay: its task is multi-token (MQMTAR: two-token keys and values
from a 256-symbol alphabet) with the number of pairs growing with the length and four queries at
the end, ours one token each, with a fixed number of pairs (one by default) and the queries
anywhere after them; it trains at varying lengths (48 +- 16) for hundreds of thousands of steps,
ours at one length for a few hundred; its NAPE puts ALiBi on half the heads (slopes 1, 1/2, ...)
and scales only the other half, ours puts ALiBi's standard slopes on every head, and a scale
policy multiplies ALiBi's penalty with the rest of the logit (`attnlab.nn.ModelConfig.positional`).
"""

from __future__ import annotations

import dataclasses
import time
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
    nonempty,
    noted,
    one_of,
    positive,
    setting,
)
from attnlab.experiments.config import to_json
from attnlab.experiments.kind import Kind
from attnlab.experiments.mqar import TRAINING_SEEDS, VALIDATION_SEEDS, training_batches
from attnlab.nn import ModelConfig
from attnlab.nn.attention import check_adaptive_scale
from attnlab.nn.transformer import POSITIONAL
from attnlab.normalizers import NormalizerSpec
from attnlab.normalizers.length_scaling import ASEntmaxScale
from attnlab.train import evaluate

TRAINING_LENGTH = 32  # the default L; the production scalings' lengths below are set to it
DEFAULT_NORMALIZERS = (
    NormalizerSpec("softmax"),
    NormalizerSpec("ssmax"),
    NormalizerSpec("logn_entmax15"),
    NormalizerSpec("asentmax"),
    NormalizerSpec("qwen_softmax", params={"seq_length": TRAINING_LENGTH}, label=f"Qwen log-n (L = {TRAINING_LENGTH})"),
    NormalizerSpec(
        "llama4_softmax", params={"floor_scale": TRAINING_LENGTH}, label=f"Llama 4 scaling (floor {TRAINING_LENGTH})"
    ),
)
TRAINING_METRICS = ("train_loss", "train_accuracy")
EVALUATION_METRICS = ("accuracy", "sequence_accuracy", "loss")


@dataclasses.dataclass(frozen=True)
class PositionalModel(lm.ModelSetting):
    """`lm.ModelSetting` with what varies between this kind's models besides the normalizer: the
    positional encoding (`ModelConfig.positional`) and ASEntmax's adaptive scale
    (`ModelConfig.adaptive_scale`). Both are part of the model's key (its checkpoint folder)."""

    positional: str = setting("rope", one_of(POSITIONAL))
    adaptive_scale: bool = False

    def model_config(self, normalizer: NormalizerSpec, output: Any = "softmax") -> ModelConfig:
        """`lm.ModelSetting.model_config` with this encoding and adaptive scale."""
        config = super().model_config(normalizer, output)
        return dataclasses.replace(config, positional=self.positional, adaptive_scale=self.adaptive_scale)


def _adaptive(spec: NormalizerSpec) -> bool:
    """Whether the spec's scale policy is ASEntmax's (the one `adaptive_scale` computes from each query)."""
    return spec.entry.scale is ASEntmaxScale


@dataclasses.dataclass(frozen=True)
class Config:
    """normalizers: the attention normalizers (one model per normalizer x encoding x seed);
    positionals: the positional encodings ("rope", "none": NoPE, "alibi"; `ModelConfig.positional`);
    adaptive_scale: for the normalizers whose scale policy is ASEntmax's ("asentmax"), compute
    beta and gamma from each query (the paper's adaptive ASEntmax); False: learned per head;
    model, training: the models' shape and training (`lm.ModelSetting`, `lm.TrainingSetting`;
    training.seq_len is the training length L, and its seed is replaced by the point's);
    vocab_size, num_kv_pairs, power_a: the task (`attnlab.data.MQARConfig`, every key queried
    once; power_a = 1 spreads the queries uniformly over the sequence); eval_lengths: the lengths n
    to test at (each >= L; L itself gives the accuracy the model learned); eval_examples:
    held-out sequences per length, the same for every point; eval_batch_tokens: tokens per
    evaluation batch (a batch holds the largest number of sequences <= eval_batch_tokens / n,
    at least one, that divides eval_examples); seeds: one model per seed, the seed fixing its
    initialisation and its training data; tuning: the learning-rate sweep per normalizer and
    encoding before the main run (`lm.TuningSetting`), scored by the loss on eval_examples
    validation sequences at L, apart from the test ones."""

    normalizers: tuple[NormalizerSpec, ...] = DEFAULT_NORMALIZERS
    positionals: tuple[str, ...] = setting(("rope", "none", "alibi"), nonempty, each(one_of(POSITIONAL)), distinct)
    adaptive_scale: bool = True
    model: lm.ModelSetting = dataclasses.field(default_factory=lambda: lm.ModelSetting(layers=2, width=64, heads=4))
    training: lm.TrainingSetting = dataclasses.field(
        default_factory=lambda: lm.TrainingSetting(
            seq_len=TRAINING_LENGTH,
            batch_size=64,
            steps=200,
            learning_rate=3e-3,
            warmup=30,
            log_every=25,
            checkpoint_every=100,
        )
    )
    vocab_size: int = setting(32, between(4, MAX_VOCAB))
    num_kv_pairs: int = setting(1, positive)
    power_a: float = setting(1.0, noted(positive, "1 is uniform"))
    eval_lengths: tuple[int, ...] = setting((32, 512, 2048), nonempty, each(at_least(2)), increasing, distinct)
    eval_examples: int = setting(32, positive)
    eval_batch_tokens: int = setting(65_536, positive)
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)
    tuning: lm.TuningSetting = dataclasses.field(
        default_factory=lambda: lm.TuningSetting(learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), seed=0)
    )

    def relations(self) -> Iterator[str]:
        short = [n for n in self.eval_lengths if n < self.training.seq_len]
        if short:
            yield (
                "{eval_lengths} must each be >= {training.seq_len} (the training length L); "
                f"{', '.join(map(str, short))} {'is' if len(short) == 1 else 'are'} not"
            )
        for n in sorted({self.training.seq_len, *self.eval_lengths}):
            try:
                self.task(n)
            except ValueError as err:
                yield f"{{num_kv_pairs}}, {{vocab_size}} and the length {n} make no MQAR task: {err}"
                break
        if self.adaptive_scale:
            for spec in self.normalizers:
                if _adaptive(spec):
                    try:
                        check_adaptive_scale(True, spec, f"normalizer {spec.label!r}")
                    except ValueError as err:
                        yield f"{{adaptive_scale}}: {err}"

    def __post_init__(self):
        check(self)

    def task(self, length: int) -> MQARConfig:
        """The MQAR task at `length` tokens (training at training.seq_len, testing at each eval length)."""
        return MQARConfig(seq_len=length, num_pairs=self.num_kv_pairs, vocab_size=self.vocab_size, power_a=self.power_a)

    def model_setting(self, positional: str, spec: NormalizerSpec) -> PositionalModel:
        """The model a point trains: `model` with the point's encoding, and the adaptive scale when
        `adaptive_scale` is set and the normalizer has ASEntmax's scale policy."""
        shape = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)}
        return PositionalModel(**shape, positional=positional, adaptive_scale=self.adaptive_scale and _adaptive(spec))

    def eval_batch_size(self, length: int) -> int:
        """Sequences per evaluation batch at `length`: the largest divisor of eval_examples that is
        at most eval_batch_tokens / length (at least 1)."""
        most = max(1, min(self.eval_examples, self.eval_batch_tokens // length))
        return next(b for b in range(most, 0, -1) if self.eval_examples % b == 0)


def points(config: Config) -> list[dict[str, Any]]:
    """The tuning points (normalizer x positional encoding x learning rate; none without tuning),
    then one point per seed x normalizer x positional encoding, seed first: an interrupted run has
    whole seeds."""
    groups = [{"normalizer": spec.label, "positional": positional}
              for spec in config.normalizers for positional in config.positionals]  # fmt: skip
    main = [{**group, "seed": seed} for seed in config.seeds for group in groups]
    return lm.tuning_points(config.tuning, groups) + main


def evaluation_batches(task: MQARConfig, examples: int, batch_size: int, *, validation: bool = False) -> list[Batch]:
    """The held-out sequences at task.seq_len: sequence i is `mqar_batch(task, batch_size=1, seed=2^31 + i)`
    (the same whatever the batching), joined into batches of `batch_size` (which divides `examples`);
    with validation=True (the sequences that score a model in tuning) seed 2^31 + 2^20 + i instead."""
    first = TRAINING_SEEDS + (VALIDATION_SEEDS if validation else 0)
    sequences = [mqar_batch(task, batch_size=1, seed=first + i) for i in range(examples)]
    fields = ("inputs", "targets", "loss_mask")  # an MQAR batch has no needle_mask
    return [
        Batch(*(np.concatenate([getattr(s, f) for s in sequences[start : start + batch_size]]) for f in fields))
        for start in range(0, examples, batch_size)
    ]


def run_point(
    config: Config,
    point: dict[str, Any],
    *,
    progress: lm.Progress | None = None,
    workdir: Path | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one model at L (at the learning rate its normalizer and encoding's tuning chose among
    `records`) and test it at every evaluation length; or, at a tuning point, train one at the
    point's rate and score it by its loss on eval_examples validation sequences at L ({"record":
    "tuning"}, see `lm.tuning_record`). Records (the runner adds the point to each):

    {"record": "training"}: adaptive_scale, train_loss and train_accuracy (the last history
      entry's: means over its log_every steps, at the queries), steps, parameters, history,
      tokens_per_second, compile_seconds, train_seconds, wall_seconds, model_key (see
      `lm.train_model`), learned (each learned normalizer parameter per layer and head).
    {"record": "evaluation"} per length n: length, length_factor (n / L), accuracy,
      sequence_accuracy, loss, examples (sequences), queries (scored positions), batch_size,
      eval_seconds (compiling included).
    """
    normalizer = next(spec for spec in config.normalizers if spec.label == point["normalizer"])
    training = lm.point_training(config.training, config.tuning, point, records, ("normalizer", "positional"))
    model_setting = config.model_setting(point["positional"], normalizer)
    task = config.task(training.seq_len)
    validation = evaluation_batches(
        task, config.eval_examples, config.eval_batch_size(training.seq_len), validation=True
    )
    model, trained = lm.train_model(
        model_setting,
        training,
        normalizer,
        training_batches(task, batch_size=training.batch_size, seed=training.seed),
        settings={"data": {"task": to_json(task)}},
        eval_batches=lambda: validation,
        workdir=workdir,
        progress=progress,
        name=f"extrapolation_{normalizer.label}_{point['positional']}_seed{training.seed}",
        tolerate_divergence=lm.is_tuning(point),
    )
    if lm.is_tuning(point):
        return [lm.tuning_record(trained, training)]
    out = [
        {
            "record": "training",
            "adaptive_scale": model_setting.adaptive_scale,
            "learning_rate": training.learning_rate,
            "train_loss": trained["history"][-1]["loss"],
            "train_accuracy": trained["history"][-1]["accuracy"],
            "steps": training.steps,
            **trained,
            "learned": lm.learned_parameters(model),
        }
    ]
    for i, length in enumerate(config.eval_lengths):
        if progress is not None:
            progress(
                f"testing {normalizer.label} ({point['positional']}) at n = {length:,}", i, len(config.eval_lengths)
            )
        started = time.perf_counter()
        batch_size = config.eval_batch_size(length)
        batches = evaluation_batches(config.task(length), config.eval_examples, batch_size)
        result = evaluate(model, batches, global_batches=True)
        out.append(
            {
                "record": "evaluation",
                "length": length,
                "length_factor": length / training.seq_len,
                "accuracy": result.token_accuracy,
                "sequence_accuracy": result.sequence_accuracy,
                "loss": result.loss,
                "examples": config.eval_examples,
                "queries": result.scored_tokens,
                "batch_size": batch_size,
                "eval_seconds": time.perf_counter() - started,
            }
        )
    return out


def summary_of(records: list[dict[str, Any]], baseline: str | None = "softmax") -> dict[str, Any]:
    """Means and Student-t 95% intervals over seeds (see `intervals.summarize_records`):

    {"tuning": per (normalizer, positional), the rates tried and chosen (`lm.tuning_summary`);
     "training": per (normalizer, positional): train_loss, train_accuracy;
     "evaluation": per (normalizer, positional, length): accuracy, sequence_accuracy, loss}

    each with the paired difference to the `baseline` normalizer (a label; None: no pairs) with
    the same encoding (and length) on the seeds both ran.
    """
    against = None if baseline is None else {"normalizer": baseline}
    trained = [r for r in records if r.get("record") == "training"]
    evaluated = [r for r in records if r.get("record") == "evaluation"]
    return {
        "tuning": lm.tuning_summary(records, ("normalizer", "positional")),
        "training": intervals.summarize_records(
            trained, by=("normalizer", "positional"), metrics=TRAINING_METRICS, baseline=against
        ),
        "evaluation": intervals.summarize_records(
            evaluated, by=("normalizer", "positional", "length"), metrics=EVALUATION_METRICS, baseline=against
        ),
    }


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's summary: `summary_of` against the config's first softmax normalizer."""
    return summary_of(records, lm.baseline_label([spec.to_json() for spec in config.normalizers]))


KIND = Kind(
    name="extrapolation",
    description=(
        "associative recall trained at tens of tokens, tested at 16x-1000x: accuracy vs length per normalizer "
        "and positional encoding (RoPE, NoPE, ALiBi), over seeds"
    ),
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "positionals": "positional", "seeds": "seed"},
    figures="attnlab.figures.extrapolation",
    summarize=summarize,
)
