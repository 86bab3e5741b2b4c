"""The experiment kinds that train a model per normalizer and seed: length_generalization and needle.

The quick configs (two seeds) run once per module (they train tiny models for a few steps), with
every call of the training loop watched; the tests then check what the records must satisfy
whatever the training reached, the summaries' intervals over seeds and paired differences, that
a seed fixes the initialisation and the data (the same data for every normalizer), the figures
(also of the committed single-seed results), resumption from the checkpoints, and the config
checks of nested tables and trained-normalizer specs.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from attnlab import cli, experiments, figures
from attnlab.data import NeedleConfig, needle_train_batches
from attnlab.experiments import length_generalization, lm, needle
from attnlab.experiments.config import ConfigError
from attnlab.experiments.intervals import paired_difference, t_interval
from attnlab.figures import bands
from attnlab.figures.training import seed_curve
from attnlab.normalizers import NormalizerSpec

REPO = Path(__file__).resolve().parents[2]
LENGTH_QUICK = REPO / "experiments" / "length_generalization_quick.toml"
NEEDLE_QUICK = REPO / "experiments" / "needle_quick.toml"


@pytest.fixture(scope="module")
def watched_runs(tmp_path_factory, watch_training):
    """Both quick configs run once: (the results folder, the watched training calls)."""
    out = tmp_path_factory.mktemp("results")
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train_model", watch_training(calls))
        assert cli.main(["run", str(LENGTH_QUICK), str(NEEDLE_QUICK), "--out", str(out), "--no-progress"]) == 0
    return out, calls


@pytest.fixture(scope="module")
def quick_runs(watched_runs):
    return watched_runs[0]


def _records(out: Path, name: str, record: str) -> list[dict]:
    payload = json.loads((out / f"{name}.json").read_text())
    return [r for r in payload["records"] if r["record"] == record]


def test_length_generalization_records(quick_runs):
    config = experiments.load(LENGTH_QUICK).config
    trained = _records(quick_runs, "length_generalization_quick", "training")
    assert config.seeds == (0, 1)  # seed-major: an interrupted run has whole seeds
    assert [(r["seed"], r["normalizer"]) for r in trained] == [(i, s.label) for i in (0, 1) for s in config.normalizers]
    for r in trained:
        assert [h["step"] for h in r["history"]] == list(range(2, config.training.steps + 1, 2))
        assert math.isfinite(r["validation_loss"]) and r["compile_seconds"] > 0
        # Scored on held-out windows of length L (those that score a tuning model), at the end.
        assert r["evaluations"][-1]["step"] == config.training.steps
        assert r["validation_loss"] == r["evaluations"][-1]["loss"]
        assert r["learning_rate"] == config.training.learning_rate  # no tuning in the quick config
    learned = next(r for r in trained if r["normalizer"] == "SSMax + bias")["learned"]
    assert set(learned) == {"s", "bias"}
    assert np.shape(learned["s"]) == np.shape(learned["bias"]) == (config.model.layers, config.model.heads)
    assert next(r for r in trained if r["normalizer"] == "softmax")["learned"] == {}

    evaluations = _records(quick_runs, "length_generalization_quick", "evaluation")
    assert len(evaluations) == len(config.normalizers) * len(config.rope_theta_factors) * len(config.seeds)
    length, long = config.training.seq_len, config.eval_length
    for r in evaluations:
        loss = np.array(r["per_position_loss"])
        assert loss.shape == (long,) and np.all(np.isfinite(loss))
        assert r["loss_within"] == pytest.approx(loss[:length].mean())
        assert r["loss_beyond"] == pytest.approx(loss[length:].mean())
        assert r["loss"] == pytest.approx(loss.mean(), rel=1e-6)  # every position is scored once per window
        edges = r["position_edges"]
        assert edges[0] == 0 and edges[-1] == long and edges[1] == 1
        max_weight, entropy = np.array(r["max_weight"]), np.array(r["entropy"])
        assert max_weight.shape == (config.model.layers, len(edges) - 1)
        # Query 0 sees one key: weight exactly 1, entropy 0, support 1, for every normalizer.
        assert np.allclose(max_weight[:, 0], 1.0) and np.allclose(entropy[:, 0], 0.0, atol=1e-6)
        assert np.allclose(np.array(r["support_size"])[:, 0], 1.0)
        zero_fraction = np.array(r["zero_fraction"])
        assert np.all((zero_fraction >= 0) & (zero_fraction < 1))
        if r["normalizer"] == "softmax":
            assert np.all(zero_fraction == 0.0)
    # A raised RoPE base changes the loss beyond position 0 (theta is really passed through).
    softmax = [r for r in evaluations if r["normalizer"] == "softmax" and r["seed"] == 0]
    assert softmax[0]["per_position_loss"][0] == pytest.approx(softmax[1]["per_position_loss"][0], rel=1e-5)
    assert softmax[0]["per_position_loss"][long // 2] != softmax[1]["per_position_loss"][long // 2]


def test_needle_records(quick_runs):
    config = experiments.load(NEEDLE_QUICK).config
    cells = _records(quick_runs, "needle_quick", "retrieval")
    expected = len(config.normalizers) * len(config.rope_theta_factors) * len(config.eval_lengths) * len(config.depths)
    assert len(cells) == expected * len(config.seeds)
    for r in cells:
        task = NeedleConfig(seq_len=r["length"], key_length=config.key_length, value_length=config.value_length)
        assert 0.0 <= r["sequence_accuracy"] <= r["digit_accuracy"] <= 1.0
        # digit accuracy is a multiple of 1 / (examples x digits)
        scaled = r["digit_accuracy"] * config.eval_examples * config.value_length
        assert scaled == pytest.approx(round(scaled))
        mass = np.array(r["needle_mass"])
        assert mass.shape == (config.model.layers, config.model.heads)
        assert np.all((mass >= 0.0) & (mass <= 1.0 + 1e-6))
        query = r["length"] - config.value_length
        assert r["needle_mass_uniform"] == pytest.approx(task.needle_length / (query + 1))


def test_training_figures_are_drawn_and_stable(quick_runs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(quick_runs, out, ignore=shutil.ignore_patterns("checkpoints"))
    drawn = {p.name: p.read_bytes() for p in sorted((out / "figures").iterdir())}
    for stem in ("training_loss", "loss_vs_position", "losses", "attention_vs_position", "sparsity_vs_position"):
        assert f"length_generalization_quick_{stem}.png" in drawn and f"length_generalization_quick_{stem}.svg" in drawn
    for stem in ("training_loss", "accuracy", "accuracy_vs_length", "needle_mass"):
        assert f"needle_quick_{stem}.png" in drawn and f"needle_quick_{stem}.svg" in drawn
    shutil.rmtree(out / "figures")
    assert cli.main(["figures", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in sorted((out / "figures").iterdir())} == drawn
    index = (out / "README.md").read_text()
    assert "needle_quick_accuracy.png" in index and "length_generalization_quick_loss_vs_position.png" in index


def test_a_rerun_resumes_from_the_checkpoints_without_training(quick_runs, tmp_path):
    # The JSON is gone but the checkpoints of the finished models are there: the rerun restores
    # each model at its last step, trains nothing, and measures the same thing.
    out = tmp_path / "again"
    shutil.copytree(quick_runs / "checkpoints", out / "checkpoints")
    needle_keys = [(r["normalizer"], r["model_key"]) for r in _records(quick_runs, "needle_quick", "training")]
    saved = {p.name for p in (out / "checkpoints").iterdir()}
    assert len(set(needle_keys)) == 4 and {f"{label}-{key}" for label, key in needle_keys} <= saved
    assert cli.main(["run", str(NEEDLE_QUICK), "--out", str(out), "--no-progress", "--no-figures"]) == 0
    before = _records(quick_runs, "needle_quick", "training")
    after = _records(out, "needle_quick", "training")
    assert [r["history"] for r in after] == [r["history"] for r in before]
    assert all(r["compile_seconds"] == 0 for r in after)  # nothing was trained
    assert [r["train_seconds"] for r in after] == [r["train_seconds"] for r in before]
    first = [(r["digit_accuracy"], r["needle_mass"]) for r in _records(quick_runs, "needle_quick", "retrieval")]
    second = [(r["digit_accuracy"], r["needle_mass"]) for r in _records(out, "needle_quick", "retrieval")]
    assert np.allclose([a for a, _ in first], [a for a, _ in second])
    assert np.allclose([m for _, m in first], [m for _, m in second], atol=1e-6)


def _check_intervals(summary: dict, rows: list[dict], by: tuple[str, ...], metrics: tuple[str, ...]) -> None:
    """Each group of `summary` (summarize_records' output) against t intervals of `rows` (one per
    seed: the by keys, seed and metrics) computed here; its paired differences against softmax's."""

    def seeds_of(group: dict, metric: str) -> list[float]:
        found = sorted((r for r in rows if all(r[k] == group[k] for k in by)), key=lambda r: r["seed"])
        return [r[metric] for r in found]

    assert summary["method"] == "t" and summary["level"] == 0.95
    expected_groups = list(dict.fromkeys(tuple(r[k] for k in by) for r in rows))
    assert [tuple(g[k] for k in by) for g in summary["groups"]] == expected_groups
    for group in summary["groups"]:
        assert group["seeds"] == [0, 1]
        for metric in metrics:
            values = seeds_of(group, metric)
            expected = t_interval(values).to_json()
            assert group[metric]["n"] == 2 and group[metric]["mean"] == pytest.approx(np.mean(values))
            assert group[metric]["low"] == pytest.approx(expected["low"])
            assert group[metric]["high"] == pytest.approx(expected["high"])
    others = [g for g in expected_groups if g[0] != "softmax"]
    assert [tuple(p[k] for k in by) for p in summary["paired"]] == others
    for pair in summary["paired"]:
        assert pair["against"] == {**{k: pair[k] for k in by}, "normalizer": "softmax"}
        for metric in metrics:
            expected = paired_difference(seeds_of(pair, metric), seeds_of(pair["against"], metric)).to_json()
            assert pair[metric]["n"] == 2 and pair[metric]["mean"] == pytest.approx(expected["mean"])
            assert pair[metric]["high"] == pytest.approx(expected["high"])


