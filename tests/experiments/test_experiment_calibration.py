"""The calibration kind: one LM per output normalizer, scored before and after temperature scaling.

The quick config runs once per module (tiny models, a few steps); the tests check what the
records must satisfy whatever the training reached, the figures, and the config checks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from attnlab import cli, experiments
from attnlab.experiments.config import ConfigError

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
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress"]) == 0
    return out


def _records(out: Path, record: str) -> list[dict]:
    payload = json.loads((out / "calibration_quick.json").read_text())
    return [r for r in payload["records"] if r["record"] == record]


def test_records_hold_the_scores_before_and_after(quick_run):
    config = experiments.load(QUICK).config
    scored = _records(quick_run, "calibration")
    assert [r["output"] for r in scored] == [o.label for o in config.outputs] == ["softmax", "sparsemax"]
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
    # One checkpoint folder per model, named by its label and keyed by its settings.
    keys = {r["output"]: r["model_key"] for r in _records(quick_run, "training")}
    checkpoints = sorted(p.name for p in (quick_run / "checkpoints").iterdir())
    assert checkpoints == sorted(f"output_{output}-{key}" for output, key in keys.items())


def test_training_records_follow_each_outputs_own_loss(quick_run):
    trained = {r["output"]: r for r in _records(quick_run, "training")}
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


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('outputs = ["softmax", "sparsmax"]', r"outputs\[1\]: OutputNormalizer.mapping='sparsmax'"),
        ('outputs = ["softmax", "softmax"]', "each output must appear once"),
        ('outputs = [{ mapping = "entmax" }]', r"outputs\[0\]: .*needs alpha"),
        ("eval_windows = 16\nfit_windows = 16", r"fit_windows=16 must be in \[1, eval_windows=16\)"),
        ("eval_windows = 20\nfit_windows = 8", "eval_windows must be a positive multiple of 8; got 20"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(f'kind = "calibration"\n{text}\n')
    with pytest.raises(ConfigError, match=match):
        experiments.load(path)
