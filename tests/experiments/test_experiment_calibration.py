"""The calibration kind: one LM per output normalizer and seed, scored before and after temperature scaling.

The quick config (two seeds) runs once per module (tiny models, a few steps), with every call of
the training loop watched; the tests check what the records must satisfy whatever the training
reached, the summary's intervals over seeds and paired differences, that a seed fixes the
initialisation and the data (the same for every output), the figures (also of the committed
single-seed results), and the config checks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from attnlab import cli, experiments, figures
from attnlab.experiments import calibration, lm
from attnlab.experiments.config import ConfigError
from attnlab.experiments.intervals import paired_difference, t_interval

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "calibration_quick.toml"
SCORE_KEYS = {
    "accuracy",
    "nll",
    "zero_target_fraction",
    "nll_nonzero",
    "brier",
    "confidence",
    "support",
    "ece_width",
    "ece_mass",
    "loss",
    "reliability",
}


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, watch_training):
    """The quick config run once: (the results folder, the watched training calls)."""
    out = tmp_path_factory.mktemp("results")
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train_model", watch_training(calls))
        assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress"]) == 0
    return out, calls


@pytest.fixture(scope="module")
def quick_run(watched_run):
    return watched_run[0]


def _records(out: Path, record: str) -> list[dict]:
    payload = json.loads((out / "calibration_quick.json").read_text())
    return [r for r in payload["records"] if r["record"] == record]


def test_records_hold_the_scores_before_and_after(quick_run):
    config = experiments.load(QUICK).config
    scored = _records(quick_run, "calibration")
    assert [o.label for o in config.outputs] == ["softmax", "sparsemax"] and config.seeds == (0, 1)
    # Seed-major: an interrupted run has whole seeds.
    assert [(r["seed"], r["output"]) for r in scored] == [(i, o.label) for i in (0, 1) for o in config.outputs]
    seq_len, vocab = config.training.seq_len, 256
    for r in scored:
        assert r["fit_examples"] == config.fit_windows * seq_len
        assert r["test_examples"] == (config.eval_windows - config.fit_windows) * seq_len
        assert r["temperature"] > 0
        before, after = r["before"], r["after"]
        assert set(before) == set(after) == SCORE_KEYS
        # A temperature never changes the argmax.
        assert before["accuracy"] == after["accuracy"]
        for when, report in (("before", before), ("after", after)):
            for scheme in ("width", "mass"):
                bins = report["reliability"][scheme]
                assert sum(bins["count"]) == r["test_examples"] and len(bins["edges"]) == config.bins + 1
            assert 0 <= report["ece_width"] <= 1 and 0 <= report["brier"] <= 2
            assert 1 <= report["support"] <= vocab
            if report["zero_target_fraction"] == 0:
                assert report["nll"] == pytest.approx(report["nll_nonzero"])
            else:
                # +inf (a target at p = 0) is written as null, the record naming it (strict JSON).
                assert report["nll"] is None and r["nonfinite"][f"{when}.nll"] == "inf"
                assert math.isfinite(report["nll_nonzero"])
    softmax = scored[0]
    assert softmax["before"]["support"] == vocab and softmax["before"]["zero_target_fraction"] == 0
    assert softmax["before"]["loss"] == pytest.approx(softmax["before"]["nll"], rel=1e-5)  # cross-entropy
    assert scored[1]["before"]["support"] < vocab  # sparsemax gives exact zeros
    # One checkpoint folder per model (output and seed), named by its label and keyed by its settings.
    keys = [(r["output"], r["model_key"]) for r in _records(quick_run, "training")]
    checkpoints = sorted(p.name for p in (quick_run / "checkpoints").iterdir())
    assert checkpoints == sorted(f"output_{output}-{key}" for output, key in keys) and len(set(checkpoints)) == 4


def test_training_records_follow_each_outputs_own_loss(quick_run):
    trained = {r["output"]: r for r in _records(quick_run, "training") if r["seed"] == 0}
    assert set(trained) == {"softmax", "sparsemax"}
    # Same data and initialisation: at the first logged step the cross-entropy (log 256 at
    # init) is well above the sparsemax loss, whose value near uniform logits is about 1/2.
    assert trained["softmax"]["history"][0]["loss"] > 4.0 > 1.0 > trained["sparsemax"]["history"][0]["loss"]


def test_figures_are_drawn_and_stable(quick_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(quick_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    drawn = {p.name: p.read_bytes() for p in sorted((out / "figures").iterdir())}
    for stem in ("reliability", "scores", "training_loss"):
        assert f"calibration_quick_{stem}.png" in drawn and f"calibration_quick_{stem}.svg" in drawn
    shutil.rmtree(out / "figures")
    assert cli.main(["figures", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in sorted((out / "figures").iterdir())} == drawn


def test_summary_holds_t_intervals_over_seeds_and_paired_differences(quick_run):
    payload = json.loads((quick_run / "calibration_quick.json").read_text())
    summary = payload["summary"]
    scored = [r for r in payload["records"] if r["record"] == "calibration"]

    def seeds_of(output: str, stage: str, score: str) -> list:
        return [r[stage][score] for r in sorted(scored, key=lambda r: r["seed"]) if r["output"] == output]

    groups = summary["scores"]["groups"]
    assert summary["scores"]["method"] == "t" and summary["scores"]["level"] == 0.95
    assert [(g["output"], g["stage"]) for g in groups] == [
        ("softmax", "before"), ("softmax", "after"), ("sparsemax", "before"), ("sparsemax", "after")
    ]  # fmt: skip
    for group in groups:
        assert group["seeds"] == [0, 1]
        for score in calibration.SCORES:
            values = [v for v in seeds_of(group["output"], group["stage"], score) if v is not None]
            if not values:  # an NLL of +inf in every seed
                assert group[score] is None
                continue
            expected = t_interval(values).to_json()
            assert group[score]["n"] == len(values) and group[score]["mean"] == pytest.approx(np.mean(values))
            assert group[score]["low"] == pytest.approx(expected["low"])
    assert all(group["ece_width"]["n"] == 2 and group["accuracy"]["n"] == 2 for group in groups)
    for softmax in groups[:2]:  # softmax never gives a target probability 0: its NLL is finite in both seeds
        assert softmax["nll"]["n"] == 2
    paired = summary["scores"]["paired"]
    assert [(p["output"], p["stage"], p["against"]) for p in paired] == [
        ("sparsemax", stage, {"output": "softmax", "stage": stage}) for stage in ("before", "after")
    ]
    for pair in paired:
        ours, theirs = seeds_of("sparsemax", pair["stage"], "ece_mass"), seeds_of("softmax", pair["stage"], "ece_mass")
        expected = paired_difference(ours, theirs).to_json()
        assert pair["ece_mass"]["mean"] == pytest.approx(expected["mean"])
        assert pair["ece_mass"]["high"] == pytest.approx(expected["high"])
    temperatures = summary["temperature"]["groups"]
    assert [t["output"] for t in temperatures] == ["softmax", "sparsemax"]
    for entry in temperatures:
        values = [r["temperature"] for r in scored if r["output"] == entry["output"]]
        assert entry["temperature"]["n"] == 2 and entry["temperature"]["mean"] == pytest.approx(np.mean(values))
    # The figures' fallback (a run in progress, no summary yet) computes the same.
    assert calibration.summary_of(payload["records"], "softmax") == summary


def test_a_seed_fixes_initialisation_and_data_for_every_output(watched_run):
    out, calls = watched_run
    by = {(c["output"], c["seed"]): c for c in calls}
    assert len(calls) == 4 and set(by) == {(o, s) for o in ("softmax", "sparsemax") for s in (0, 1)}
    for seed in (0, 1):
        # One seed: the same initialisation and the same training windows in the same order for every output.
        softmax, sparsemax = by[("softmax", seed)], by[("sparsemax", seed)]
        assert softmax["weights"] == sparsemax["weights"]
        assert all(np.array_equal(a, b) for a, b in zip(softmax["inputs"], sparsemax["inputs"], strict=True))
    # Another seed: another initialisation, other data, another model.
    assert by[("softmax", 0)]["weights"] != by[("softmax", 1)]["weights"]
    assert not np.array_equal(by[("softmax", 0)]["inputs"][0], by[("softmax", 1)]["inputs"][0])
    losses = {(r["output"], r["seed"]): r["history"][0]["loss"] for r in _records(out, "training")}
    assert losses[("softmax", 0)] != losses[("softmax", 1)]


def test_the_full_config_takes_three_seeds():
    full = experiments.load(REPO / "experiments" / "calibration.toml").config
    assert full.seeds == (0, 1, 2) and calibration.Config().seeds == (0, 1, 2)
    assert len(calibration.points(full)) == (3 + len(full.tuning.learning_rates)) * len(full.outputs)


def test_baseline_is_the_first_plain_softmax_output():
    outputs = [{"mapping": "softmax", "label_smoothing": 0.1}, {"mapping": "sparsemax"}, "softmax"]
    assert calibration.baseline_label(outputs) == "softmax"
    assert calibration.baseline_label([{"mapping": "softmax", "label_smoothing": 0.1}]) is None


def test_the_committed_single_seed_results_are_drawn(tmp_path):
    # The first committed run (archived when the tuned 3-seed run replaced it) predates seeds: its
    # records have none (seed 0 of one run) and no summary.
    copy = tmp_path / "calibration.json"
    shutil.copy(REPO / "results" / "archive" / "calibration" / "20261121T191908Z.json", copy)
    payload = json.loads(copy.read_text())
    assert "summary" not in payload and all("seed" not in r for r in payload["records"])
    drawn = figures.render(copy)
    stems = ("reliability", "scores", "training_loss")
    assert {p.name for p in drawn} == {f"calibration_{stem}.{ext}" for stem in stems for ext in ("png", "svg")}
    summary = calibration.summary_of(payload["records"], "softmax")
    assert all(g["seeds"] == [0] and g["brier"]["low"] is None for g in summary["scores"]["groups"])
    assert len(summary["scores"]["paired"]) == 2 * (len(payload["config"]["outputs"]) - 1)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('outputs = ["softmax", "sparsmax"]', r"outputs\[1\]: OutputNormalizer.mapping='sparsmax'"),
        ('outputs = ["softmax", "softmax"]', "each output must appear once"),
        ('outputs = [{ mapping = "entmax" }]', r"outputs\[0\]: .*needs alpha"),
        ("eval_windows = 16\nfit_windows = 16", r"fit_windows=16 must be in \[1, eval_windows=16\)"),
        ("eval_windows = 20\nfit_windows = 8", "eval_windows must be a positive multiple of 8; got 20"),
        ("seeds = [0, 0]", r"seeds must not repeat a value; got \[0, 0\]"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(f'kind = "calibration"\n{text}\n')
    with pytest.raises(ConfigError, match=match):
        experiments.load(path)