def test_length_generalization_summary_holds_t_intervals_over_seeds_and_paired_differences(quick_runs):
    payload = json.loads((quick_runs / "length_generalization_quick.json").read_text())
    records = payload["records"]
    trained = [
        {"normalizer": r["normalizer"], "seed": r["seed"], "validation_loss": r["validation_loss"],
         "train_loss": r["history"][-1]["loss"]}
        for r in records if r["record"] == "training"
    ]  # fmt: skip
    evaluated = [r for r in records if r["record"] == "evaluation"]
    summary = payload["summary"]
    _check_intervals(summary["training"], trained, ("normalizer",), length_generalization.TRAINING_METRICS)
    _check_intervals(
        summary["evaluation"], evaluated, ("normalizer", "rope_theta_factor"), length_generalization.EVALUATION_METRICS
    )
    assert [(g["normalizer"], g["rope_theta_factor"]) for g in summary["evaluation"]["groups"]] == [
        ("softmax", 1.0), ("softmax", 10.0), ("SSMax + bias", 1.0), ("SSMax + bias", 10.0)
    ]  # fmt: skip
    # The figures' fallback (a run in progress, no summary yet) computes the same.
    assert length_generalization.summary_of(records, "softmax") == summary


def test_needle_summary_holds_t_intervals_over_seeds_and_paired_differences(quick_runs):
    payload = json.loads((quick_runs / "needle_quick.json").read_text())
    config = experiments.load(NEEDLE_QUICK).config
    cells = [r for r in payload["records"] if r["record"] == "retrieval"]
    rows, spans = [], []
    for (label, factor, seed), group in itertools.groupby(
        cells, key=lambda r: (r["normalizer"], r["rope_theta_factor"], r["seed"])
    ):
        group = list(group)
        head = {"normalizer": label, "rope_theta_factor": factor, "seed": seed}
        for length in config.eval_lengths:
            at = [r for r in group if r["length"] == length]
            rows.append({**head, "length": length, **{a: np.mean([r[a] for r in at]) for a in needle.ACCURACIES}})
        within = [r for r in group if r["length"] <= config.training.seq_len]  # 72: one length each side of L
        beyond = [r for r in group if r["length"] > config.training.seq_len]
        spans.append({**head, **{f"{a}_within": np.mean([r[a] for r in within]) for a in needle.ACCURACIES},
                      **{f"{a}_beyond": np.mean([r[a] for r in beyond]) for a in needle.ACCURACIES}})  # fmt: skip
    summary = payload["summary"]
    _check_intervals(summary["retrieval"], rows, ("normalizer", "rope_theta_factor", "length"), needle.ACCURACIES)
    _check_intervals(summary["spans"], spans, ("normalizer", "rope_theta_factor"), needle.SPAN_METRICS)
    assert [g["length"] for g in summary["retrieval"]["groups"]] == [72, 144, 72, 144]
    assert needle.summary_of(payload["records"], config.training.seq_len, "softmax") == summary


