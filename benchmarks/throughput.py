"""Throughput of attnlab's attention against its peers, measured in one run, with exactness and memory.

    python benchmarks/throughput.py                      # full run: n = 1024 .. 8192, 5 reps
    python benchmarks/throughput.py --quick              # n = 256, 512, 2 reps (a smoke test)
    python benchmarks/throughput.py --memory             # also peak RSS at n = 16384, 65536 (slow)
    python benchmarks/throughput.py --only 'attnlab_*' torch_sdpa --lengths 1024 2048

Setting: causal self-attention, batch 1, 8 heads, head dim 64, float32 (--dtype), q, k, v and the
output cotangent drawn from N(0, 1) with an explicit jax PRNG key; torch gets the same numbers.
Each case is timed in two modes, "forward" (out) and "forward+backward" (the gradients of
sum(out * cotangent) with respect to q, k and v):

  attnlab_<normalizer>  attnlab.dot_product_attention(implementation="chunked"), for softmax, ssmax,
                        sparsemax, entmax15 and entmax with alpha = 1.3 (attnlab_entmax13);
  jax_nn_xla            jax.nn.dot_product_attention(is_causal=True, implementation="xla");
  jax_nn_cudnn          the same with implementation="cudnn" (GPU backends only; bf16/fp16);
  torch_sdpa            torch.nn.functional.scaled_dot_product_attention(is_causal=True);
  entmax_lib_<map>      the entmax library's sparsemax, entmax15, entmax_bisect(alpha=1.3) on the
                        full causal score matrix (-inf above the diagonal), then @ V;
  attnlab_dense_<norm>  attnlab's dense path (with --dense, n <= --dense-max-n).

JAX cases are jitted; the first call (compilation) is timed apart, then --reps calls, each
blocked until ready; records hold the median, the minimum and every time. torch runs eagerly with
its default thread count (recorded). The entmax library is skipped beyond --peer-max-n, and a peer
whose single call exceeded --slow-s is timed by that call alone and skipped at larger n.
Missing torch or entmax skips their cases with a notice, never an error.

Exactness: every attnlab case at n <= --exact-max-n records max_abs_error against
implementation="dense" (the output in forward mode, the three gradients in forward+backward mode),
and max_abs_error_vs_peer against its peer's result (torch SDPA for softmax, the entmax library for
the sparse maps) when that peer runs.

Memory (--memory): peak RSS of one forward per point, each in its own process
(benchmarks/attention_memory.py), for every attnlab normalizer at --memory-lengths and for jax.nn
at --memory-jax-nn-lengths that fit in memory; a line RSS = a + b n fitted through the measured
points gives, as an extrapolation, the longest n within 20 GiB.

Results go to one JSON file (default results/throughput_<backend>.json), rewritten atomically
after every point; a rerun with the same --out skips the points already there (--force redoes
them), so an interrupted run resumes. Figures: `attnlab figures results/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnlab import dot_product_attention, normalizers
from attnlab.experiments.results import ResultsFile, now, write_json_atomic

MEMORY_SCRIPT = Path(__file__).resolve().parent / "attention_memory.py"
MODES = ("forward", "forward+backward")
GIB = 1 << 30
FULL_LENGTHS = (1024, 2048, 4096, 8192)
QUICK_LENGTHS = (256, 512)
FULL_MEMORY_LENGTHS = (16384, 65536)
QUICK_MEMORY_LENGTHS = (1024, 2048)
FULL_JAX_NN_MEMORY_LENGTHS = (2048, 4096, 8192)
QUICK_JAX_NN_MEMORY_LENGTHS = (512, 1024)
MEMORY_LINES_GIB = (4, 20)
TARGETS = {
    "max_abs_error": 1e-5,
    "sparse_over_softmax_at_most": 2.5,
    "sparse_over_softmax_at_n": 4096,
    "entmax_library_over_attnlab_at_least": 20.0,
}


# ---------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One thing to time: a library's attention with one normalizer."""

    name: str
    library: str  # attnlab | jax | torch | entmax
    normalizer: str  # registry name; figures/style.py colours attnlab cases by it
    label: str
    implementation: str | None = None
    alpha: float | None = None
    peer: str | None = None  # the case whose result this one's is checked against
    gpu_only: bool = False


def _attnlab_case(normalizer: str, label: str, *, alpha=None, peer=None, dense=False) -> Case:
    suffix = "entmax13" if alpha == 1.3 else normalizer
    return Case(
        name=f"attnlab_dense_{suffix}" if dense else f"attnlab_{suffix}",
        library="attnlab",
        normalizer=normalizer,
        label=label + (" (dense)" if dense else ""),
        implementation="dense" if dense else "chunked",
        alpha=alpha,
        peer=None if dense else peer,
    )


