"""Knowledge distillation (Hinton et al. 2015): a larger byte-level LM teaches a smaller one at
temperatures T, against the same small model trained on the labels alone.

On the default corpus (`attnlab.data.load_corpus()`: the Python standard library's source), with
softmax attention and output throughout:

  - the teacher (`teacher`, trained as `teacher_training`) learns from the labels;
  - the baseline student (`student`, trained as `student_training`) learns from the labels;
  - for every soft-loss weight w in `weights` and temperature T in `temperatures`, a student of
    the same shape, initialisation, data and optimizer as the baseline learns from
    (1 - w) CE + w T^2 KL(softmax(teacher / T) || softmax(student / T))
    (`attnlab.train.distillation_loss`), the frozen teacher run inside each training step.

Every model is scored on the same `eval_windows` validation windows of student_training.seq_len
bytes spread evenly over the validation split: cross-entropy (nats per byte) and token accuracy,
every `eval_every` steps and at the end. A distilled student below the baseline gained from the
teacher; the teacher's own loss is how much there was to gain.

All of this is done once per seed in `seeds`: the seed sets the teacher's and the students'
initialisation and the order of their training windows (teacher_training.seed and
student_training.seed are replaced by the point's), so under one seed the baseline and every
distilled student share their initialisation and data, and learn from that seed's teacher.

Each seed's teacher is trained once, checkpointed under the run's `workdir` (keyed by its
settings); every student point of that seed restores it from there (training it first if no
point has yet), so any subset of the points runs, and an interrupted run resumes.

Records (one per model and seed): see `run_point`. The summary (`summarize`) gives the mean and
Student-t 95% interval over seeds of every model's validation loss and token accuracy, and each
distilled student's (and the teacher's) paired difference to the baseline on the seeds both ran
(`attnlab.experiments.intervals`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnlab.data import load_corpus, spread_batches, train_batches
from attnlab.experiments import intervals, lm
from attnlab.experiments.checks import (
    at_least,
    between,
    check,
    distinct,
    each,
    multiple_of,
    nonempty,
    noted,
    positive,
    setting,
)
from attnlab.experiments.kind import Kind
from attnlab.normalizers import NormalizerSpec
from attnlab.train import distillation_objective

TEACHER, BASELINE, STUDENT = "teacher", "baseline", "student"
ATTENTION = NormalizerSpec("softmax")
EVAL_BATCH = 8
METRICS = ("validation_loss", "token_accuracy")
GROUPS = ("model", "temperature", "weight")
# The baseline student's group: every other model is compared with it, paired by seed.
BASELINE_GROUP = {"model": BASELINE, "temperature": None, "weight": 0.0}


def _default_student() -> lm.ModelSetting:
    return lm.ModelSetting(layers=2, width=64, heads=2)


@dataclasses.dataclass(frozen=True)
class Config:
    """teacher, student: the two shapes (`lm.ModelSetting`; default 4 layers x width 128 and
    2 layers x width 64, both with head_dim 32); teacher_training, student_training: how each is
    trained (`lm.TrainingSetting`; the baseline and every distilled student share
    student_training: same data, initialisation seed and optimizer; the seeds of both are
    replaced by the point's); seeds: one teacher, baseline and set of students per seed, the
    seed fixing their initialisation and the order of their training windows; temperatures: the T of the
    distilled students (> 0); weights: the soft-loss weights w in (0, 1], one student per w x T;
    eval_windows: validation windows (a multiple of 8), the same for every model; eval_every:
    steps between validation evaluations during training (0: only at the end).

    A `[student]` or `[teacher]` table changes only the keys it gives (the others keep these
    defaults)."""

    teacher: lm.ModelSetting = dataclasses.field(default_factory=lm.ModelSetting)
    student: lm.ModelSetting = dataclasses.field(default_factory=_default_student)
    teacher_training: lm.TrainingSetting = dataclasses.field(default_factory=lm.TrainingSetting)
    student_training: lm.TrainingSetting = dataclasses.field(default_factory=lm.TrainingSetting)
    temperatures: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0), nonempty, each(positive), distinct)
    weights: tuple[float, ...] = setting(
        (0.5,), nonempty, each(noted(between(0, 1, "(]"), "w = 0 is the baseline, always run")), distinct
    )
    eval_windows: int = setting(64, multiple_of(EVAL_BATCH))
    eval_every: int = setting(50, noted(at_least(0), "0: only at the end"))
    seeds: tuple[int, ...] = setting((0, 1, 2), nonempty, each(at_least(0)), distinct)

    def relations(self) -> Iterator[str]:
        if self.teacher_training.seq_len < self.student_training.seq_len:
            yield (
                "{teacher_training.seq_len} must be >= {student_training.seq_len} "
                "(the teacher reads the students' windows)"
            )

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """Per seed (seed first: an interrupted run has whole seeds), the teacher, the baseline student,
    then one distilled student per weight x temperature."""
    out = []
    for seed in config.seeds:
        out += [{"model": TEACHER, "seed": seed}, {"model": BASELINE, "seed": seed}]
        out += [
            {"model": STUDENT, "temperature": t, "weight": w, "seed": seed}
            for w in config.weights
            for t in config.temperatures
        ]
    return out


def _train(
    config: Config,
    role: str,
    seed: int,
    *,
    workdir: Path | None,
    progress: lm.Progress | None,
    name: str | None = None,
    objective: Any = None,
    objective_settings: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train (or restore from workdir) the teacher or a student of `seed` (its initialisation and
    data order); returns the model and its record (with model_key, validation_loss and
    token_accuracy: the last evaluation's).
    `objective_settings` describes `objective` in the model's key (the teacher's key, T, w)."""
    setting = config.teacher if role == TEACHER else config.student
    training = dataclasses.replace(config.teacher_training if role == TEACHER else config.student_training, seed=seed)
    corpus = load_corpus()
    batches = train_batches(corpus.train, seq_len=training.seq_len, batch_size=training.batch_size, seed=training.seed)
    windows = spread_batches(
        corpus.validation, seq_len=config.student_training.seq_len, count=config.eval_windows,
        batch_size=EVAL_BATCH, name="validation split",
    )  # fmt: skip
    model, trained = lm.train_model(
        setting,
        training,
        ATTENTION,
        batches,
        settings={
            "data": lm.corpus_settings(corpus),
            "evaluation": {"windows": config.eval_windows, "seq_len": config.student_training.seq_len},
            "objective": objective_settings,
        },
        eval_batches=lambda: windows,
        workdir=workdir,
        progress=progress,
        name=name or role,
        objective=objective,
        eval_every=config.eval_every,
    )
    trained["token_accuracy"] = trained["evaluations"][-1]["token_accuracy"]
    shape = {"layers": setting.layers, "width": setting.width, "heads": setting.heads}
    return model, {"record": "training", **shape, **trained}


def run_point(
    config: Config, point: dict[str, Any], *, progress: lm.Progress | None = None, workdir: Path | None = None
) -> list[dict[str, Any]]:
    """Train one model of the point's seed (the teacher, the baseline, or a student distilled at
    T and w from that seed's teacher). One record (the runner adds the point's keys, seed
    included):

    {"record": "training", "model": "teacher" | "baseline" | "student", "temperature" (T; null for
      the teacher and the baseline), "weight" (w; 0 for the baseline, null for the teacher)}:
      layers, width, heads, parameters, history (per log_every steps: step, loss (the training
      objective: cross-entropy, or the distillation loss for a student), accuracy, grad_norm,
      learning_rate, tokens_per_second, elapsed_seconds), evaluations (every eval_every steps
      and at the end, on the validation windows: step, loss (cross-entropy, nats per byte),
      token_accuracy, ...), validation_loss and token_accuracy (the last evaluation's),
      tokens_per_second, compile_seconds, train_seconds, wall_seconds (see `lm.train_model`).

    A student point restores its seed's teacher from its checkpoint under workdir (keyed by the
    teacher's settings, seed included), training it there first if no point has (without a
    workdir, it trains the teacher again).
    """
    role, seed = point["model"], point["seed"]
    if role == TEACHER:
        _, record = _train(config, TEACHER, seed, workdir=workdir, progress=progress)
        return [{**record, "temperature": None, "weight": None}]
    if role == BASELINE:
        _, record = _train(config, BASELINE, seed, workdir=workdir, progress=progress)
        return [{**record, "temperature": None, "weight": 0.0}]
    temperature, weight = point["temperature"], point["weight"]
    teacher, taught = _train(config, TEACHER, seed, workdir=workdir, progress=progress)
    objective = distillation_objective(teacher, temperature=temperature, weight=weight)
    described = {"teacher": taught["model_key"], "temperature": temperature, "weight": weight}
    name = f"student_T{temperature:g}_w{weight:g}"
    _, record = _train(
        config,
        STUDENT,
        seed,
        workdir=workdir,
        progress=progress,
        name=name,
        objective=objective,
        objective_settings=described,
    )
    return [{**record, "temperature": temperature, "weight": weight}]


def summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model (teacher, baseline, each distilled student's T and w), the mean and Student-t 95%
    interval over seeds of its validation loss and token accuracy, and each model's paired
    difference to the baseline student on the seeds both ran (see `intervals.summarize_records`;
    a student below the baseline's loss gained from its teacher). A record without a seed
    (written before seeds were swept) is seed 0."""
    rows = [
        {**{key: r[key] for key in GROUPS}, "seed": lm.seed_of(r), **{metric: r.get(metric) for metric in METRICS}}
        for r in records
        if r.get("record") == "training"
    ]
    return intervals.summarize_records(rows, by=GROUPS, metrics=METRICS, baseline=BASELINE_GROUP)


def summarize(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's summary: `summary_of` the records."""
    return summary_of(records)


KIND = Kind(
    name="distillation",
    description=(
        "a larger LM distils into a smaller one at temperatures T: student validation loss vs T and vs no teacher"
    ),
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"temperatures": "temperature", "weights": "weight", "seeds": "seed"},
    figures="attnlab.figures.distillation",
    summarize=summarize,
)