def test_a_seed_fixes_initialisation_and_data_for_every_normalizer(watched_runs):
    out, calls = watched_runs
    assert len(calls) == 8  # 2 kinds x 2 normalizers x 2 seeds, each trained once
    for seq_len, name, labels in ((32, "length_generalization_quick", ("softmax", "SSMax + bias")),
                                  (72, "needle_quick", ("softmax", "sparsemax"))):  # fmt: skip
        by = {(c["label"], c["seed"]): c for c in calls if c["seq_len"] == seq_len}
        assert set(by) == {(label, seed) for label in labels for seed in (0, 1)}
        for seed in (0, 1):
            # One seed: the same training windows in the same order for every normalizer.
            first, second = by[(labels[0], seed)], by[(labels[1], seed)]
            assert all(np.array_equal(a, b) for a, b in zip(first["inputs"], second["inputs"], strict=True))
        for label in labels:
            # Another seed: another initialisation and other data.
            zero, one = by[(label, 0)], by[(label, 1)]
            assert zero["weights"] != one["weights"]
            assert not np.array_equal(zero["inputs"][0], one["inputs"][0])
        # Two seeds of one normalizer train two models: their losses differ from the first entry on.
        trained = {(r["normalizer"], r["seed"]): r for r in _records(out, name, "training")}
        assert trained[(labels[0], 0)]["history"][0]["loss"] != trained[(labels[0], 1)]["history"][0]["loss"]
        assert trained[(labels[0], 0)]["model_key"] != trained[(labels[0], 1)]["model_key"]
    # softmax and sparsemax have the same parameters: under one seed, the same initialisation.
    needle_calls = {(c["label"], c["seed"]): c["weights"] for c in calls if c["seq_len"] == 72}
    assert needle_calls[("softmax", 0)] == needle_calls[("sparsemax", 0)]


