"""The distillation kind: per seed, a teacher, the student alone, and one distilled student per temperature.

The quick config (two seeds) runs once per module (tiny models, a few steps), with every call of
the training loop watched; the tests then check the records, that each seed's teacher is trained
once and restored everywhere else, the summary's intervals over seeds and paired differences to
the student alone, that a seed fixes the initialisation and the data, the figures (also of the
committed single-seed results), resumption from the checkpoints, and the config checks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from attnlab import cli, experiments, figures
from attnlab.experiments import distillation, lm
from attnlab.experiments.config import ConfigError
from attnlab.experiments.intervals import paired_difference, t_interval

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "distillation_quick.toml"
FIELDS = {
    "point_key",
    "model_key",
    "model",
    "seed",
    "record",
    "temperature",
    "weight",
    "layers",
    "width",
    "heads",
    "parameters",
    "history",
    "evaluations",
    "validation_loss",
    "token_accuracy",
    "tokens_per_second",
    "compile_seconds",
    "train_seconds",
    "wall_seconds",
}


def _run_watched(args: list[str]) -> list[tuple[str, int]]:
    """Run the CLI; returns (model name, tokens trained in that call) per training-loop call."""
    calls = []
    real = lm.train

    def watched(*positional, **keywords):
        result = real(*positional, **keywords)
        calls.append((keywords["name"], result.tokens))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train", watched)
        assert cli.main(args) == 0
    return calls


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, watch_training):
    """The quick config run once: (the results folder, (model name, tokens trained) per training
    loop, the watched `lm.train_model` calls)."""
    out = tmp_path_factory.mktemp("results")
    models: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train_model", watch_training(models))
        calls = _run_watched(["run", str(QUICK), "--out", str(out), "--no-progress"])
    return out, calls, models


@pytest.fixture(scope="module")
def quick_run(watched_run):
    return watched_run[:2]


def _records(out: Path) -> list[dict]:
    return json.loads((out / "distillation_quick.json").read_text())["records"]


def test_records_hold_every_model_on_the_same_windows(quick_run):
    out, _ = quick_run
    config = experiments.load(QUICK).config
    records = _records(out)
    # Seed-major: an interrupted run has whole seeds.
    assert [(r["seed"], r["model"], r["temperature"], r["weight"]) for r in records] == [
        (seed, *model)
        for seed in (0, 1)
        for model in (("teacher", None, None), ("baseline", None, 0.0), ("student", 1.0, 0.5), ("student", 4.0, 0.5))
    ]
    windows = config.eval_windows * config.student_training.seq_len
    for r in records:
        assert set(r) == FIELDS and r["record"] == "training"
        assert [e["step"] for e in r["evaluations"]] == [2, 4, 6]
        assert all(e["scored_tokens"] == windows for e in r["evaluations"])
        assert r["validation_loss"] == r["evaluations"][-1]["loss"] and math.isfinite(r["validation_loss"])
        assert r["token_accuracy"] == r["evaluations"][-1]["token_accuracy"]
        assert r["token_accuracy"] * windows == pytest.approx(round(r["token_accuracy"] * windows))
        assert [h["step"] for h in r["history"]] == [2, 4, 6]
        assert r["compile_seconds"] > 0 and r["train_seconds"] > 0
    teacher, baseline, *students = records[:4]  # seed 0's
    assert (teacher["layers"], teacher["width"]) == (config.teacher.layers, config.teacher.width)
    assert teacher["parameters"] > baseline["parameters"]
    # Every student has the baseline's shape, schedule and data; only the objective differs.
    for student in students:
        assert (student["width"], student["parameters"]) == (baseline["width"], baseline["parameters"])
        assert [h["learning_rate"] for h in student["history"]] == [h["learning_rate"] for h in baseline["history"]]
        assert student["history"][0]["loss"] != baseline["history"][0]["loss"]
    assert students[0]["validation_loss"] != students[1]["validation_loss"]  # T reaches the loss


def test_the_teacher_is_trained_once_and_restored_by_every_student(quick_run):
    out, calls = quick_run
    # Per seed: the teacher point trains its teacher, then each student point of that seed restores it.
    teacher = [tokens for name, tokens in calls if name == "teacher"]
    assert len(teacher) == 6
    assert teacher[0] > 0 and teacher[1:3] == [0, 0] and teacher[3] > 0 and teacher[4:] == [0, 0]
    students = [name for name, tokens in calls if name != "teacher" and tokens > 0]
    assert students == ["baseline", "student_T1_w0.5", "student_T4_w0.5"] * 2
    saved = sorted(p.name.rsplit("-", 1)[0] for p in (out / "checkpoints").iterdir())
    assert saved == sorted(["baseline", "student_T1_w0.5", "student_T4_w0.5", "teacher"] * 2)
    # A student's key holds its teacher's: a retrained teacher could never be paired with old students.
    keys = {p.name.rsplit("-", 1)[1] for p in (out / "checkpoints").iterdir()}
    assert len(keys) == 8
    assert {r["model_key"] for r in _records(out)} == keys


def test_a_rerun_without_the_json_restores_everything_and_trains_nothing(quick_run, tmp_path):
    out, _ = quick_run
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints", again / "checkpoints")
    calls = _run_watched(["run", str(QUICK), "--out", str(again), "--no-progress", "--no-figures"])
    assert calls and all(tokens == 0 for _, tokens in calls)
    before, after = _records(out), _records(again)
    assert all(r["compile_seconds"] == 0 for r in after)
    for key in ("history", "evaluations", "validation_loss", "train_seconds"):
        assert [r[key] for r in after] == [r[key] for r in before]


def test_figures_are_redrawn_byte_identically(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    drawn = {p.name: p.read_bytes() for p in sorted((copy / "figures").iterdir())}
    stems = ("temperature", "training")
    assert set(drawn) == {f"distillation_quick_{stem}.{ext}" for stem in stems for ext in ("png", "svg")}
    shutil.rmtree(copy / "figures")
    assert cli.main(["figures", str(copy)]) == 0
    assert {p.name: p.read_bytes() for p in sorted((copy / "figures").iterdir())} == drawn
    assert "distillation_quick_temperature.png" in (copy / "README.md").read_text()


def test_points_cross_weights_and_temperatures_after_the_teacher_and_the_baseline_per_seed():
    config = distillation.Config(temperatures=(2.0, 8.0), weights=(0.5, 1.0), seeds=(3, 1))
    assert distillation.points(config) == [
        point
        for seed in (3, 1)
        for point in (
            {"model": "teacher", "seed": seed},
            {"model": "baseline", "seed": seed},
            {"model": "student", "temperature": 2.0, "weight": 0.5, "seed": seed},
            {"model": "student", "temperature": 8.0, "weight": 0.5, "seed": seed},
            {"model": "student", "temperature": 2.0, "weight": 1.0, "seed": seed},
            {"model": "student", "temperature": 8.0, "weight": 1.0, "seed": seed},
        )
    ]


def test_summary_holds_t_intervals_over_seeds_and_paired_differences_to_the_student_alone(quick_run):
    out, _ = quick_run
    payload = json.loads((out / "distillation_quick.json").read_text())
    records, summary = payload["records"], payload["summary"]

    def seeds_of(model: str, temperature, weight, metric: str) -> list[float]:
        found = [r for r in records if (r["model"], r["temperature"], r["weight"]) == (model, temperature, weight)]
        return [r[metric] for r in sorted(found, key=lambda r: r["seed"])]

    groups = [("teacher", None, None), ("baseline", None, 0.0), ("student", 1.0, 0.5), ("student", 4.0, 0.5)]
    assert summary["method"] == "t" and summary["level"] == 0.95
    assert [(g["model"], g["temperature"], g["weight"]) for g in summary["groups"]] == groups
    for group in summary["groups"]:
        assert group["seeds"] == [0, 1]
        for metric in distillation.METRICS:
            values = seeds_of(group["model"], group["temperature"], group["weight"], metric)
            expected = t_interval(values).to_json()
            assert group[metric]["n"] == 2 and group[metric]["mean"] == pytest.approx(np.mean(values))
            assert group[metric]["low"] == pytest.approx(expected["low"])
    baseline = {"model": "baseline", "temperature": None, "weight": 0.0}
    paired = summary["paired"]
    assert [(p["model"], p["temperature"], p["weight"]) for p in paired] == [groups[0], *groups[2:]]
    for pair in paired:
        assert pair["against"] == baseline
        ours = seeds_of(pair["model"], pair["temperature"], pair["weight"], "validation_loss")
        expected = paired_difference(ours, seeds_of("baseline", None, 0.0, "validation_loss")).to_json()
        assert pair["validation_loss"]["n"] == 2 and pair["validation_loss"]["mean"] == pytest.approx(expected["mean"])
        assert pair["validation_loss"]["low"] == pytest.approx(expected["low"])
    # The figures' fallback (a run in progress, no summary yet) computes the same.
    assert distillation.summary_of(records) == summary


def test_a_seed_fixes_initialisation_and_data_of_the_baseline_and_every_student(watched_run):
    out, _, models = watched_run
    trained = [m for m in models if m["name"] != "teacher"]
    by = {(m["name"], m["seed"]): m for m in trained}
    assert len(trained) == len(by) == 6
    for seed in (0, 1):
        # One seed: every student starts from the baseline's initialisation and sees its windows in its order.
        baseline = by[("baseline", seed)]
        for name in ("student_T1_w0.5", "student_T4_w0.5"):
            student = by[(name, seed)]
            assert student["weights"] == baseline["weights"]
            assert all(np.array_equal(a, b) for a, b in zip(student["inputs"], baseline["inputs"], strict=True))
    # Another seed: another initialisation and other data, for the students and for the teacher.
    assert by[("baseline", 0)]["weights"] != by[("baseline", 1)]["weights"]
    assert not np.array_equal(by[("baseline", 0)]["inputs"][0], by[("baseline", 1)]["inputs"][0])
    teachers = {m["seed"]: m["weights"] for m in models if m["name"] == "teacher"}
    assert set(teachers) == {0, 1} and teachers[0] != teachers[1]
    losses = {(r["model"], r["seed"]): r["history"][0]["loss"] for r in _records(out) if r["model"] != "student"}
    assert losses[("teacher", 0)] != losses[("teacher", 1)] and losses[("baseline", 0)] != losses[("baseline", 1)]


def test_the_committed_single_seed_results_are_drawn(tmp_path):
    # The first committed run (archived when the 3-seed run replaced it) predates seeds: its records
    # have none (seed 0 of one run) and no summary.
    copy = tmp_path / "distillation.json"
    shutil.copy(REPO / "results" / "archive" / "distillation" / "20261121T202321Z.json", copy)
    payload = json.loads(copy.read_text())
    assert "summary" not in payload and all("seed" not in r for r in payload["records"])
    drawn = figures.render(copy)
    assert {p.name for p in drawn} == {
        f"distillation_{s}.{e}" for s in ("temperature", "training") for e in ("png", "svg")
    }
    summary = distillation.summary_of(payload["records"])
    assert len(summary["groups"]) == len(payload["records"]) and len(summary["paired"]) == len(payload["records"]) - 1
    assert all(g["seeds"] == [0] and g["validation_loss"]["low"] is None for g in summary["groups"])


def test_the_full_config_takes_three_seeds():
    full = experiments.load(REPO / "experiments" / "distillation.toml").config
    assert full.seeds == (0, 1, 2) and distillation.Config().seeds == (0, 1, 2)
    assert len(distillation.points(full)) == 3 * (2 + len(full.weights) * len(full.temperatures))


def test_a_partial_model_table_keeps_the_kinds_other_defaults(tmp_path):
    path = tmp_path / "partial.toml"
    path.write_text('kind = "distillation"\n[student]\nlayers = 3\n[teacher_training]\nsteps = 500\n')
    config = experiments.load(path).config
    assert config.student == lm.ModelSetting(layers=3, width=64, heads=2)
    assert config.teacher == distillation.Config().teacher
    assert config.teacher_training.steps == 500 and config.teacher_training.seq_len == 128
    assert experiments.load(path, ["student.width=32"]).config.student == lm.ModelSetting(3, 32, 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("temperatures = [1.0, 0.0]", r"temperatures must all be > 0; got \[1.0, 0.0\]"),
        ("temperatures = []", r"temperatures must be a non-empty list"),
        ("temperatures = [2, 2]", r"temperatures must not repeat a value; got \[2.0, 2.0\]"),
        ("weights = [0.0]", r"weights must all be in \(0, 1\] \(w = 0 is the baseline, always run\); got \[0.0\]"),
        ("weights = [1.5]", r"weights must .* got \[1.5\]"),
        ("eval_windows = 12", "eval_windows must be a positive multiple of 8; got 12"),
        ("eval_every = -1", r"eval_every must be >= 0"),
        ("seeds = [-1]", r"seeds must all be >= 0; got \[-1\]"),
        ("[teacher_training]\nseq_len = 64", r"teacher_training.seq_len=64 must be >= student_training.seq_len=128"),
        ("[student]\nwidth = 30", r"student.width=30 must be a multiple of student.heads=2 with an even head_dim"),
        ("[student]\ndepth = 2", r"student: unknown key 'depth'; accepted keys: layers, width, heads, rope_theta"),
        ("weight = 0.5", r"unknown key 'weight'; accepted keys: teacher, student,"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(f'kind = "distillation"\n{text}\n')
    with pytest.raises(ConfigError, match=match) as err:
        experiments.load(path)
    assert all(str(path) in problem for problem in err.value.problems)
