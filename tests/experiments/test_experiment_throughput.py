"""The `throughput` experiment kind: records, exactness against dense and against the peers, skipped
peers with the reason, compiled memory, peak memory in a fresh process, reuse by point key,
figures, config checks.

Timings themselves are never asserted (tests run on busy machines); only how they are recorded.
torch and the entmax library are optional: without them their points are recorded as skipped,
and the checks that need their results are skipped here.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import jax
import pytest

from attnlab import cli, experiments
from attnlab.experiments import throughput
from attnlab.experiments.config import ConfigError, Lengths
from attnlab.normalizers import NormalizerSpec

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "throughput_quick.toml"
FIGURES = [
    "throughput_quick_compile_time",
    "throughput_quick_compiled_memory",
    "throughput_quick_flop_rate",
    "throughput_quick_relative_time",
    "throughput_quick_tokens_per_second",
]
PEERS_INSTALLED = all(throughput.peer_import(peer)[1] is None for peer in throughput.DEFAULT_PEERS)


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
    keys = ["measure", "case", "implementation", "n", "mode"]
    assert [[r[k] for k in keys] for r in payload["records"]] == [
        [p[k] for k in keys] for p in throughput.points(config)
    ]
    assert {r["measure"] for r in payload["records"]} == {"time"}  # the quick config has no memory points
    timed = _timed(payload)
    ours = {("softmax", "chunked"), ("sparsemax", "chunked"), ("jax.nn", "xla")}
    peers = {("softmax", "torch_sdpa"), ("sparsemax", "entmax_lib")}
    assert {(r["case"], r["implementation"]) for r in timed} == (ours | peers if PEERS_INSTALLED else ours)
    assert len(timed) == len(ours | peers if PEERS_INSTALLED else ours) * 2 * 2  # 2 lengths, 2 modes
    device_kind = jax.devices()[0].device_kind
    for r in timed:
        assert r["backend"] == jax.default_backend() and r["device_kind"] == device_kind
        assert r["tokens_per_second"] == pytest.approx(config.batch * r["n"] / r["median_seconds"], rel=1e-12)
        assert r["tokens_per_second_best"] == pytest.approx(config.batch * r["n"] / r["min_seconds"], rel=1e-12)
        # FlashAttention's count: 4 B N n^2 H forward, half of it causal, 3.5x with the backward
        work = 4 * config.batch * config.heads * r["n"] ** 2 * config.head_dim / (2 if config.causal else 1)
        assert r["attention_flops"] == work * (3.5 if r["mode"] == "forward+backward" else 1)
        assert r["tflops_per_second"] == pytest.approx(r["attention_flops"] / r["median_seconds"] / 1e12, rel=1e-12)
        assert r["reps"] == len(r["times_seconds"]) == config.reps
        assert r["median_seconds"] == pytest.approx(statistics.median(r["times_seconds"]), abs=1e-6)
        assert 0 < r["min_seconds"] <= r["median_seconds"] and r["first_call_seconds"] > 0
        if r["implementation"] in throughput.PEERS:  # eager: nothing compiled
            assert r["compile_seconds"] is None and r["compiled_temp_bytes"] is None and r["torch_threads"] >= 1
            assert r["library"] == ("torch" if r["implementation"] == "torch_sdpa" else "entmax")
            continue
        # Compilation is timed apart: ahead of the first call, which is not among the timed calls either.
        assert r["compile_seconds"] > 0
        assert r["compiled_temp_bytes"] > 0 and r["compiled_argument_bytes"] > 0
        assert (
            r["compiled_total_bytes"]
            == (r["compiled_argument_bytes"] + r["compiled_output_bytes"] - r["compiled_alias_bytes"])
            + r["compiled_temp_bytes"]
        )
        assert r["library"] == ("jax.nn" if r["case"] == "jax.nn" else "attnlab")
    skipped = [r for r in payload["records"] if "median_seconds" not in r]
    cudnn = {("jax.nn", "cudnn")}
    assert {(r["case"], r["implementation"]) for r in skipped} == (cudnn if PEERS_INSTALLED else cudnn | peers)
    for r in skipped:
        assert ("cuDNN" in r["skipped"]) if r["implementation"] == "cudnn" else ("pip install" in r["skipped"])


def test_fast_paths_and_peers_match_dense_and_each_other_in_the_same_run(quick_run):
    _, payload = quick_run
    exact_max_n = payload["config"]["exact_max_n"]
    checked = [r for r in _timed(payload) if r["n"] <= exact_max_n]
    assert len(checked) == len(_timed(payload)) // 2
    assert all(r["max_abs_error"] is None is r["error_reference"] for r in _timed(payload) if r["n"] > exact_max_n)
    for r in checked:
        assert r["error_reference"] == throughput.ERROR_REFERENCE
        # the output (forward) to 1e-5; the gradients scale with their size
        tolerance = 1e-5 * (1.0 if r["mode"] == "forward" else max(1.0, r["max_abs_reference"]))
        assert 0 <= r["max_abs_error"] < tolerance, r
        assert r["max_abs_reference"] > 0.1
    ours = [r for r in checked if r["implementation"] not in throughput.PEERS]
    if not PEERS_INSTALLED:
        assert all(r["peer"] is None is r["max_abs_error_vs_peer"] for r in ours)
        return
    expected = {"softmax": "torch_sdpa", "sparsemax": "entmax_lib", "jax.nn": "torch_sdpa"}
    for r in ours:
        assert r["peer"] == expected[r["case"]] and 0 <= r["max_abs_error_vs_peer"] < 1e-4, r
    for r in _timed(payload):
        if r["implementation"] in throughput.PEERS:
            assert r["peer_version"].startswith("torch ") and r["peer"] is None


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


def _refuse(config, point):
    raise AssertionError(f"point run again: {point}")


def test_rerun_times_nothing(quick_run, monkeypatch, tmp_path):
    out, payload = quick_run
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(throughput, "time_record", _refuse)
    monkeypatch.setattr(throughput, "memory_record", _refuse)
    assert cli.main(["run", str(QUICK), "--out", str(tmp_path), "--no-progress", "--no-figures"]) == 0
    assert json.loads((tmp_path / "throughput_quick.json").read_text())["records"] == payload["records"]


def test_memory_points_run_in_a_fresh_process_and_reuse_every_timing(quick_run, monkeypatch, tmp_path):
    # Memory settings only enumerate memory points: every timing point keeps its key and is
    # reused, and the one memory point runs in its own process.
    out, payload = quick_run
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(throughput, "time_record", _refuse)
    overrides = ["--set", "memory_lengths=[256]", "--set", "memory_cases=['softmax']"]
    assert cli.main(["run", str(QUICK), "--out", str(tmp_path), "--no-progress", *overrides]) == 0
    records = json.loads((tmp_path / "throughput_quick.json").read_text())["records"]
    assert records[:-1] == payload["records"]
    memory = records[-1]
    assert (memory["measure"], memory["case"], memory["implementation"], memory["n"]) == (
        "memory",
        "softmax",
        "chunked",
        256,
    )
    assert memory["peak_metric"] == "peak RSS of the process" and memory["device_peak_bytes"] is None
    assert memory["peak_bytes"] == memory["peak_rss_bytes"] >= memory["rss_before_bytes"] > 0
    assert memory["compile_seconds"] > 0 and memory["first_call_seconds"] > 0
    assert (tmp_path / "figures" / "throughput_quick_peak_memory.png").stat().st_size > 5000


def test_peak_memory_of_dense_holds_the_logits_and_chunked_does_not():
    # One [1, 1, n, n] float32 logits tensor is 256 MiB at n = 8192: the dense path's peak grows
    # by at least that much over the inputs; the chunked path's (compiling included) by well under.
    config = throughput.Config(
        normalizers=(NormalizerSpec("softmax"),), implementations=("dense", "chunked"), jax_nn=(), heads=1, head_dim=16
    )
    n = 8192
    logits = n * n * 4
    extra = {}
    for implementation in ("dense", "chunked"):
        point = {"measure": "memory", "case": "softmax", "implementation": implementation, "n": n, "mode": "forward"}
        record = throughput.run_point(config, point)[0]
        extra[implementation] = record["peak_rss_bytes"] - record["rss_before_bytes"]
    assert extra["dense"] > logits > 4 * extra["chunked"], {k: v >> 20 for k, v in extra.items()}


def test_memory_points_skip_peers_and_dense_paths_beyond_their_cap():
    config = throughput.Config(
        memory_lengths=(1024, 16384), memory_dense_max_n=8192, memory_cases=("softmax", "jax.nn")
    )
    memory = [p for p in throughput.points(config) if p["measure"] == "memory"]
    assert {(p["case"], p["implementation"]) for p in memory} == {
        ("softmax", "dense"),
        ("softmax", "chunked"),
        ("jax.nn", "xla"),
        ("jax.nn", "cudnn"),
    }
    reason = throughput.memory_skip_reason
    assert "memory_dense_max_n = 8192" in reason(config, "jax.nn", "xla", 16384, "forward")
    assert "memory_dense_max_n = 8192" in reason(config, "softmax", "dense", 16384, "forward")
    assert reason(config, "softmax", "chunked", 16384, "forward") is None
    assert "attnlab and jax.nn only" in reason(config, "softmax", "torch_sdpa", 1024, "forward")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "implementations=['chunked', 'flash']",
            "implementations must all be one of dense, xla, chunked, cudnn, online, blocked_entmax, "
            "query_blocked, pallas",
        ),
        ("reps=-1", "reps must be >= 1; got -1"),
        ("jax_nn=['triton']", "jax_nn must all be one of xla, cudnn; got ['triton']"),
        ("peers=['flash_attn']", "peers must all be one of torch_sdpa, entmax_lib, adasplash; got ['flash_attn']"),
        ("modes=['backward']", "modes must all be one of forward, forward+backward; got ['backward']"),
        ("memory_modes=['backward']", "memory_modes must all be one of forward, forward+backward"),
        ("dtype=float64", "dtype must be one of float32, bfloat16; got 'float64'"),
        ("dense_normalizers=['entmax15']", "dense_normalizers=['entmax15'] must name normalizer labels"),
        (
            "memory_cases=['entmax15']",
            "memory_cases=['entmax15'] must name normalizer labels; accepted: softmax, sparsemax, jax.nn",
        ),
        ("rep_budget_s=0", "rep_budget_s must be > 0 (seconds); got 0"),
        ("slow_s=-1", "slow_s must be > 0 (seconds); got -1"),
        ("peer_max_n=0", "peer_max_n must be >= 1; got 0"),
        ("memory_lengths=[256, 256]", "memory_lengths must not repeat a value; got [256, 256]"),
        ("modes=[]", "modes=[] and memory_lengths=[] are both empty: nothing to measure"),
    ],
)
def test_bad_config_names_the_key_and_what_is_accepted(override, expected):
    with pytest.raises(ConfigError) as err:
        experiments.load(QUICK, [override])
    assert expected in str(err.value) and str(QUICK) in str(err.value)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        experiments.load(QUICK, ["reps=0", "peers=['flash_attn']", "memory_lengths=[0]"])
    assert len(err.value.problems) == 3
    assert all(str(QUICK) in problem for problem in err.value.problems)
    assert [p.split(": ", 1)[1].split()[0] for p in err.value.problems] == ["peers", "reps", "memory_lengths"]


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'repetitions'; accepted keys: .*reps"):
        experiments.load(QUICK, ["repetitions=3"])


def test_unsupported_combinations_are_skipped_with_a_reason():
    config = throughput.Config(
        normalizers=(NormalizerSpec("softmax"), NormalizerSpec("sparsemax"), NormalizerSpec("multimax")),
        dense_max_n=512,
    )
    reason = throughput.skip_reason
    assert "GPU" in reason(config, "jax.nn", "cudnn", 256, "cpu")
    assert "float32" in reason(config, "softmax", "cudnn", 256, "gpu")
    bf16 = throughput.Config(normalizers=config.normalizers, dtype="bfloat16")
    assert reason(bf16, "softmax", "cudnn", 256, "gpu") is None
    assert "softmax-type" in reason(bf16, "sparsemax", "cudnn", 256, "gpu")
    assert "no Pallas kernel" in reason(config, "multimax", "pallas", 256, "gpu")
    assert reason(config, "sparsemax", "pallas", 256, "gpu") is None
    assert reason(config, "softmax", "pallas", 256, "gpu") is None
    assert "pallas_interpret" in reason(config, "sparsemax", "pallas", 256, "cpu")
    interpreted = throughput.Config(normalizers=config.normalizers, pallas_interpret=True)
    assert reason(interpreted, "sparsemax", "pallas", 256, "cpu") is None
    assert "dense_max_n = 512" in reason(config, "softmax", "dense", 1024, "cpu")
    assert "dense_max_n = 512" in reason(config, "jax.nn", "xla", 1024, "cpu")
    assert reason(config, "softmax", "chunked", 1 << 20, "cpu") is None
    assert "CUDA GPU" in reason(config, "sparsemax", "adasplash", 1024, "cpu")
    assert "power of two" in reason(config, "sparsemax", "adasplash", 1000, "gpu")
    if PEERS_INSTALLED:
        assert "peer_max_n = 4096" in reason(config, "sparsemax", "entmax_lib", 8192, "cpu")
        assert reason(config, "softmax", "torch_sdpa", 1 << 20, "cpu") is None


def test_each_peer_takes_the_normalizers_it_computes():
    specs = [
        NormalizerSpec("softmax"),
        NormalizerSpec("ssmax"),
        NormalizerSpec("sparsemax"),
        NormalizerSpec("entmax15"),
        NormalizerSpec("entmax", (("alpha", 1.3),), "entmax 1.3"),
        NormalizerSpec("entmax", (("alpha", 2.5),), "entmax 2.5"),
        NormalizerSpec("logn_sparsemax"),
        NormalizerSpec("softmax1"),
    ]
    config = throughput.Config(
        normalizers=tuple(specs), implementations=("chunked",), jax_nn=(), peers=throughput.PEERS
    )
    peers = [(case, impl) for case, impl in throughput.cases(config) if impl in throughput.PEERS]
    assert peers == [
        ("softmax", "torch_sdpa"),
        ("sparsemax", "entmax_lib"),
        ("sparsemax", "adasplash"),
        ("entmax15", "entmax_lib"),
        ("entmax15", "adasplash"),
        ("entmax 1.3", "entmax_lib"),
        ("entmax 1.3", "adasplash"),
    ]


def test_missing_peers_are_skipped_with_the_reason_and_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setitem(sys.modules, "entmax", None)
    config = throughput.Config(
        normalizers=(NormalizerSpec("softmax"), NormalizerSpec("sparsemax")), lengths=Lengths((64,))
    )
    peer_points = [p for p in throughput.points(config) if p["implementation"] in throughput.PEERS]
    assert len(peer_points) == 2 * 2 and all(p["peer_version"] == "not importable" for p in peer_points)
    for point in peer_points:
        [record] = throughput.run_point(config, point)
        assert "torch is not importable" in record["skipped"] and "pip install 'attnlab[bench]'" in record["skipped"]
        assert "median_seconds" not in record
    assert throughput.peer_of(config, "softmax", 64) is None


def test_a_slow_peer_call_is_the_one_measurement_and_stops_the_peer_at_longer_n(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(throughput, "_SLOW_PEER_CALLS", {})
    monkeypatch.setattr(throughput, "SETTLE_S", 0.0)
    config = throughput.Config(
        normalizers=(NormalizerSpec("softmax"),), heads=1, head_dim=8, reps=3, slow_s=1e-9, exact_max_n=0
    )

    def point(n):
        return {"measure": "time", "case": "softmax", "implementation": "torch_sdpa", "n": n, "mode": "forward"}

    [first] = throughput.run_point(config, point(32))
    assert first["reps"] == 1 and first["times_seconds"] == [round(first["first_call_seconds"], 6)]
    assert first["note"].startswith("one call only")
    [longer] = throughput.run_point(config, point(64))
    assert longer["skipped"].startswith("a single call at n=32 took")


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
