"""The experiment kinds that train a model per normalizer: length_generalization and needle.

The quick configs run once per module (they train tiny models for a few steps); the tests then
check what the records must satisfy whatever the training reached, the figures, resumption from
the checkpoints, and the config checks of nested tables and trained-normalizer specs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from attnlab import cli, experiments
from attnlab.data import NeedleConfig, needle_train_batches
from attnlab.experiments import lm
from attnlab.experiments.config import ConfigError
from attnlab.normalizers import NormalizerSpec

REPO = Path(__file__).resolve().parents[2]
LENGTH_QUICK = REPO / "experiments" / "length_generalization_quick.toml"
NEEDLE_QUICK = REPO / "experiments" / "needle_quick.toml"


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert cli.main(["run", str(LENGTH_QUICK), str(NEEDLE_QUICK), "--out", str(out), "--no-progress"]) == 0
    return out


def _records(out: Path, name: str, record: str) -> list[dict]:
    payload = json.loads((out / f"{name}.json").read_text())
    return [r for r in payload["records"] if r["record"] == record]


def test_length_generalization_records(quick_runs):
    config = experiments.load(LENGTH_QUICK).config
    trained = _records(quick_runs, "length_generalization_quick", "training")
    assert [r["normalizer"] for r in trained] == [s.label for s in config.normalizers]
    for r in trained:
        assert [h["step"] for h in r["history"]] == list(range(2, config.training.steps + 1, 2))
        assert math.isfinite(r["validation_loss"]) and r["compile_seconds"] > 0
        assert r["validation_loss"] == next(
            e["loss_within"]
            for e in _records(quick_runs, "length_generalization_quick", "evaluation")
            if e["normalizer"] == r["normalizer"] and e["rope_theta_factor"] == 1.0
        )
    learned = next(r for r in trained if r["normalizer"] == "SSMax + bias")["learned"]
    assert set(learned) == {"s", "bias"}
    assert np.shape(learned["s"]) == np.shape(learned["bias"]) == (config.model.layers, config.model.heads)
    assert next(r for r in trained if r["normalizer"] == "softmax")["learned"] == {}

    evaluations = _records(quick_runs, "length_generalization_quick", "evaluation")
    assert len(evaluations) == len(config.normalizers) * len(config.rope_theta_factors)
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
    softmax = [r for r in evaluations if r["normalizer"] == "softmax"]
    assert softmax[0]["per_position_loss"][0] == pytest.approx(softmax[1]["per_position_loss"][0], rel=1e-5)
    assert softmax[0]["per_position_loss"][long // 2] != softmax[1]["per_position_loss"][long // 2]


def test_needle_records(quick_runs):
    config = experiments.load(NEEDLE_QUICK).config
    cells = _records(quick_runs, "needle_quick", "retrieval")
    expected = len(config.normalizers) * len(config.rope_theta_factors) * len(config.eval_lengths) * len(config.depths)
    assert len(cells) == expected
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
    for stem in ("training_loss", "loss_vs_position", "attention_vs_position", "sparsity_vs_position"):
        assert f"length_generalization_quick_{stem}.png" in drawn and f"length_generalization_quick_{stem}.svg" in drawn
    for stem in ("training_loss", "accuracy", "needle_mass"):
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
    needle_keys = {r["normalizer"]: r["model_key"] for r in _records(quick_runs, "needle_quick", "training")}
    saved = {p.name for p in (out / "checkpoints").iterdir()}
    assert {f"{label}-{key}" for label, key in needle_keys.items()} <= saved
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
