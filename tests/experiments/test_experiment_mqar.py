"""The mqar kind: one LM per normalizer x width x seed on multi-query associative recall.

The quick config runs once per module (one-layer models, a few steps), with every call of the
training loop watched; the tests check the records (one per seed), the summary's intervals and
paired differences, that a seed fixes the initialisation and the data (the same data for every
normalizer, other data for another seed), the figures, and the config checks.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from attnlab import cli, experiments, figures
from attnlab.experiments import lm, mqar
from attnlab.experiments.config import ConfigError
from attnlab.experiments.intervals import binomial_interval, fisher_exact, paired_difference, t_interval
from attnlab.figures import mqar as mqar_figures

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "mqar_quick.toml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs the quick config; returns (folder, payload, calls): per train_model call, the
    normalizer label, the width, the training seed, the initial parameters' sum of squares and
    the first two training batches' inputs."""
    out = tmp_path_factory.mktemp("results")
    calls = []
    real = lm.train_model

    def watched(model_setting, training, normalizer, batches, **keywords):
        first = list(itertools.islice(batches, 2))
        initial = model_setting.build(normalizer, training.seed)
        weights = float(sum(np.sum(np.square(np.asarray(p))) for p in jax.tree.leaves(nnx.state(initial, nnx.Param))))
        calls.append((normalizer.label, model_setting.width, training.seed, weights, [b.inputs for b in first]))
        return real(model_setting, training, normalizer, itertools.chain(first, batches), **keywords)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train_model", watched)
        assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "mqar_quick.json").read_text()), calls


def test_one_record_per_normalizer_width_and_seed(quick_run):
    _, payload, _ = quick_run
    config = experiments.load(QUICK).config
    records = payload["records"]
    expected = {(s.label, w, seed) for s in config.normalizers for w in config.widths for seed in config.seeds}
    assert len(records) == len(expected) == 8
    assert {(r["normalizer"], r["width"], r["seed"]) for r in records} == expected
    task = config.task()
    for r in records:
        assert r["record"] == "training" and r["steps"] == config.training.steps
        assert r["head_dim"] == r["width"] // config.heads and r["layers"] == config.layers
        # Every sequence has num_kv_pairs queries, so all-right sequences are at most the right queries.
        assert 0 <= r["sequence_accuracy"] <= r["accuracy"] <= 1
        assert r["eval_loss"] > 0 and r["train_loss"] == r["history"][-1]["loss"]
        assert r["evaluations"][-1]["scored_tokens"] == config.eval_examples * task.query_count
    assert len({r["model_key"] for r in records}) == len({r["point_key"] for r in records}) == 8


def test_summary_holds_t_intervals_over_seeds_and_paired_differences(quick_run):
    _, payload, _ = quick_run
    summary = payload["summary"]
    assert summary["method"] == "t" and summary["level"] == 0.95
    records = payload["records"]

    def seeds_of(label, width):
        rows = sorted((r for r in records if r["normalizer"] == label and r["width"] == width), key=lambda r: r["seed"])
        return [r["accuracy"] for r in rows], [r["eval_loss"] for r in rows]

    assert [(g["normalizer"], g["width"]) for g in summary["groups"]] == [
        ("softmax", 8), ("sparsemax", 8), ("softmax", 16), ("sparsemax", 16)
    ]  # fmt: skip
    for group in summary["groups"]:
        assert group["seeds"] == [0, 1] and set(mqar.METRICS) <= set(group)
        accuracy, loss = seeds_of(group["normalizer"], group["width"])
        for metric, values in (("accuracy", accuracy), ("eval_loss", loss)):
            expected = t_interval(values).to_json()
            assert group[metric]["n"] == 2 and group[metric]["mean"] == pytest.approx(np.mean(values))
            assert group[metric]["low"] == pytest.approx(expected["low"])
            assert group[metric]["low"] <= group[metric]["mean"] <= group[metric]["high"]
    assert [(p["normalizer"], p["width"]) for p in summary["paired"]] == [("sparsemax", 8), ("sparsemax", 16)]
    for pair in summary["paired"]:
        assert pair["against"] == {"normalizer": "softmax", "width": pair["width"]}
        ours, theirs = seeds_of("sparsemax", pair["width"])[1], seeds_of("softmax", pair["width"])[1]
        expected = paired_difference(ours, theirs).to_json()
        assert pair["eval_loss"]["mean"] == pytest.approx(expected["mean"])
        assert pair["eval_loss"]["high"] == pytest.approx(expected["high"])


