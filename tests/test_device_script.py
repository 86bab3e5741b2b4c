"""The device script (benchmarks/gpu.sh) rehearsed end to end on this CPU, at tiny sizes: every step
runs, the backend check passes for every path that can run here (cuDNN and AdaSplash are skipped with
their reasons, the Pallas kernels run in the interpreter), and the throughput sweep writes its JSON.
The device minutes are then spent measuring, not debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
        "throughput_gpu.json",
    ]  # fmt: skip  (the device returns at most 8 files; the writer lock is removed)
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


def test_the_device_script_wants_an_output_folder():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set OUT" in done.stderr