def test_the_archived_single_seed_and_the_committed_tuned_needle_results_are_drawn(tmp_path):
    # The archived first run predates seeds: its records have none (seed 0 of one run) and no summary.
    copy = tmp_path / "needle.json"
    shutil.copy(REPO / "results" / "archive" / "needle" / "20261121T143637Z.json", copy)
    payload = json.loads(copy.read_text())
    assert "summary" not in payload and all("seed" not in r for r in payload["records"])
    stems = ("training_loss", "accuracy", "accuracy_vs_length", "needle_mass")
    drawn = figures.render(copy)
    assert {p.name for p in drawn} == {f"needle_{stem}.{ext}" for stem in stems for ext in ("png", "svg")}
    summary = needle.summary_of(payload["records"], payload["config"]["training"]["seq_len"], "softmax")
    assert all(g["seeds"] == [0] and g["sequence_accuracy"]["low"] is None for g in summary["retrieval"]["groups"])
    # The committed tuned run (unfinished or not) draws its tuning too, and every map learned at L.
    shutil.copy(REPO / "results" / "needle.json", copy)
    payload = json.loads(copy.read_text())
    stems += ("tuning",)
    assert {p.name for p in figures.render(copy)} == {
        f"needle_{stem}.{ext}" for stem in stems for ext in ("png", "svg")
    }
    summary = needle.summary_of(payload["records"], payload["config"]["training"]["seq_len"], "softmax")
    at_l = [g for g in summary["retrieval"]["groups"] if g["length"] == 128 and g["rope_theta_factor"] == 1.0]
    assert len(at_l) == 4 and all(g["sequence_accuracy"]["mean"] > 0.5 for g in at_l)


def test_full_configs_take_three_seeds_and_quick_ones_two():
    for kind in ("length_generalization", "needle"):
        full = experiments.load(REPO / "experiments" / f"{kind}.toml").config
        assert full.seeds == (0, 1, 2) and experiments.KINDS[kind].config_type().seeds == (0, 1, 2)
        assert experiments.load(REPO / "experiments" / f"{kind}_quick.toml").config.seeds == (0, 1)
        runs = 3 + len(full.tuning.learning_rates)  # three seeds, and the tuning models first
        assert len(experiments.KINDS[kind].points(full)) == runs * len(full.normalizers)
    with pytest.raises(ConfigError, match=r"seeds must not repeat a value; got \[1, 1\]"):
        experiments.load(NEEDLE_QUICK, ["seeds=[1, 1]"])


