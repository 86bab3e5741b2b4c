"""benchmarks/throughput.py: records, exactness fields, resuming, memory summary and figures.

Timings are never asserted (tests run on busy machines). torch and the entmax library are optional:
without them their cases are skipped, and so is every check that needs them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from attnlab import figures

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
GIB = 1 << 30


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _peers_importable(throughput) -> bool:
    return throughput._peer_import_error("entmax") is None


def _time_records(payload: dict) -> list[dict]:
    return [r for r in payload["records"] if r["measure"] == "time"]


def test_quick_run_records_exactness_resume_and_figures(throughput, tmp_path, monkeypatch):
    out = tmp_path / "throughput_cpu.json"
    cases = ["attnlab_softmax", "attnlab_sparsemax", "torch_sdpa", "entmax_lib_sparsemax"]
    argv = ["--quick", "--lengths", "64", "--reps", "1", "--only", *cases, "--out", str(out)]
    assert throughput.main([*argv, "--no-progress", "--no-figures"]) == 0
    payload = json.loads(out.read_text())
    assert payload["kind"] == "throughput_benchmark" and payload["finished_at"]
    assert payload["environment"]["backend"] == "cpu" and payload["config"]["heads"] == 8
    assert "--only" in payload["command"]
    records = _time_records(payload)
    attnlab = [r for r in records if r["library"] == "attnlab"]
    assert {(r["case"], r["n"], r["mode"]) for r in attnlab} == {
        (case, n, mode) for case in cases[:2] for n in (64,) for mode in ("forward", "forward+backward")
    }
    for r in attnlab:
        assert r["median_s"] > 0 and 0 < r["min_s"] <= r["median_s"] and len(r["times"]) == r["reps"] == 1
        assert r["compile_s"] is not None and r["error_reference"] == "attnlab dense"
        # Chunked against dense: the output (forward) to 1e-5; the gradients scale with their size.
        tolerance = 1e-5 if r["mode"] == "forward" else 1e-5 * max(1.0, r["max_abs_reference"])
        assert r["max_abs_error"] < tolerance, r
    peers = [r for r in records if r["library"] in ("torch", "entmax")]
    assert len(peers) == 2 * 2
    if _peers_importable(throughput):
        assert all(r["median_s"] > 0 and r["torch_threads"] >= 1 for r in peers)
        for r in attnlab:
            assert r["peer"] in ("torch_sdpa", "entmax_lib_sparsemax") and r["max_abs_error_vs_peer"] < 1e-4, r
        ratios = {(r["ratio"], r["n"], r["mode"]) for r in payload["ratios"]}
        assert ("sparsemax / softmax", 64, "forward") in ratios
        assert ("entmax lib / sparsemax", 64, "forward+backward") in ratios
    else:
        assert all("not importable" in r["skipped"] for r in peers)

    # A rerun with the same --out times nothing: every timed point is already there. Skipped points
    # (a peer that is not installed) are tried again, by design, so only their time stamp may change.
    def fail(*args, **kwargs):
        raise AssertionError("a point already in the results was timed again")

    def without_skip_times(rows):
        return [{k: v for k, v in r.items() if not (r.get("skipped") and k == "measured_at")} for r in rows]

    monkeypatch.setattr(throughput, "time_call", fail)
    assert throughput.main([*argv, "--no-progress", "--no-figures"]) == 0
    assert without_skip_times(_time_records(json.loads(out.read_text()))) == without_skip_times(records)

    paths = figures.render(out)
    assert sorted(p.name for p in paths) == ["throughput_cpu_time.png", "throughput_cpu_time.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_missing_torch_skips_peers_with_a_notice(throughput, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setitem(sys.modules, "entmax", None)
    out = tmp_path / "t.json"
    argv = ["--quick", "--only", "torch_sdpa", "entmax_lib_*", "--out", str(out), "--no-progress", "--no-figures"]
    assert throughput.main(argv) == 0
    assert "notice: torch is not importable" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert len(records) == 4 * 2 * 2
    assert all("not importable" in r["skipped"] and "median_s" not in r for r in records)


def test_memory_points_resume_and_extrapolate(throughput, tmp_path, capsys):
    out = tmp_path / "throughput_cpu.json"
    commands = []

    def linear_memory(command):  # stands in for a benchmarks/attention_memory.py process
        commands.append(command)
        n = int(command[command.index("--n") + 1])
        per_token = 2000 if "jax.nn" in command else 1000
        return {"peak_rss_bytes": 300_000_000 + per_token * n, "rss_before_bytes": 1, "seconds_first_call": 0.1}

    argv = ["--quick", "--memory-only", "--only", "attnlab_entmax13", "jax_nn_xla", "--out", str(out), "--no-progress"]
    assert throughput.main(argv, measure_point=linear_memory) == 0
    assert any(c[-4:] == ["--normalizer", "entmax", "--alpha", "1.3"] for c in commands)
    assert any(c[-2:] == ["--implementation", "jax.nn"] for c in commands)
    payload = json.loads(out.read_text())
    measured = {(r["case"], r["n"]) for r in payload["records"] if r["measure"] == "memory"}
    assert measured == {("attnlab_entmax13", 1024), ("attnlab_entmax13", 2048)} | {
        ("jax_nn_xla", 512),
        ("jax_nn_xla", 1024),
    }
    summary = {row["case"]: row for row in payload["memory_summary"]}
    entmax = summary["attnlab_entmax13"]
    assert entmax["longest_measured_n"] == 2048 and "extrapolated" in entmax["model"]
    assert entmax["n_at_20GiB_extrapolated"] == pytest.approx((20 * GIB - 300_000_000) / 1000, abs=1)
    # jax.nn: 8 heads x n^2 x 4 bytes of logits reach 20 GiB at n = sqrt(20 GiB / 32).
    assert summary["jax_nn_xla"]["n_at_20GiB_logits"] == int((20 * GIB / 32) ** 0.5)

    def fail(command):
        raise AssertionError(f"measured again: {command}")

    assert throughput.main(argv, measure_point=fail) == 0
    assert "memory" in capsys.readouterr().out
    names = sorted(p.name for p in figures.render(out))
    assert names == ["throughput_cpu_memory.png", "throughput_cpu_memory.svg"]


def test_ratio_targets(throughput):
    def record(case, n, seconds):
        return {"measure": "time", "case": case, "n": n, "mode": "forward", "median_s": seconds}

    records = [record("attnlab_softmax", n, 1.0) for n in (2048, 4096)]
    records += [record("attnlab_sparsemax", 2048, 3.0), record("attnlab_sparsemax", 4096, 2.0)]
    records += [record("entmax_lib_sparsemax", 4096, 30.0)]
    rows = {(r["ratio"], r["n"]): r for r in throughput.ratio_table(records)}
    assert rows[("sparsemax / softmax", 2048)]["value"] == 3.0
    assert rows[("sparsemax / softmax", 2048)]["target_met"] is None  # the target is stated at n = 4096
    assert rows[("sparsemax / softmax", 4096)]["target_met"] is True
    assert rows[("entmax lib / sparsemax", 4096)]["value"] == 15.0
    assert rows[("entmax lib / sparsemax", 4096)]["target_met"] is False


def test_unknown_case_is_a_usage_error(throughput, capsys):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--only", "attnlab_nosuchmax"])
    assert exit_info.value.code == 2
    assert "attnlab_nosuchmax: no such case" in capsys.readouterr().err


TRAIN_LM = Path(__file__).resolve().parent.parent / "benchmarks" / "train_lm.py"


def test_train_lm_records_each_normalizer_resumes_and_draws_the_training_curves(tmp_path):
    spec = importlib.util.spec_from_file_location("train_lm_benchmark", TRAIN_LM)
    train_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_lm)
    out = tmp_path / "train_lm_cpu.json"
    tiny = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--width", "16", "--layers", "1", "--heads", "2"]
    args = [*tiny, "--warmup", "1", "--eval-batches", "1", "--no-progress", "--out", str(out)]
    assert train_lm.main([*args, "--normalizers", "sparsemax"]) == 0
    payload = json.loads(out.read_text())
    assert payload["kind"] == "train_lm_benchmark" and payload["config"]["corpus"]["train_files"] > 100
    assert [r["normalizer"] for r in payload["records"]] == ["sparsemax"]
    for record in payload["records"]:
        assert [h["step"] for h in record["history"]] == [3]
        assert record["validation_tokens"] == 2 * 32 and 0 < record["validation_loss"] < 10
        assert record["model_config"]["normalizer"][0]["name"] == record["normalizer"]
    first = payload["records"][0]["validation_loss"]
    assert train_lm.main([*args, "--normalizers", "sparsemax", "ssmax"]) == 0  # sparsemax is skipped, ssmax added
    payload = json.loads(out.read_text())
    assert [r["normalizer"] for r in payload["records"]] == ["sparsemax", "ssmax"]
    assert payload["run_seconds"] > 0
    assert payload["records"][0]["validation_loss"] == first
    paths = figures.render(out)
    assert sorted(p.name for p in paths) == ["train_lm_cpu_training_loss.png", "train_lm_cpu_training_loss.svg"]
    svg = paths[1].read_bytes()
    assert figures.render(out)[1].read_bytes() == svg