def test_summary_counts_the_seeds_that_solved_the_task(quick_run):
    _, payload, _ = quick_run
    solved = payload["summary"]["solved"]
    assert [(e["normalizer"], e["width"]) for e in solved] == [
        ("softmax", 8), ("sparsemax", 8), ("softmax", 16), ("sparsemax", 16)
    ]  # fmt: skip
    for entry in solved:
        rows = [r for r in payload["records"] if (r["normalizer"], r["width"]) == (entry["normalizer"], entry["width"])]
        k = sum(r["accuracy"] >= mqar.SOLVED for r in rows)
        assert entry["solved"] == k and entry["seeds"] == len(rows) == 2
        assert entry["proportion"] == binomial_interval(k, 2).to_json()
        base = [r for r in payload["records"] if (r["normalizer"], r["width"]) == ("softmax", entry["width"])]
        expected = fisher_exact((k, 2), (sum(r["accuracy"] >= mqar.SOLVED for r in base), 2))
        assert entry["fisher_p_against_baseline"] == (None if entry["normalizer"] == "softmax" else expected)


def _solved(label, width, k, n, p):
    return {"normalizer": label, "width": width, "solved": k, "seeds": n, "fisher_p_against_baseline": p}


def test_the_solved_finding_names_what_a_count_can_and_cannot_separate():
    config = {
        "widths": [16, 64],
        "normalizers": [{"label": "softmax", "name": "softmax"}, {"label": "entmax15", "name": "entmax15"}],
    }
    names = {"softmax": "softmax", "entmax15": "1.5-entmax"}
    same = [_solved("softmax", 16, 0, 3, None), _solved("entmax15", 16, 0, 3, 1.0),
            _solved("softmax", 64, 1, 3, None), _solved("entmax15", 64, 3, 3, 0.4)]  # fmt: skip
    (finding,) = mqar_figures.solved_findings(same, config, names, "f.png")
    assert finding.significant is False
    assert "softmax 0 / 1; 1.5-entmax 0 / 3" in finding.claim
    assert "smallest p = 0.400, 1.5-entmax at width 64" in finding.claim
    assert "even 3 of 3 against 0 of 3 gives p = 0.100" in finding.claim
    apart = [_solved("softmax", 64, 0, 5, None), _solved("entmax15", 64, 5, 5, 2 / 252)]
    (finding,) = mqar_figures.solved_findings(apart, {**config, "widths": [64]}, names, "f.png")
    assert finding.significant is True and "1.5-entmax at width 64, p = 0.008" in finding.claim


def test_a_seed_fixes_initialisation_and_data_for_every_normalizer(quick_run):
    _, payload, calls = quick_run
    assert len(calls) == 8 and all(seed in (0, 1) for _, _, seed, _, _ in calls)
    by = {(label, width, seed): (weights, inputs) for label, width, seed, weights, inputs in calls}
    for width in (8, 16):
        for seed in (0, 1):
            softmax, sparsemax = by[("softmax", width, seed)], by[("sparsemax", width, seed)]
            # The same seed: the same initialisation and the same sequences in the same order.
            assert softmax[0] == sparsemax[0]
            assert all(np.array_equal(a, b) for a, b in zip(softmax[1], sparsemax[1], strict=True))
        other = by[("softmax", width, 1)]
        assert by[("softmax", width, 0)][0] != other[0]
        assert not np.array_equal(by[("softmax", width, 0)][1][0], other[1][0])
    # Widths share their seed's data too (only the model's shape differs).
    assert all(np.array_equal(a, b) for a, b in zip(by[("softmax", 8, 0)][1], by[("softmax", 16, 0)][1], strict=True))
    # Another seed trains another model: its first logged loss differs.
    first = {(r["normalizer"], r["width"], r["seed"]): r["history"][0]["loss"] for r in payload["records"]}
    assert first[("softmax", 8, 0)] != first[("softmax", 8, 1)]