def test_curve_bands_are_t_intervals_at_each_x():
    curves = [[1.0, 2.0, 5.0, None], [2.0, 2.0, 7.0, 3.0], [3.0, 2.0, 9.0, None]]
    mean, low, high = bands.curve_band(curves)
    for x in range(3):
        expected = t_interval([c[x] for c in curves])
        assert mean[x] == pytest.approx(expected.mean)
        assert low[x] == pytest.approx(expected.low) and high[x] == pytest.approx(expected.high)
    assert low[1] == high[1] == 2.0  # no spread, no band
    assert mean[3] == 3.0 and np.isnan(low[3]) and np.isnan(high[3])  # one seed measured there: no band
    one = seed_curve([{"history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]}])
    assert one["steps"] == [1, 2] and one["losses"].tolist() == [2.0, 1.0] and "low" not in one
    with pytest.raises(ValueError, match="different steps"):
        seed_curve([{"history": [{"step": 1, "loss": 2.0}]}, {"history": [{"step": 2, "loss": 2.0}]}])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_nested_tables_and_trained_normalizers_are_checked(tmp_path):
    bad = _write(
        tmp_path,
        'kind = "length_generalization"\n'
        'normalizers = ["softmax", { name = "softmax", learn = ["alpha"], label = "x" }, '
        '{ name = "ssmax", learn_s = false, label = "y" }]\n'
        "eval_length = 64\n"
        "[model]\nwidth = 30\nheads = 4\ndepth = 2\n"
        "[training]\nsteps = 'many'\n",
    )
    with pytest.raises(ConfigError) as err:
        experiments.load(bad)
    text = str(err.value)
    assert "'softmax' cannot learn 'alpha'; learnable: nothing" in text
    assert "'learn_s' is no longer a key; write learn = [...] listing s (or learn = [] for a fixed s)" in text
    assert "model: unknown key 'depth'" in text and "layers, width, heads, rope_theta" in text
    assert "training.steps: expected an integer; got 'many'" in text
    assert all(str(bad) in p for p in err.value.problems)
    # A value check inside a nested setting, and one across settings.
    with pytest.raises(ConfigError, match=r"model.width=30 must be a multiple of model.heads=4"):
        experiments.load(_write(tmp_path, 'kind = "needle"\n[model]\nwidth = 30\n'))
    with pytest.raises(ConfigError, match=r"eval_length=64 must be >= training.seq_len=128"):
        experiments.load(_write(tmp_path, 'kind = "length_generalization"\neval_length = 64\n'))


def test_dotted_overrides_reach_nested_tables(tmp_path):
    experiment = experiments.load(LENGTH_QUICK, ["model.width=64", "training.steps=9", "eval_length=128"])
    assert experiment.config.model.width == 64 and experiment.config.model.layers == 1
    assert experiment.config.training.steps == 9 and experiment.config.eval_length == 128
    assert "--set model.width=64" in experiment.command
    with pytest.raises(ConfigError, match="eval_length is not a table"):
        experiments.load(LENGTH_QUICK, ["eval_length.x=1"])


def test_trained_normalizer_specs_round_trip_to_json():
    kind = experiments.KINDS["length_generalization"]
    specs = kind.config_json(kind.config_type())["normalizers"]
    assert [s["label"] for s in specs][:4] == ["softmax", "ssmax", "SSMax (fixed s)", "SSMax + bias"]
    assert specs[2] == {"name": "ssmax", "label": "SSMax (fixed s)", "learn": []}
    assert specs[3] == {"name": "ssmax", "label": "SSMax + bias", "learn": ["s", "bias"]}
    assert specs[6] == {"name": "entmax", "label": "α-entmax (learned α)", "learn": ["alpha"]}
    assert [NormalizerSpec.parse(s) for s in specs] == list(kind.config_type().normalizers)


def test_needle_training_stream_mixes_depths_and_is_deterministic():
    task = NeedleConfig(seq_len=96)
    first = next(needle_train_batches(task, batch_size=16, seed=3))
    again = next(needle_train_batches(task, batch_size=16, seed=3))
    assert np.array_equal(first.inputs, again.inputs) and np.array_equal(first.needle_mask, again.needle_mask)
    starts = first.needle_mask.argmax(axis=1)
    assert len(set(starts.tolist())) > 4  # depths differ between examples
    assert np.all(first.needle_mask.sum(axis=1) == task.needle_length)
    assert np.all(first.loss_mask[:, -task.value_length :]) and first.loss_mask.sum() == 16 * task.value_length


def test_position_bins_cover_every_position_once():
    for length in (1, 7, 96, 1024):
        edges = lm.position_bins(length, 24)
        assert edges[0] == 0 and edges[-1] == length and np.all(np.diff(edges) > 0)
    assert lm.position_bins(1024, 24)[:3].tolist() == [0, 1, 2]
    values = np.arange(10.0)[None]
    assert lm.bin_positions(values, np.array([0, 1, 4, 10])).tolist() == [[0.0, 2.0, 6.5]]
