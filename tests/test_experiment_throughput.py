"""The `throughput` experiment kind: records, exactness against dense, compiled memory, figures, config checks.

Timings themselves are never asserted (tests run on busy machines); only how they are recorded.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import jax
import pytest

from attnlab import cli, experiments
from attnlab.experiments import throughput
from attnlab.experiments.config import ConfigError, NormalizerSpec

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "experiments" / "throughput_quick.toml"
FIGURES = ["throughput_quick_compile_time", "throughput_quick_memory", "throughput_quick_tokens_per_second"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "throughput_quick.json").read_text())


def _timed(payload: dict) -> list[dict]:
    return [r for r in payload["records"] if "median_seconds" in r]


def test_every_point_has_one_record_with_timing_memory_and_device(quick_run):
    _, payload = quick_run
    config = experiments.load(QUICK).config
    assert payload["kind"] == "throughput" and payload["finished_at"]
    keys = [(r["case"], r["implementation"], r["n"], r["mode"]) for r in payload["records"]]
    assert keys == [(p["case"], p["implementation"], p["n"], p["mode"]) for p in throughput.points(config)]
    timed = _timed(payload)
    # softmax and sparsemax chunked, jax.nn xla; at 2 lengths and 2 modes
    assert {(r["case"], r["implementation"]) for r in timed} == {
        ("softmax", "chunked"),
        ("sparsemax", "chunked"),
        ("jax.nn", "xla"),
    }
    assert len(timed) == 3 * 2 * 2
    device_kind = jax.devices()[0].device_kind
    for r in timed:
        assert r["backend"] == jax.default_backend() and r["device_kind"] == device_kind
        assert r["tokens_per_second"] == pytest.approx(config.batch * r["n"] / r["median_seconds"], rel=1e-12)
        assert r["tokens_per_second_best"] == pytest.approx(config.batch * r["n"] / r["min_seconds"], rel=1e-12)
        assert r["reps"] == len(r["times_seconds"]) == config.reps
        assert r["median_seconds"] == pytest.approx(statistics.median(r["times_seconds"]), abs=1e-6)
        assert 0 < r["min_seconds"] <= r["median_seconds"]
        # Compilation is timed apart: ahead of the first call, which is not among the timed calls either.
        assert r["compile_seconds"] > 0 and r["first_call_seconds"] > 0
        assert r["compiled_temp_bytes"] > 0 and r["compiled_argument_bytes"] > 0
        assert (
            r["compiled_total_bytes"]
            == (r["compiled_argument_bytes"] + r["compiled_output_bytes"] - r["compiled_alias_bytes"])
            + r["compiled_temp_bytes"]
        )
        assert r["library"] == ("jax.nn" if r["case"] == "jax.nn" else "attnlab")
    skipped = [r for r in payload["records"] if "median_seconds" not in r]
    assert {(r["case"], r["implementation"]) for r in skipped} == {("jax.nn", "cudnn")}
    assert all("cuDNN" in r["skipped"] for r in skipped)


def test_fast_paths_match_dense_in_the_same_run(quick_run):
    _, payload = quick_run
    exact_max_n = payload["config"]["exact_max_n"]
    checked = [r for r in _timed(payload) if r["n"] <= exact_max_n]
    assert len(checked) == 3 * 2
    assert all(r["max_abs_error"] is None is r["error_reference"] for r in _timed(payload) if r["n"] > exact_max_n)
    for r in checked:
        assert r["error_reference"] == throughput.ERROR_REFERENCE
        # the output (forward) to 1e-5; the gradients scale with their size
        tolerance = 1e-5 * (1.0 if r["mode"] == "forward" else max(1.0, r["max_abs_reference"]))
        assert 0 <= r["max_abs_error"] < tolerance, r
        assert r["max_abs_reference"] > 0.1


def test_figures_are_written_and_rebuilt_identically_from_the_json(quick_run):
    out, _ = quick_run
    written = sorted(p.name for p in (out / "figures").iterdir())
    assert written == sorted(f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "svg"))
    first = {name: (out / "figures" / name).read_bytes() for name in written}
    assert all(len(data) > 5000 for data in first.values())
    for name in written:
        (out / "figures" / name).unlink()
    assert cli.main(["figures", str(out)]) == 0
    assert {name: (out / "figures" / name).read_bytes() for name in written} == first
    assert "throughput_quick_tokens_per_second.png" in (out / "README.md").read_text()


def test_rerun_times_nothing(quick_run, monkeypatch):
    out, payload = quick_run

    def fail(config, point):
        raise AssertionError(f"point timed again: {point}")

    monkeypatch.setattr(throughput, "run_point", fail)
    assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress", "--no-figures"]) == 0
    assert json.loads((out / "throughput_quick.json").read_text())["records"] == payload["records"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("implementations=['chunked', 'flash']", "implementations: 'flash' is not accepted; accepted: dense, chunked"),
        ("reps=-1", "reps must be an integer >= 1; got -1"),
        ("jax_nn=['triton']", "jax_nn: 'triton' is not accepted; accepted: xla, cudnn"),
        ("modes=['backward']", "modes: 'backward' is not accepted; accepted: forward, forward+backward"),
        ("dtype=float64", "dtype: 'float64' is not accepted; accepted: float32, bfloat16"),
        ("dense_normalizers=['entmax15']", "dense_normalizers: ['entmax15'] are not normalizer labels"),
        ("rep_budget_s=0", "rep_budget_s must be a number > 0"),
    ],
)
def test_bad_config_names_the_key_and_what_is_accepted(override, expected):
    with pytest.raises(ConfigError) as err:
        experiments.load(QUICK, [override])
    assert expected in str(err.value) and str(QUICK) in str(err.value)


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'repetitions'; accepted keys: .*reps"):
        experiments.load(QUICK, ["repetitions=3"])


def test_unsupported_combinations_are_skipped_with_a_reason():
    config = throughput.Config(normalizers=(NormalizerSpec("softmax"), NormalizerSpec("sparsemax")), dense_max_n=512)
    reason = throughput.skip_reason
    assert "GPU" in reason(config, "jax.nn", "cudnn", 256, "cpu")
    assert "float32" in reason(config, "softmax", "cudnn", 256, "gpu")
    bf16 = throughput.Config(normalizers=config.normalizers, dtype="bfloat16")
    assert reason(bf16, "softmax", "cudnn", 256, "gpu") is None
    assert "softmax-type" in reason(bf16, "sparsemax", "cudnn", 256, "gpu")
    assert "entmax family" in reason(config, "softmax", "pallas", 256, "gpu")
    assert reason(config, "sparsemax", "pallas", 256, "gpu") is None
    assert "pallas_interpret" in reason(config, "sparsemax", "pallas", 256, "cpu")
    interpreted = throughput.Config(normalizers=config.normalizers, pallas_interpret=True)
    assert reason(interpreted, "sparsemax", "pallas", 256, "cpu") is None
    assert "dense_max_n = 512" in reason(config, "softmax", "dense", 1024, "cpu")
    assert "dense_max_n = 512" in reason(config, "jax.nn", "xla", 1024, "cpu")
    assert reason(config, "softmax", "chunked", 1 << 20, "cpu") is None


def test_compiled_memory_chunked_grows_linearly_and_dense_quadratically():
    # Above the 512-query, 512-key blocks of the chunked softmax path: from n to 4n its temporaries
    # grow at most linearly (x4; in fact little, one block's worth), the dense n x n logits x16.
    config = throughput.Config(normalizers=(NormalizerSpec("softmax"),), heads=1, head_dim=8)

    def temp_bytes(implementation, n):
        compiled, _ = throughput.compile_program(config, "softmax", implementation, n, "forward")
        return throughput.compiled_memory(compiled)["compiled_temp_bytes"]

    dense = temp_bytes("dense", 512), temp_bytes("dense", 2048)
    chunked = temp_bytes("chunked", 512), temp_bytes("chunked", 2048)
    assert dense[1] / dense[0] > 12, dense
    assert chunked[1] / chunked[0] < 6, chunked
    assert dense[1] > 2048 * 2048 * 4 > 4 * chunked[1], (dense, chunked)