def test_the_training_stream_is_deterministic_and_apart_from_the_held_out_sequences():
    task = mqar.Config().task()
    one = list(itertools.islice(mqar.training_batches(task, batch_size=4, seed=3), 3))
    again = list(itertools.islice(mqar.training_batches(task, batch_size=4, seed=3), 3))
    assert all(np.array_equal(a.inputs, b.inputs) for a, b in zip(one, again, strict=True))
    assert not np.array_equal(one[0].inputs, one[1].inputs)
    held_out = mqar.evaluation_batches(task, 128)
    assert len(held_out) == 2 and held_out[0].inputs.shape == (mqar.EVAL_BATCH, task.seq_len)
    assert np.all(held_out[0].loss_mask.sum(axis=1) == task.query_count)


def test_figures_are_drawn_stable_and_work_without_a_summary(quick_run, tmp_path):
    out, _, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    drawn = {p.name: p.read_bytes() for p in sorted((copy / "figures").iterdir())}
    assert set(drawn) == {f"mqar_quick_{stem}.{ext}" for stem in ("accuracy", "training") for ext in ("png", "svg")}
    # Redrawn from the JSON alone, and without the summary a run in progress lacks (the figures then
    # compute the same intervals from the records): the same files, byte for byte.
    path = copy / "mqar_quick.json"
    payload = json.loads(path.read_text())
    del payload["summary"]
    path.write_text(json.dumps(payload))
    shutil.rmtree(copy / "figures")
    figures.render(path)
    assert {p.name: p.read_bytes() for p in sorted((copy / "figures").iterdir())} == drawn


def test_a_rerun_trains_nothing(quick_run, replace_run_point, tmp_path):
    out, payload, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "figures"))

    def fail(*args, **kwargs):
        raise AssertionError("a finished point ran again")

    replace_run_point("mqar", fail)
    assert cli.main(["run", str(QUICK), "--out", str(copy), "--no-progress", "--no-figures"]) == 0
    assert json.loads((copy / "mqar_quick.json").read_text())["records"] == payload["records"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('kind = "mqar"\n' + text)
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("widths = [16, 30]\nheads = 4", r"widths=\[16, 30\] must each be a multiple of heads=4 .*; 30 is not"),
        ("widths = [6, 8]\nheads = 2", r"even head_dim = width / heads \(RoPE\); 6 is not"),
        (
            "num_kv_pairs = 20\nvocab_size = 64\n[training]\nseq_len = 64",
            r"num_kv_pairs=20, vocab_size=64 and training.seq_len=64 make no MQAR task: .*seq_len=64 is too short",
        ),
        ("vocab_size = 512", r"vocab_size must be in \[4, 256\]; got 512"),
        ("eval_examples = 100", "eval_examples must be a positive multiple of 64; got 100"),
        ("seeds = [0, 0]", r"seeds must not repeat a value; got \[0, 0\]"),
        ("seeds = [-1]", r"seeds must all be >= 0; got \[-1\]"),
        ("seeds = []", "seeds must be a non-empty list"),
        ("widths = [32, 16]", r"widths must be in increasing order; got \[32, 16\]"),
    ],
)
def test_config_problems_are_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        experiments.load(_write(tmp_path, text))


def test_full_configs_load_and_cover_the_grid():
    cpu = experiments.load(REPO / "experiments" / "mqar.toml").config
    gpu = experiments.load(REPO / "experiments" / "mqar_gpu.toml").config
    defaults = mqar.Config()
    for config in (cpu, gpu):
        assert config.seeds == (0, 1, 2) and config.training.seed == 0
        assert [s.label for s in config.normalizers] == [s.label for s in defaults.normalizers]
        grid = len(config.normalizers) * len(config.widths)
        assert len(mqar.points(config)) == grid * (len(config.tuning.learning_rates) + 3)
    assert gpu.widths == (64, 128, 256, 512) and gpu.layers == 2  # Zoology's widths and depth
    assert cpu == defaults  # the defaults are the CPU config


def test_the_rate_check_is_the_cpu_config_at_width_64_with_one_rate_for_every_normalizer():
    # Same models, data and seeds as mqar.toml's width-64 points, so its models at 3e-4 are shared.
    cpu = experiments.load(REPO / "experiments" / "mqar.toml").config
    check = experiments.load(REPO / "experiments" / "mqar_rate_check.toml").config
    assert 3e-4 in cpu.tuning.learning_rates and not check.tuning.enabled
    one_rate = dataclasses.replace(cpu.training, learning_rate=3e-4)
    assert check == dataclasses.replace(cpu, widths=(64,), training=one_rate, tuning=lm.TuningSetting())
    assert len(mqar.points(check)) == len(cpu.normalizers) * len(cpu.seeds)
