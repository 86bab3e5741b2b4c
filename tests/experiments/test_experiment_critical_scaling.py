"""The critical_scaling kind: closed forms, the measured transition against them, the quick config end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlab.experiments import critical_scaling, load, run, theory
from attnlab.figures import render


def test_the_simplex_closed_forms():
    n, rho = 1000, 0.5
    # softmax at gamma_c = 1 / (1 - rho): (n - 1) n^-1 = 0.999 -> weight 1 / 1.999
    assert theory.simplex_self_weight(n, 2.0 * math.log(n), rho, "softmax") == pytest.approx(1 / 1.999)
    # sparsemax: ((n - 1) g + 1) / n below g = 1, one-hot from g = 1
    assert theory.simplex_self_weight(n, 1.0, rho, "sparsemax") == pytest.approx((999 * 0.5 + 1) / 1000)
    assert theory.simplex_self_weight(n, 2.0, rho, "sparsemax") == 1.0
    assert theory.simplex_self_weight(n, 2.0, rho, "entmax15") is None


def test_crossing_interpolates_and_says_none_outside_the_grid():
    assert critical_scaling.crossing([1.0, 2.0, 3.0], [0.1, 0.3, 0.7]) == pytest.approx(2.5)
    assert critical_scaling.crossing([1.0, 2.0], [0.6, 0.9]) is None  # already above at the first gamma
    assert critical_scaling.crossing([1.0, 2.0], [0.1, 0.2]) is None


def test_tokens_form_an_almost_simplex():
    y = np.asarray(critical_scaling.tokens(200, 0.5, 1024, seed=0))
    gram = y @ y.T
    off = gram[~np.eye(200, dtype=bool)]
    assert np.allclose(np.diag(gram), 1.0, atol=1e-5)
    assert abs(off.mean() - 0.5) < 0.02 and off.std() < 0.05  # fluctuations ~ 1 / sqrt(dim)


def test_in_high_dimension_the_measured_self_weight_follows_the_exact_simplex():
    config = critical_scaling.Config(
        normalizers=("critical_softmax", "logn_sparsemax"), gammas=(0.5, 1.0, 2.0), dim=4096, queries=8, seeds=(0,)
    )
    for record in critical_scaling.run_point(config, {"rho": 0.0, "n": 256, "seed": 0}):
        np.testing.assert_allclose(record["self_weight"], record["self_weight_theory"], atol=0.05)
        assert record["gamma_critical_theory"] == (1.0 if record["mapping"] == "softmax" else None)


def test_quick_config_runs_with_a_summary_over_seeds_and_draws_its_figures(tmp_path):
    experiment = load("experiments/critical_scaling_quick.toml")
    path = run(experiment, tmp_path, progress=False)
    from attnlab.experiments.results import read_json

    payload = read_json(path)
    assert {r["seed"] for r in payload["records"]} == {0, 1}
    halves = payload["summary"]["gamma_half"]["groups"]
    softmax_wide = [g for g in halves if g["normalizer"] == "critical_softmax" and g["rho"] == 0.5 and g["n"] == 512]
    assert softmax_wide[0]["gamma_half"]["n"] == 2 and softmax_wide[0]["seeds"] == [0, 1]
    measures = payload["summary"]["measures"]["groups"]
    assert len(measures) == 2 * 2 * 2 * 6  # normalizers x rhos x lengths x gammas
    figures = render(path)
    assert {p.name for p in figures} >= {
        "critical_scaling_quick_self_weight.png",
        "critical_scaling_quick_gamma_half.png",
    }
