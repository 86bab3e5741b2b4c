"""Context-parallel attention at 4 devices against the single-device chunked path (issue 20's row).

Causal self-attention, B = 1, 8 heads, head dim 64, float32, forward + backward (the gradient of
sum(out^2) w.r.t. q, k, v). For each normalizer and n:

    single      one device: dot_product_attention(implementation="chunked") (online pass for
                softmax, blocked entmax for 1.5-entmax)
    cp_<scheme> context_parallel_attention over 4 devices, zigzag layout, the inputs laid out and
                sharded beforehand (laid_out=True): ring (softmax), sharded_threshold (1.5-entmax),
                and all_gather (both) for comparison

Per-device memory is XLA's compiled memory analysis of the program each device runs (arguments,
outputs and temporaries of one device: for the 4-device programs, of one shard). Times are medians
of interleaved repetitions. The 4 devices are forced CPU devices (XLA_FLAGS, set here before jax is
imported): they share this machine's cores, so the times say what the collectives and the extra
work cost, not the speedup of 4 real accelerators; the memory is what each device would hold.
Every variant is checked against `single` (max_abs_error_vs_single, on the gradient w.r.t. q).

    python benchmarks/context_parallel.py [--lengths 1024 2048] [--reps 3] [--out results]

prints the table; writes results/context_parallel.json only with --out.
"""

from __future__ import annotations

import os

DEVICES = 4
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnlab.attention import context_parallel as cp  # noqa: E402
from attnlab.attention import dot_product_attention  # noqa: E402

HEADS, HEAD_DIM = 8, 64
SCHEMES = {"softmax": ("ring", "all_gather"), "entmax15": ("sharded_threshold", "all_gather")}


def _loss_and_grads(attend):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))


def _per_device_bytes(compiled) -> int:
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)


def measure(normalizer: str, n: int, reps: int, mesh: Mesh) -> list[dict]:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, n, HEADS, HEAD_DIM), jnp.float32) for key in keys)
    single_device = jax.devices()[0]
    calls = {
        "single": (
            _loss_and_grads(
                lambda q, k, v: dot_product_attention(
                    q, k, v, normalizer=normalizer, is_causal=True, implementation="chunked"
                )
            ),
            tuple(jax.device_put(x, single_device) for x in (q, k, v)),
        )
    }
    sharding = NamedSharding(mesh, P(None, "context"))
    laid = tuple(jax.device_put(cp.lay_out(x, DEVICES), sharding) for x in (q, k, v))
    for scheme in SCHEMES[normalizer]:

        def attend(q, k, v, scheme=scheme):
            return cp.context_parallel_attention(
                q, k, v, normalizer=normalizer, mesh=mesh, is_causal=True, laid_out=True, scheme=scheme
            )

        calls[f"cp_{scheme}"] = (_loss_and_grads(attend), laid)
    records, compiled = {}, {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        compiled[name] = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled[name](*args))  # warm
        records[name] = {
            "normalizer": normalizer, "n": n, "variant": name, "devices": 1 if name == "single" else DEVICES,
            "compile_seconds": compile_s, "per_device_bytes": _per_device_bytes(compiled[name]), "times_seconds": [],
        }  # fmt: skip
    for _ in range(reps):
        for name, (_, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            records[name]["times_seconds"].append(time.perf_counter() - start)
    reference = np.asarray(compiled["single"](*calls["single"][1])[1][0])
    for name, (_, args) in calls.items():
        dq = np.asarray(compiled[name](*args)[1][0])
        if name != "single":
            dq = np.asarray(cp.restore_order(dq, DEVICES))
        records[name]["max_abs_error_vs_single"] = float(np.max(np.abs(dq - reference)))
    for record in records.values():
        record["median_seconds"] = statistics.median(record["times_seconds"])
        record["time_vs_single"] = record["median_seconds"] / statistics.median(records["single"]["times_seconds"])
        record["memory_vs_single"] = record["per_device_bytes"] / records["single"]["per_device_bytes"]
    return list(records.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--normalizers", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write context_parallel.json in this folder")
    args = parser.parse_args(argv)
    for n in args.lengths:
        if n % (2 * DEVICES):
            parser.error(f"--lengths: {n} is not a multiple of 2 x {DEVICES} devices (the zigzag layout)")
    if jax.device_count() < DEVICES:
        raise SystemExit(
            f"{DEVICES} devices needed, jax sees {jax.device_count()} (was jax imported before XLA_FLAGS?)"
        )
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("context",))
    from attnlab.experiments import results

    started = results.now()
    records = []
    for normalizer in args.normalizers:
        for n in args.lengths:
            for r in measure(normalizer, n, args.reps, mesh):
                print(
                    f"{normalizer:9s} n={n:6d} {r['variant']:22s} devices={r['devices']} "
                    f"{1e3 * r['median_seconds']:9.1f} ms x{r['time_vs_single']:.2f}   per device "
                    f"{r['per_device_bytes'] / 2**20:8.1f} MiB x{r['memory_vs_single']:.2f}   "
                    f"err {r['max_abs_error_vs_single']:.1e}",
                    flush=True,
                )
                records.append(r)
    if args.out is None:
        return
    payload = {
        "benchmark": "context_parallel",
        "setting": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32", "causal": True,
                    "devices": DEVICES, "layout": "zigzag", "mode": "forward+backward", "reps": args.reps},
        "command": "python benchmarks/context_parallel.py " + " ".join(argv or []),
        "started_at": started,
        "finished_at": results.now(),
        "environment": results.environment(),
        "records": records,
    }  # fmt: skip
    path = args.out / "context_parallel.json"
    results.replace_results(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
