"""Document-masked attention: a mask function against the same mask as an array (issue 18's row).

8 packed documents of equal length, causal, B = 1, 8 heads, head dim 64, float32 (REFERENCES.md's
CPU setting). For each normalizer and n, three calls compute the same attention:

    mask_fn   implementation="chunked", mask_fn=document_mask(segment_ids): the online pass visits
              only the key blocks that hold a visible pair (about 1/8 of the causal ones);
    array     implementation="chunked", mask=<the [1, 1, T, S] boolean array>: every causal block;
    dense     implementation="dense", the same array (the reference; up to n = 4096).

Times are medians of interleaved repetitions (the three calls alternate, so a noisy machine slows
them alike), forward and forward + backward; memory is the compiled temporaries (XLA's
memory_analysis). Every call is checked against dense at the smallest n (max_abs_error_vs_dense:
the output, or in forward + backward the gradient w.r.t. the queries). Writes
results/document_mask.json (the previous file archived first) and prints the table.

    python benchmarks/document_mask.py [--lengths 2048 4096 8192] [--reps 5] [--out results]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import dot_product_attention
from attnlab.attention import mask_functions as mf
from attnlab.experiments import results

DOCUMENTS = 8
HEADS, HEAD_DIM = 8, 64
NORMALIZERS = ("softmax", "ssmax", "sigmoid", "entmax15")
DENSE_MAX_N = 4096


def _calls(normalizer: str, n: int, mode: str) -> dict[str, tuple]:
    """Each variant's jitted function and its arguments."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, n, HEADS, HEAD_DIM), jnp.float32) for key in keys)
    segments = jnp.repeat(jnp.arange(DOCUMENTS, dtype=jnp.int32), n // DOCUMENTS)[None]
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # [1, 1, T, S]

    def variant(implementation: str, use_function: bool):
        def forward(q, k, v, segments, mask):
            return dot_product_attention(
                q, k, v, mask=None if use_function else mask, is_causal=True, normalizer=normalizer,
                implementation=implementation, mask_fn=mf.document_mask(segments) if use_function else None,
            )  # fmt: skip

        if mode == "forward":
            return jax.jit(forward)
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(forward(*a) ** 2), argnums=(0, 1, 2)))

    args = (q, k, v, segments, mask)
    calls = {"mask_fn": (variant("chunked", True), args), "array": (variant("chunked", False), args)}
    if n <= DENSE_MAX_N:
        calls["dense"] = (variant("dense", False), args)
    return calls


def _checked(result) -> np.ndarray:
    """What is compared with dense: the output (forward), or the gradient w.r.t. the queries
    (forward + backward: the result is (loss, (dq, dk, dv)))."""
    return np.asarray(result[1][0] if isinstance(result, tuple) else result)


def measure(normalizer: str, n: int, mode: str, reps: int, check: bool) -> list[dict]:
    calls = _calls(normalizer, n, mode)
    records = {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(*args))  # warm
        records[name] = {
            "normalizer": normalizer, "n": n, "mode": mode, "variant": name, "compile_seconds": compile_s,
            "compiled_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes), "times_seconds": [],
            "compiled": compiled,
        }  # fmt: skip
    for _ in range(reps):
        for name, (_, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(records[name]["compiled"](*args))
            records[name]["times_seconds"].append(time.perf_counter() - start)
    if check:
        reference = _checked(records["dense"]["compiled"](*calls["dense"][1]))
        for name, (_, args) in calls.items():
            error = float(np.max(np.abs(_checked(records[name]["compiled"](*args)) - reference)))
            records[name]["max_abs_error_vs_dense"] = error
    out = []
    for record in records.values():
        record.pop("compiled")
        record["median_seconds"] = statistics.median(record["times_seconds"])
        record["tokens_per_second"] = n / record["median_seconds"]
        out.append(record)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS))
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    for n in args.lengths:
        if n % DOCUMENTS:
            parser.error(f"--lengths: {n} is not a multiple of the {DOCUMENTS} documents")
    started = results.now()
    records = []
    for normalizer in args.normalizers:
        for mode in args.modes:
            for n in args.lengths:
                check = n == min(args.lengths) and n <= DENSE_MAX_N
                new = measure(normalizer, n, mode, args.reps, check)
                by_variant = {r["variant"]: r for r in new}
                for r in new:
                    r["time_vs_array"] = r["median_seconds"] / by_variant["array"]["median_seconds"]
                    r["memory_vs_array"] = r["compiled_temp_bytes"] / max(1, by_variant["array"]["compiled_temp_bytes"])
                    print(
                        f"{normalizer:9s} {mode:17s} n={n:6d} {r['variant']:8s} {1e3 * r['median_seconds']:9.1f} ms "
                        f"x{r['time_vs_array']:.2f} of array   temp {r['compiled_temp_bytes'] / 2**20:8.1f} MiB "
                        f"x{r['memory_vs_array']:.2f}",
                        flush=True,
                    )
                records.extend(new)
    payload = {
        "benchmark": "document_mask",
        "setting": {"documents": DOCUMENTS, "batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                    "causal": True, "reps": args.reps},
        "command": "python benchmarks/document_mask.py " + " ".join(argv or []),
        "started_at": started,
        "finished_at": results.now(),
        "environment": results.environment(),
        "records": records,
    }  # fmt: skip
    path = args.out / "document_mask.json"
    results.replace_results(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