ATTNLAB = [
    ("softmax", "softmax", None, "torch_sdpa"),
    ("ssmax", "SSMax", None, None),
    ("sparsemax", "sparsemax", None, "entmax_lib_sparsemax"),
    ("entmax15", "1.5-entmax", None, "entmax_lib_entmax15"),
    ("entmax", "α-entmax (α=1.3)", 1.3, "entmax_lib_bisect13"),
]
CASES = [
    *(_attnlab_case(name, label, alpha=alpha, peer=peer) for name, label, alpha, peer in ATTNLAB),
    Case("jax_nn_xla", "jax", "softmax", "jax.nn (XLA)", implementation="xla"),
    Case("jax_nn_cudnn", "jax", "softmax", "jax.nn (cuDNN)", implementation="cudnn", gpu_only=True),
    Case("torch_sdpa", "torch", "softmax", "torch SDPA"),
    Case("entmax_lib_sparsemax", "entmax", "sparsemax", "entmax lib sparsemax"),
    Case("entmax_lib_entmax15", "entmax", "entmax15", "entmax lib entmax15"),
    Case("entmax_lib_bisect13", "entmax", "entmax", "entmax lib bisect (α=1.3)", alpha=1.3),
]
DENSE_CASES = [_attnlab_case(name, label, alpha=alpha, dense=True) for name, label, alpha, _ in ATTNLAB]
# Seconds of quiet before each case (see time_call).
SETTLE_S = 1.0
BY_NAME = {case.name: case for case in CASES + DENSE_CASES}

# (name, numerator case, denominator case, target): the ratio table, each a time ÷ a time.
_SPARSE_TARGET = ("<=", TARGETS["sparse_over_softmax_at_most"], TARGETS["sparse_over_softmax_at_n"])
_LIBRARY_TARGET = (">=", TARGETS["entmax_library_over_attnlab_at_least"], None)
RATIOS = [
    ("softmax / torch SDPA", "attnlab_softmax", "torch_sdpa", None),
    ("SSMax / torch SDPA", "attnlab_ssmax", "torch_sdpa", None),
    ("jax.nn XLA / softmax", "jax_nn_xla", "attnlab_softmax", None),
    ("jax.nn cuDNN / softmax", "jax_nn_cudnn", "attnlab_softmax", None),
    ("sparsemax / softmax", "attnlab_sparsemax", "attnlab_softmax", _SPARSE_TARGET),
    ("1.5-entmax / softmax", "attnlab_entmax15", "attnlab_softmax", _SPARSE_TARGET),
    ("α-entmax 1.3 / softmax", "attnlab_entmax13", "attnlab_softmax", _SPARSE_TARGET),
    ("entmax lib / sparsemax", "entmax_lib_sparsemax", "attnlab_sparsemax", _LIBRARY_TARGET),
    ("entmax lib / 1.5-entmax", "entmax_lib_entmax15", "attnlab_entmax15", _LIBRARY_TARGET),
    ("entmax lib / α-entmax 1.3", "entmax_lib_bisect13", "attnlab_entmax13", _LIBRARY_TARGET),
]


def _peer_import_error(library: str) -> str | None:
    """Why torch (or torch + entmax) cannot be imported, or None when it can."""
    if library not in ("torch", "entmax"):
        return None
    try:
        import torch  # noqa: F401

        if library == "entmax":
            import entmax  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"{type(err).__name__}: {err}"
    return None


# ---------------------------------------------------------------------------------------------- inputs


class Inputs:
    """q, k, v [B, n, N, H] and the output cotangent, from one PRNG key; torch copies [B, N, n, H]."""

    def __init__(self, n: int, setting: dict[str, Any]):
        self.n = n
        self.dtype = jnp.dtype(setting["dtype"])
        shape = (setting["batch"], n, setting["heads"], setting["head_dim"])
        keys = jax.random.split(jax.random.PRNGKey(setting["seed"]), 4)
        self.q, self.k, self.v, self.cotangent = (jax.random.normal(key, shape, self.dtype) for key in keys)
        jax.block_until_ready((self.q, self.k, self.v, self.cotangent))
        self.scale = 1.0 / math.sqrt(setting["head_dim"])
        self._torch: dict[str, Any] | None = None

    def torch(self) -> dict[str, Any]:
        if self._torch is None:
            import torch

            on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
            device = torch.device("cuda" if on_gpu else "cpu")
            torch_dtype = getattr(torch, str(self.dtype))

            def convert(x):
                # numpy has no bfloat16: go through float32, then cast in torch
                host = np.ascontiguousarray(np.asarray(x.astype(jnp.float32)).transpose(0, 2, 1, 3))
                return torch.from_numpy(host).to(device=device, dtype=torch_dtype)

            self._torch = {
                "q": convert(self.q),
                "k": convert(self.k),
                "v": convert(self.v),
                "cotangent": convert(self.cotangent),
                "upper": torch.ones(self.n, self.n, dtype=torch.bool, device=device).triu(1),
                "sync": torch.cuda.synchronize if on_gpu else (lambda: None),
            }
        return self._torch


