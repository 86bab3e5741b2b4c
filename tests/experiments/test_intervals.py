"""Intervals over seeds on known data."""

from __future__ import annotations

import numpy as np
import pytest

from attnlab.experiments import intervals


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706205), (2, 4.302653), (4, 2.776445), (30, 2.042272)])
def test_t_quantiles_match_the_tables(df, expected):
    assert intervals.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-5)


def test_t_interval_of_known_values():
    # mean 2, sd 1, n = 3: half-width 4.302653 / sqrt(3) = 2.484138
    got = intervals.t_interval([1.0, 2.0, 3.0])
    assert got.mean == 2.0 and got.n == 3 and got.method == "t"
    assert got.low == pytest.approx(2.0 - 2.484138, abs=1e-5) and got.high == pytest.approx(2.0 + 2.484138, abs=1e-5)
    assert not got.significant  # [-0.48, 4.48] holds 0
    assert intervals.t_interval([4.0, 5.0, 6.0]).significant  # [2.52, 7.48]
    assert intervals.t_interval([-6.0, -5.0, -4.0]).significant


def test_one_value_has_no_interval_and_bad_values_are_refused():
    single = intervals.t_interval([0.7])
    assert single.low is None and single.high is None and not single.significant
    with pytest.raises(ValueError, match="must be finite"):
        intervals.t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        intervals.t_interval([])
    with pytest.raises(ValueError, match="method='z'"):
        intervals.interval([1.0, 2.0], method="z")


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 3, 0.0, 1 - 0.025 ** (1 / 3)),  # closed forms at k = 0 and k = n
        (3, 3, 0.025 ** (1 / 3), 1.0),
        (1, 3, 0.008404, 0.905700),  # R: binom.test(1, 3)$conf.int
        (7, 20, 0.153909, 0.592189),  # R: binom.test(7, 20)$conf.int
    ],
)
def test_binomial_interval_is_clopper_pearson(k, n, low, high):
    got = intervals.binomial_interval(k, n)
    assert got.mean == k / n and got.n == n and got.method == "clopper-pearson"
    assert got.low == pytest.approx(low, abs=1e-5) and got.high == pytest.approx(high, abs=1e-5)


def test_fisher_exact_matches_known_tables_and_refuses_bad_counts():
    assert intervals.fisher_exact((3, 3), (0, 3)) == pytest.approx(0.1)  # 2 / C(6, 3)
    assert intervals.fisher_exact((4, 4), (0, 4)) == pytest.approx(2 / 70)
    assert intervals.fisher_exact((8, 10), (2, 10)) == pytest.approx(0.023014, abs=1e-6)  # R: fisher.test
    assert intervals.fisher_exact((1, 3), (2, 3)) == 1.0
    assert intervals.fisher_exact((2, 5), (2, 5)) == 1.0
    with pytest.raises(ValueError, match="4 of 3"):
        intervals.fisher_exact((4, 3), (0, 3))
    with pytest.raises(ValueError, match="integers"):
        intervals.binomial_interval(1.5, 3)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 1.0, size=50)
    first = intervals.bootstrap_interval(values, seed=3)
    assert first == intervals.bootstrap_interval(values, seed=3)
    assert first.low < values.mean() < first.high
    # with 50 values the bootstrap and t intervals nearly agree
    t = intervals.t_interval(values)
    assert first.high - first.low == pytest.approx(t.high - t.low, rel=0.1)


def test_paired_difference_sees_a_consistent_shift_that_unpaired_intervals_miss():
    # seed effects (0, 5, 10) swamp the 0.1 difference unpaired; paired, it is significant
    a = np.array([0.0, 5.0, 10.0]) + 0.1 + np.array([0.0, 0.01, -0.01])
    b = np.array([0.0, 5.0, 10.0])
    paired = intervals.paired_difference(a, b)
    assert paired.significant and paired.mean == pytest.approx(0.1)
    unpaired_a, unpaired_b = intervals.t_interval(a), intervals.t_interval(b)
    assert unpaired_a.low < unpaired_b.high  # the separate intervals overlap
    with pytest.raises(ValueError, match="one of each per seed"):
        intervals.paired_difference([1.0, 2.0], [1.0])


def test_summarize_records_groups_seeds_and_pairs_against_the_baseline():
    records = [
        {"normalizer": n, "width": w, "seed": s, "accuracy": base + 0.1 * s + (0.2 if n == "ssmax" else 0.0)}
        for n in ("softmax", "ssmax")
        for w, base in ((32, 0.1), (64, 0.3))
        for s in range(3)
    ]
    records.append({"normalizer": "ssmax", "width": 64, "seed": 3, "accuracy": None})  # no value: left out
    summary = intervals.summarize_records(
        records, by=("normalizer", "width"), metrics=("accuracy",), baseline={"normalizer": "softmax"}
    )
    groups = {(g["normalizer"], g["width"]): g for g in summary["groups"]}
    assert groups[("softmax", 32)]["accuracy"]["mean"] == pytest.approx(0.2)
    assert groups[("ssmax", 64)]["seeds"] == [0, 1, 2, 3] and groups[("ssmax", 64)]["accuracy"]["n"] == 3
    (at_32, at_64) = summary["paired"]
    assert at_32["against"] == {"normalizer": "softmax", "width": 32}
    # the same 0.2 shift on every seed: mean 0.2, zero width, significant
    assert at_64["accuracy"]["mean"] == pytest.approx(0.2) and at_64["accuracy"]["significant"]
    with pytest.raises(ValueError, match="two records"):
        intervals.summarize_records(records + records[:1], by=("normalizer", "width"), metrics=("accuracy",))


def test_a_finished_results_file_records_the_summary_as_strict_json(tmp_path):
    from attnlab.experiments.results import ResultsFile, read_json

    results = ResultsFile(tmp_path / "x.json", name="x", kind="needle", config={"a": 1})
    results.add({"seed": 0}, "k0", [{"accuracy": 0.5}])
    results.finish(1.0, {"groups": [{"accuracy": {"mean": float("nan")}}]})
    payload = read_json(tmp_path / "x.json")
    assert payload["summary"] == {"groups": [{"accuracy": {"mean": None}}]}
    assert payload["records"][0]["accuracy"] == 0.5 and payload["finished_at"] is not None
