"""The device script (benchmarks/gpu.sh) rehearsed end to end on this CPU, at tiny sizes: every step
runs, the backend check passes for every path that can run here (cuDNN and AdaSplash are skipped with
their reasons, the Pallas kernels run in the interpreter), the throughput sweep writes its JSON, and
the science step runs two GPU science configs (packed into science.tar.gz, checkpoints left outside
$OUT) and records the others. The device minutes are then spent measuring, not debugging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The science step's configs, in the order it tries them (experiments/<name>.toml).
SCIENCE = ["needle_gpu", "mqar_gpu", "extrapolation_gpu", "length_generalization_gpu", "calibration_gpu",
           "distillation_gpu", "critical_scaling_gpu"]  # fmt: skip


def test_the_device_script_rehearses_on_cpu(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else done.stderr
    assert done.returncode == 0, log[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backend_check_gpu.json",
        "environment.txt",
        "log.txt",
        "science.json",
        "science.tar.gz",
        "throughput_gpu.json",
    ]  # fmt: skip  (the device returns at most 8 files; the writer lock is removed, checkpoints stay out)
    assert "backend: cpu" in (tmp_path / "environment.txt").read_text()

    checks = json.loads((tmp_path / "backend_check_gpu.json").read_text())["records"]
    ran = [r for r in checks if "skipped" not in r]
    assert {(r["normalizer"], r["backend"]) for r in ran} == {
        ("sparsemax", "pallas"), ("sparsemax", "blocked_entmax"), ("softmax1", "pallas"), ("softmax1", "online"),
    }  # fmt: skip
    assert all(r["passed"] for r in ran), [r for r in ran if not r["passed"]]
    assert {r["dtype"] for r in ran} == {"float32", "bfloat16"}
    cudnn = [r for r in checks if r["backend"] == "cudnn"]
    assert cudnn and all("cannot serve this call" in r["skipped"] for r in cudnn)

    timed = json.loads((tmp_path / "throughput_gpu.json").read_text())["records"]
    by_case = {(r["case"], r["implementation"], r.get("measure", "time")): r for r in timed}
    assert by_case[("sparsemax", "pallas", "time")]["max_abs_error"] < 2e-2  # interpreted, bfloat16
    assert "CUDA GPU" in by_case[("sparsemax", "adasplash", "time")]["skipped"]
    assert by_case[("softmax", "chunked", "memory")]["peak_bytes"] > 0

    science = {row["config"]: row for row in json.loads((tmp_path / "science.json").read_text())}
    assert list(science) == SCIENCE
    ran = ["needle_gpu", "critical_scaling_gpu"]
    assert all(science[name]["status"] == "finished" and science[name]["exit"] == 0 for name in ran), science
    assert all(
        science[name]["status"] == "skipped" and "rehearsal" in science[name]["reason"]
        for name in SCIENCE if name not in ran
    ), science  # fmt: skip
    with tarfile.open(tmp_path / "science.tar.gz") as packed:
        assert sorted(packed.getnames()) == sorted(f"{name}.json" for name in ran)
        results = {name: json.load(packed.extractfile(f"{name}.json")) for name in ran}
    needle = results["needle_gpu"]
    assert needle["finished_at"] and needle["config"]["eval_lengths"] == [72, 144]
    assert {r["record"] for r in needle["records"]} == {"training", "retrieval"}
    assert results["critical_scaling_gpu"]["finished_at"] and len(results["critical_scaling_gpu"]["records"]) == 8


def test_the_science_configs_are_the_scripts_and_load_with_three_seeds():
    from attnlab import experiments

    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    assert re.search(r'^SCIENCE_ALL="([^"]*)"$', script, re.M).group(1).split() == SCIENCE
    for name in SCIENCE:
        loaded = experiments.load(ROOT / "experiments" / f"{name}.toml")
        assert loaded.name == name and loaded.config.seeds == (0, 1, 2), name
        assert f"[{name}]=" in script  # its estimate, for the time left


def test_the_science_step_skips_what_does_not_fit(tmp_path: Path):
    """With no time left of TOTAL_S, every science config is skipped with its reason, and nothing else runs."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
           "STEPS": "science", "TOTAL_S": "1"}  # fmt: skip
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["environment.txt", "log.txt", "science.json"]
    science = {row["config"]: row for row in json.loads((tmp_path / "science.json").read_text())}
    assert list(science) == SCIENCE and all(row["status"] == "skipped" for row in science.values())
    assert "needs about 60 s (its estimate), 0 s left of TOTAL_S = 1 s" in science["needle_gpu"]["reason"]


def test_the_device_script_refuses_an_unknown_step(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "STEPS": "throughput sience"}
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "sience is not a step" in done.stderr


def test_the_device_script_wants_an_output_folder():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set OUT" in done.stderr