def _jax_forward(case: Case) -> Callable:
    if case.library == "jax":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=case.implementation)
    normalizer = normalizers.get(case.normalizer, alpha=case.alpha) if case.alpha is not None else case.normalizer
    return lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, normalizer=normalizer, implementation=case.implementation
    )


def _jax_call(case: Case, x: Inputs, mode: str) -> Callable[[], Any]:
    forward = _jax_forward(case)
    if mode == "forward":
        fn = jax.jit(forward)
        return lambda: jax.block_until_ready(fn(x.q, x.k, x.v))

    def loss(q, k, v, cotangent):
        return jnp.sum((forward(q, k, v) * cotangent).astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(grads(x.q, x.k, x.v, x.cotangent))


def _torch_forward(case: Case, t: dict[str, Any], scale: float) -> Callable:
    import torch

    if case.library == "torch":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    import entmax

    mapping = {
        "sparsemax": entmax.sparsemax,
        "entmax15": entmax.entmax15,
        "entmax": lambda scores, dim: entmax.entmax_bisect(scores, alpha=case.alpha, dim=dim),
    }[case.normalizer]

    def attend(q, k, v):
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(t["upper"], float("-inf"))
        return mapping(scores, dim=-1) @ v

    return attend


def _torch_call(case: Case, x: Inputs, mode: str) -> Callable[[], Any]:
    import torch

    t = x.torch()
    forward = _torch_forward(case, t, x.scale)
    if mode == "forward":

        def call():
            with torch.inference_mode():
                out = forward(t["q"], t["k"], t["v"])
            t["sync"]()
            return out

        return call
    leaves = [t[name].detach().requires_grad_() for name in ("q", "k", "v")]

    def call_with_grads():
        out = forward(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_outputs=t["cotangent"])
        t["sync"]()
        return grads

    return call_with_grads


def make_call(case: Case, x: Inputs, mode: str) -> Callable[[], Any]:
    """A function of no arguments that runs `case` once on `x`, waits for it, and returns its result."""
    return _torch_call(case, x, mode) if case.library in ("torch", "entmax") else _jax_call(case, x, mode)


def to_numpy(case: Case, result: Any) -> tuple[np.ndarray, ...]:
    """Outputs or gradients as float32 numpy in the [B, n, N, H] layout."""
    parts = result if isinstance(result, (tuple, list)) else (result,)
    if case.library in ("torch", "entmax"):
        return tuple(p.detach().float().cpu().numpy().transpose(0, 2, 1, 3) for p in parts)
    return tuple(np.asarray(p.astype(jnp.float32)) for p in parts)


def max_abs_error(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> float:
    return float(max(np.max(np.abs(x.astype(np.float64) - y)) for x, y in zip(a, b, strict=True)))


# ---------------------------------------------------------------------------------------------- timing


def time_call(
    call: Callable[[], Any], *, reps: int, compiled: bool, slow_s: float, budget_s: float
) -> tuple[dict, Any]:
    """Run `call` once (compilation for JAX, warm-up for torch), then up to `reps` timed calls.

    Repetitions stop early once their sum exceeds `budget_s`. An eager (torch) call slower than
    `slow_s` is not repeated: that first call is the measurement.
    """
    # Let the previous case's garbage (the entmax library's n x n tensors) go and torch's OpenMP
    # workers fall asleep: spinning workers and page faults otherwise slow the next case down.
    gc.collect()
    time.sleep(SETTLE_S)
    started = time.perf_counter()
    result = call()
    first = time.perf_counter() - started
    times: list[float] = []
    while len(times) < reps:
        if times and sum(times) >= budget_s:
            break
        if not compiled and not times and first > slow_s:
            break
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    record: dict[str, Any] = {"first_call_s": round(first, 6)}
    if times:
        median = statistics.median(times)
        record.update(median_s=median, min_s=min(times), compile_s=round(first - median, 6))
    else:
        times = [first]
        record.update(median_s=first, min_s=first, compile_s=None, note=f"one call only: it took {first:.1f} s")
    record.update(reps=len(times), times=[round(t, 6) for t in times])
    record["median_s"], record["min_s"] = round(record["median_s"], 6), round(record["min_s"], 6)
    return record, result


# ---------------------------------------------------------------------------------------------- tables


def _time_of(records: list[dict], case: str, n: int, mode: str) -> float | None:
    for r in records:
        if r.get("measure") == "time" and (r["case"], r["n"], r["mode"]) == (case, n, mode) and r.get("median_s"):
            return r["median_s"]
    return None


def ratio_table(records: list[dict]) -> list[dict]:
    """Every ratio of RATIOS whose two times are in `records`, per n and mode, with its target."""
    lengths = sorted({r["n"] for r in records if r.get("measure") == "time"})
    rows = []
    for name, top, bottom, target in RATIOS:
        for mode in MODES:
            for n in lengths:
                a, b = _time_of(records, top, n, mode), _time_of(records, bottom, n, mode)
                if a is None or b is None:
                    continue
                row = {"ratio": name, "numerator": top, "denominator": bottom, "n": n, "mode": mode}
                row["value"] = round(a / b, 4)
                row["target"] = None if target is None else f"{target[0]} {target[1]:g}"
                applies = target is not None and (target[2] is None or target[2] == n)
                row["target_met"] = None
                if applies:
                    row["target_met"] = row["value"] <= target[1] if target[0] == "<=" else row["value"] >= target[1]
                rows.append(row)
    return rows


def _linear_fit(points: list[tuple[int, int]]) -> tuple[float, float] | None:
    ns = sorted({n for n, _ in points})
    if len(ns) < 2:
        return None
    slope, intercept = np.polyfit([n for n, _ in points], [b for _, b in points], 1)
    return float(intercept), float(slope)


def memory_summary(records: list[dict], setting: dict[str, Any]) -> list[dict]:
    """Per memory case: the longest n measured and, from a line a + b n through the points, the n
    at 4 and 20 GiB (extrapolated); jax.nn: the n where its logits alone, batch * heads * n^2
    elements, reach 4 and 20 GiB."""
    itemsize = jnp.dtype(setting["dtype"]).itemsize
    out = []
    cases = sorted({r["case"] for r in records if r.get("measure") == "memory" and r.get("peak_bytes")})
    for case in cases:
        points = sorted(
            (r["n"], r["peak_bytes"])
            for r in records
            if r.get("measure") == "memory" and r["case"] == case and r.get("peak_bytes")
        )
        longest = points[-1]
        row: dict[str, Any] = {
            "case": case,
            "library": BY_NAME[case].library if case in BY_NAME else None,
            "normalizer": BY_NAME[case].normalizer if case in BY_NAME else None,
            "label": BY_NAME[case].label if case in BY_NAME else case,
            "measured_n": [n for n, _ in points],
            "longest_measured_n": longest[0],
            "peak_bytes_at_longest_measured_n": longest[1],
        }
        if case.startswith("jax_nn"):
            per_n2 = setting["batch"] * setting["heads"] * itemsize
            row["model"] = f"logits: {setting['batch']} x {setting['heads']} x n^2 x {itemsize} bytes"
            for limit in MEMORY_LINES_GIB:
                row[f"n_at_{limit}GiB_logits"] = int(math.sqrt(limit * GIB / per_n2))
        else:
            fit = _linear_fit(points)
            if fit is not None:
                a, b = fit
                row["fit"] = {"a_bytes": round(a), "b_bytes_per_token": round(b, 1)}
                row["model"] = "extrapolated: peak = a + b n, least squares through the measured points"
                for limit in MEMORY_LINES_GIB:
                    row[f"n_at_{limit}GiB_extrapolated"] = int((limit * GIB - a) / b) if b > 0 else None
        out.append(row)
    return out


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def print_tables(console: Console, payload: dict) -> None:
    records = [r for r in payload["records"] if r.get("measure") == "time"]
    lengths = sorted({r["n"] for r in records})
    cases = [c for c in BY_NAME if any(r["case"] == c for r in records)]
    for mode in MODES:
        table = Table(title=f"median time per call, {mode}", title_justify="left")
        table.add_column("case")
        for n in lengths:
            table.add_column(f"n={n}", justify="right")
        table.add_column("max abs err vs dense", justify="right")
        table.add_column("vs peer", justify="right")
        for case in cases:
            cells, errors = [], {"max_abs_error": [], "max_abs_error_vs_peer": []}
            for n in lengths:
                r = next((r for r in records if (r["case"], r["n"], r["mode"]) == (case, n, mode)), None)
                cells.append(
                    "-"
                    if r is None
                    else "skipped"
                    if r.get("skipped")
                    else "FAILED"
                    if r.get("error")
                    else _ms(r["median_s"])
                )
                for key, values in errors.items():
                    if r is not None and r.get(key) is not None:
                        values.append(r[key])
            table.add_row(case, *cells, *(f"{max(v):.1e}" if v else "" for v in errors.values()))
        console.print(table)
    ratios = payload.get("ratios", [])
    if ratios:
        table = Table(title="ratios of median times (same run)", title_justify="left")
        table.add_column("ratio")
        table.add_column("mode")
        for n in lengths:
            table.add_column(f"n={n}", justify="right")
        table.add_column("target")
        for name, *_ in RATIOS:
            for mode in MODES:
                rows = {r["n"]: r for r in ratios if r["ratio"] == name and r["mode"] == mode}
                if not rows:
                    continue
                cells = []
                for n in lengths:
                    r = rows.get(n)
                    mark = "" if r is None or r["target_met"] is None else (" ok" if r["target_met"] else " MISSED")
                    cells.append("-" if r is None else f"{r['value']:.2f}{mark}")
                target = next(iter(rows.values()))["target"] or ""
                table.add_row(name, mode, *cells, target)
        console.print(table)
    summary = payload.get("memory_summary", [])
    if summary:
        table = Table(title="peak memory of one forward (measured; fits extrapolated)", title_justify="left")
        for column in ("case", "measured n", "peak at longest", "n at 4 GiB", "n at 20 GiB", "how"):
            table.add_column(column)
        for row in summary:
            extrapolated = "_extrapolated" if "fit" in row else "_logits"
            table.add_row(
                row["case"],
                ", ".join(map(str, row["measured_n"])),
                f"{row['peak_bytes_at_longest_measured_n'] / GIB:.2f} GiB",
                str(row.get(f"n_at_4GiB{extrapolated}", "-")),
                str(row.get(f"n_at_20GiB{extrapolated}", "-")),
                "linear fit (extrapolation)" if "fit" in row else row.get("model", "one point: no fit"),
            )
        console.print(table)


# ---------------------------------------------------------------------------------------------- the run


class Benchmark:
    """The results file, its records keyed by (measure, case, n, mode), and the run over them."""

    def __init__(self, args: argparse.Namespace, setting: dict[str, Any], command: str, console: Console):
        self.args, self.setting, self.console = args, setting, console
        self.results = ResultsFile(
            Path(args.out), name=Path(args.out).stem, kind="throughput_benchmark", config=setting
        )
        if self.results.previous is not None:
            console.print(f"{args.out}: setting changed; previous results kept in {self.results.previous}")
        env = self.results.payload["environment"]
        env.update(_peer_versions())
        self.commit = env.get("commit")
        self.results.payload["command"] = command  # the latest; every command that wrote here is in "commands"
        self.results.payload.setdefault("commands", []).append(command)
        self.outputs: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}  # (case, mode) -> result, current n
        self.import_errors = {lib: _peer_import_error(lib) for lib in ("torch", "entmax") if self._wants(lib)}
        self.failed: list[str] = []

    def _wants(self, library: str) -> bool:
        return any(c.library == library for c in self.args.cases)

    @property
    def records(self) -> list[dict]:
        return self.results.records

    def find(self, measure: str, case: str, n: int, mode: str) -> dict | None:
        key = (measure, case, n, mode)
        return next((r for r in self.records if (r.get("measure"), r["case"], r["n"], r["mode"]) == key), None)

    def done(self, measure: str, case: str, n: int, mode: str) -> bool:
        record = self.find(measure, case, n, mode)
        return not self.args.force and record is not None and not record.get("skipped") and not record.get("error")

    def put(self, record: dict) -> None:
        """Add `record`, replacing the one with the same key, and rewrite the file."""
        key = (record["measure"], record["case"], record["n"], record["mode"])
        kept = [r for r in self.records if (r.get("measure"), r["case"], r["n"], r["mode"]) != key]
        self.results.payload["records"] = [*kept, record]
        self.save()

    def save(self) -> None:
        self.results.payload["ratios"] = ratio_table(self.records)
        self.results.payload["memory_summary"] = memory_summary(self.records, self.setting)
        self.results.payload["updated_at"] = now()
        write_json_atomic(self.results.path, self.results.payload)

    def base_record(self, measure: str, case: Case, n: int, mode: str) -> dict:
        return {
            "measure": measure,
            "case": case.name,
            "library": case.library,
            "label": case.label,
            "normalizer": case.normalizer,
            "alpha": case.alpha,
            "implementation": case.implementation,
            "n": n,
            "mode": mode,
            "dtype": self.setting["dtype"],
            "commit": self.commit,
            "measured_at": now(),
        }

    # -- why a case does not run at n

    def skip_reason(self, case: Case, n: int, mode: str) -> str | None:
        if case.library in ("torch", "entmax") and self.import_errors.get(case.library):
            return f"{case.library} not importable ({self.import_errors[case.library]}); pip install -e '.[bench]'"
        if case.library == "entmax" and n > self.args.peer_max_n:
            return f"entmax library capped at n <= {self.args.peer_max_n} (--peer-max-n)"
        if case.implementation == "dense" and case.library == "attnlab" and n > self.args.dense_max_n:
            return f"dense reference capped at n <= {self.args.dense_max_n} (--dense-max-n)"
        if case.library != "attnlab":
            for r in self.records:
                same = r.get("measure") == "time" and r["case"] == case.name and r["mode"] == mode
                if same and r["n"] < n and r.get("compile_s") is None and r.get("first_call_s", 0) > self.args.slow_s:
                    return f"a single call at n={r['n']} took {r['first_call_s']:.1f} s > {self.args.slow_s:g} s"
        return None

    def points(self) -> list[tuple[int, Case, str]]:
        backend = jax.default_backend()
        return [
            (n, case, mode)
            for n in self.args.lengths
            for case in self.args.cases
            if not (case.gpu_only and backend != "gpu")
            for mode in MODES
        ]

    # -- timing

    def run_times(self, progress: Progress) -> None:
        points = self.points()
        todo = [p for p in points if not self.done("time", p[1].name, p[0], p[2])]
        task = progress.add_task("time", total=len(points), completed=len(points) - len(todo), point="")
        checked, inputs = set(), None
        for n, case, mode in todo:
            if inputs is None or inputs.n != n:
                if inputs is not None:
                    self.check_against_peers(inputs.n, inputs)
                    checked.add(inputs.n)
                self.outputs, inputs = {}, Inputs(n, self.setting)
            progress.update(task, point=f"{case.name} n={n} {mode}")
            self.time_point(inputs, case, n, mode)
            progress.advance(task)
        if inputs is not None:
            self.check_against_peers(inputs.n, inputs)
            checked.add(inputs.n)
        # Points timed in an earlier run may still lack their cross-check.
        for n in sorted({n for n, _, _ in points} - checked):
            if self.missing_checks(n):
                self.outputs = {}
                self.check_against_peers(n, Inputs(n, self.setting))

    def time_point(self, inputs: Inputs, case: Case, n: int, mode: str) -> None:
        record = self.base_record("time", case, n, mode)
        reason = self.skip_reason(case, n, mode)
        if reason is not None:
            self.console.print(f"  n={n:<6} {mode:<16} {case.name:<22} skipped: {reason}")
            self.put({**record, "skipped": reason})
            return
        try:
            timing, result = time_call(
                make_call(case, inputs, mode),
                reps=self.args.reps,
                compiled=case.library in ("attnlab", "jax"),
                slow_s=self.args.slow_s,
                budget_s=self.args.max_case_s,
            )
        except Exception as err:
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if case.library == "attnlab":
                self.failed.append(f"{case.name} n={n} {mode}: {message}")
                self.console.print(f"  n={n:<6} {mode:<16} {case.name:<22} FAILED: {message}")
                self.put({**record, "error": message})
            else:
                self.console.print(f"  n={n:<6} {mode:<16} {case.name:<22} skipped: {message}")
                self.put({**record, "skipped": f"failed: {message}"})
            return
        record.update(timing)
        if case.library in ("torch", "entmax"):
            import torch

            record["torch_threads"] = torch.get_num_threads()
        self.outputs[(case.name, mode)] = to_numpy(case, result)
        del result
        if case.library == "attnlab" and case.implementation == "chunked" and n <= self.args.exact_max_n:
            dense = dataclasses.replace(case, implementation="dense")
            reference = to_numpy(dense, make_call(dense, inputs, mode)())
            record["max_abs_error"] = max_abs_error(self.outputs[(case.name, mode)], reference)
            record["error_reference"] = "attnlab dense"
            record["max_abs_reference"] = float(max(np.max(np.abs(r)) for r in reference))
        error = f"  max abs err {record['max_abs_error']:.1e}" if "max_abs_error" in record else ""
        compile_s = "" if record["compile_s"] is None else f"  (compile/warm-up {record['compile_s']:.2f} s)"
        self.console.print(
            f"  n={n:<6} {mode:<16} {case.name:<22} median {_ms(record['median_s'])}, "
            f"min {_ms(record['min_s'])} over {record['reps']}{compile_s}{error}"
        )
        self.put(record)

    # -- exactness against peers

    def missing_checks(self, n: int) -> list[tuple[Case, str]]:
        selected = {c.name for c in self.args.cases}
        out = []
        for case in self.args.cases:
            if case.peer is None or case.peer not in selected or n > self.args.exact_max_n:
                continue
            for mode in MODES:
                record = self.find("time", case.name, n, mode)
                if record is None or record.get("median_s") is None or "max_abs_error_vs_peer" in record:
                    continue
                if self.skip_reason(BY_NAME[case.peer], n, mode) is None:
                    out.append((case, mode))
        return out

    def check_against_peers(self, n: int, inputs: Inputs | None = None) -> None:
        """Fill max_abs_error_vs_peer, computing (untimed) whichever result this run has not kept."""
        for case, mode in self.missing_checks(n):
            peer = BY_NAME[case.peer]
            try:
                for c in (case, peer):
                    if (c.name, mode) not in self.outputs:
                        inputs = inputs or Inputs(n, self.setting)
                        self.outputs[(c.name, mode)] = to_numpy(c, make_call(c, inputs, mode)())
            except Exception as err:
                self.console.print(f"  n={n:<6} {mode:<16} {case.name:<22} no check against {peer.name}: {err}")
                continue
            record = self.find("time", case.name, n, mode)
            record["max_abs_error_vs_peer"] = max_abs_error(
                self.outputs[(case.name, mode)], self.outputs[(peer.name, mode)]
            )
            record["peer"] = peer.name
            self.console.print(
                f"  n={n:<6} {mode:<16} {case.name:<22} vs {peer.name}: max abs err "
                f"{record['max_abs_error_vs_peer']:.1e}"
            )
            self.save()

    # -- memory

    def memory_points(self) -> list[tuple[int, Case]]:
        points = []
        for case in self.args.cases:
            if case.library == "attnlab" and case.implementation == "chunked":
                points += [(n, case) for n in self.args.memory_lengths]
            elif case.name == "jax_nn_xla":
                points += [(n, case) for n in self.args.memory_jax_nn_lengths]
        return sorted(points, key=lambda p: (p[0], p[1].name))

    def run_memory(self, progress: Progress, measure_point: Callable[[list[str]], dict]) -> None:
        points = self.memory_points()
        todo = [(n, c) for n, c in points if not self.done("memory", c.name, n, "forward")]
        task = progress.add_task("memory", total=len(points), completed=len(points) - len(todo), point="")
        for n, case in todo:
            progress.update(task, point=f"{case.name} n={n}")
            record = self.base_record("memory", case, n, "forward")
            reason = self._memory_skip_reason(case, n)
            if reason is None:
                try:
                    measured = measure_point(self._memory_command(case, n))
                except (subprocess.SubprocessError, OSError, ValueError) as err:
                    reason = f"failed: {err}"
            if reason is not None:
                self.console.print(f"  memory n={n:<6} {case.name:<22} skipped: {reason}")
                self.put({**record, "skipped": reason})
            else:
                device = measured.get("device_peak_bytes")
                record.update(
                    peak_rss_bytes=measured["peak_rss_bytes"],
                    rss_before_bytes=measured["rss_before_bytes"],
                    device_peak_bytes=device,
                    peak_bytes=device if device else measured["peak_rss_bytes"],
                    peak_metric="device peak bytes in use" if device else "peak RSS of the process",
                    seconds_first_call=measured["seconds_first_call"],
                )
                self.console.print(
                    f"  memory n={n:<6} {case.name:<22} peak {record['peak_bytes'] / GIB:.2f} GiB "
                    f"({record['peak_metric']}), first call {record['seconds_first_call']:.1f} s"
                )
                self.put(record)
            progress.advance(task)

    def _memory_skip_reason(self, case: Case, n: int) -> str | None:
        if case.library != "jax":
            return None
        s = self.setting
        need = 3 * s["batch"] * s["heads"] * n * n * jnp.dtype(s["dtype"]).itemsize
        available = _available_memory()
        if available is not None and need > 0.8 * available:
            return (
                f"would need about {need / GIB:.1f} GiB (3 x [B, N, n, n] logits), {available / GIB:.1f} GiB available"
            )
        return None

    def _memory_command(self, case: Case, n: int) -> list[str]:
        s = self.setting
        command = [sys.executable, str(MEMORY_SCRIPT), "--n", str(n), "--heads", str(s["heads"])]
        command += ["--head-dim", str(s["head_dim"]), "--dtype", s["dtype"]]
        if case.library == "jax":
            return [*command, "--implementation", "jax.nn"]
        command += ["--implementation", "chunked", "--normalizer", case.normalizer]
        return command + ([] if case.alpha is None else ["--alpha", str(case.alpha)])


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_in_subprocess(command: list[str], timeout_s: float) -> dict:
    """Run benchmarks/attention_memory.py and parse the JSON line it prints."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        raise ValueError(f"exit code {done.returncode}{killed}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peer_versions() -> dict[str, Any]:
    from importlib import metadata

    versions: dict[str, Any] = {}
    for package in ("torch", "entmax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if versions["torch"] and _peer_import_error("torch") is None:
        import torch

        versions["torch_num_threads"] = torch.get_num_threads()
    return versions


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="n = 256, 512 and 2 reps (memory: n = 1024, 2048)")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {FULL_LENGTHS})")
    parser.add_argument("--reps", type=int, help="timed calls per point after the compiling one (default 5)")
    parser.add_argument("--out", help="results JSON (default results/throughput_<backend>.json)")
    parser.add_argument("--only", nargs="+", metavar="CASE", help="cases to run (names or globs, e.g. 'attnlab_*')")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of q, k, v and the cotangent")
    parser.add_argument("--dense", action="store_true", help="also time attnlab's dense path (n <= --dense-max-n)")
    parser.add_argument("--dense-max-n", type=int, default=2048)
    parser.add_argument("--exact-max-n", type=int, default=4096, help="largest n checked against the dense path")
    parser.add_argument("--peer-max-n", type=int, default=4096, help="largest n for the entmax library")
    parser.add_argument("--slow-s", type=float, default=20.0, help="a peer call slower than this is not repeated")
    parser.add_argument("--max-case-s", type=float, default=60.0, help="stop repeating a point after this many s")
    parser.add_argument("--force", action="store_true", help="redo points already in --out")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (one process per point)")
    parser.add_argument("--memory-only", action="store_true", help="measure memory only, no timing")
    parser.add_argument("--memory-lengths", type=int, nargs="+", help=f"default {FULL_MEMORY_LENGTHS}")
    parser.add_argument("--memory-jax-nn-lengths", type=int, nargs="+", help=f"default {FULL_JAX_NN_MEMORY_LENGTHS}")
    parser.add_argument("--memory-timeout-s", type=float, default=3600.0, help="per memory point")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-figures", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)

    args.lengths = args.lengths or list(QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    args.reps = args.reps or (2 if args.quick else 5)
    args.memory_lengths = args.memory_lengths or list(QUICK_MEMORY_LENGTHS if args.quick else FULL_MEMORY_LENGTHS)
    args.memory_jax_nn_lengths = args.memory_jax_nn_lengths or list(
        QUICK_JAX_NN_MEMORY_LENGTHS if args.quick else FULL_JAX_NN_MEMORY_LENGTHS
    )
    args.memory = args.memory or args.memory_only
    if args.reps < 1 or min(args.lengths) < 1:
        parser.error(f"--reps ({args.reps}) and --lengths ({args.lengths}) must be >= 1")
    if args.out is None:
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        args.out = f"results/throughput_{jax.default_backend()}{suffix}.json"
    pool = CASES + (DENSE_CASES if args.dense else [])
    if args.only:
        unknown = [p for p in args.only if not any(fnmatch.fnmatchcase(c.name, p) for c in CASES + DENSE_CASES)]
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: no such case; cases: {', '.join(BY_NAME)}")
        pool = [c for c in CASES + DENSE_CASES if any(fnmatch.fnmatchcase(c.name, p) for p in args.only)]
    args.cases = pool
    return args


def setting_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "attention": "causal self-attention, is_causal=True; scale 1/sqrt(head_dim)",
        "batch": 1,
        "heads": 8,
        "head_dim": 64,
        "dtype": args.dtype,
        "seed": args.seed,
        "inputs": "q, k, v, cotangent ~ N(0, 1) from jax.random.split(PRNGKey(seed), 4); torch gets the same numbers",
        "modes": {
            "forward": "out = attention(q, k, v)",
            "forward+backward": "d/d(q, k, v) of sum(out * cotangent)",
        },
        "max_abs_error": "forward: of the output; forward+backward: of the three gradients (max over all)",
        "targets": TARGETS,
    }


def main(argv: list[str] | None = None, *, measure_point: Callable[[list[str]], dict] | None = None) -> int:
    args = parse_args(argv)
    # Not a terminal (a log file, a pipe): wide enough that the tables do not wrap.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    command = "python benchmarks/throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    bench = Benchmark(args, setting_of(args), command, console)
    for library, problem in bench.import_errors.items():
        if problem:
            console.print(f"notice: {library} is not importable ({problem}); its cases are skipped")
    console.print(
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {os.cpu_count()} CPUs), "
        f"torch threads {bench.results.payload['environment'].get('torch_num_threads')}; "
        f"cases: {', '.join(c.name for c in args.cases)}; n = {args.lengths}; writing {args.out}"
    )
    started = time.perf_counter()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, TextColumn("{task.fields[point]}"), console=console, disable=args.no_progress) as bar:
            if not args.memory_only:
                bench.run_times(bar)
            if args.memory:
                timeout = args.memory_timeout_s
                bench.run_memory(bar, measure_point or (lambda command: measure_in_subprocess(command, timeout)))
    except KeyboardInterrupt:
        console.print(f"\ninterrupted: finished points are saved in {args.out}; rerun the same command to resume")
        return 130
    payload = bench.results.payload
    payload["run_seconds"] = round(payload.get("run_seconds", 0.0) + time.perf_counter() - started, 2)
    payload["finished_at"] = now()
    bench.save()
    print_tables(console, payload)
    console.print(f"wrote {args.out}")
    if not args.no_figures:
        from attnlab import figures

        for path in figures.render(args.out):
            console.print(f"  figure {path}")
    if bench.failed:
        console.print(f"{len(bench.failed)} attnlab point(s) failed:\n  " + "\n  ".join(bench.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
