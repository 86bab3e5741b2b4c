"""Peak resident memory of one attention forward (and optionally backward) at length n.

Run one length per process, since peak RSS never goes down:

    python benchmarks/attention_memory.py --n 65536 --normalizer entmax15 [--backward]
    python benchmarks/attention_memory.py --n 65536 --normalizer entmax --alpha 1.3
    python benchmarks/attention_memory.py --n 8192 --implementation jax.nn     # jax.nn.dot_product_attention

prints one JSON line: n, normalizer, implementation, peak RSS of the process (bytes), the RSS
before the call, the seconds the first (compiling) call took and, where the device reports it
(GPU), the device's peak bytes in use. Layout B=1, 8 heads, head dim 64, causal, float32 unless
told otherwise. `benchmarks/throughput.py --memory` runs this script once per point.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

# attnlab's own paths, plus jax.nn.dot_product_attention (XLA, or what jax picks on GPU) as the peer.
IMPLEMENTATIONS = ("dense", "chunked", "cudnn", "jax.nn")


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _device_peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices may not implement it
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def measure(
    n: int,
    normalizer: str,
    implementation: str,
    heads: int,
    head_dim: int,
    backward: bool,
    query_block: int | None = None,
    *,
    alpha: float | None = None,
    dtype: str = "float32",
) -> dict:
    import jax
    import jax.numpy as jnp

    from attnlab import normalizers
    from attnlab.attention import dot_product_attention

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; accepted: {', '.join(IMPLEMENTATIONS)}")
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, n, heads, head_dim), jnp.dtype(dtype)) for key in keys)
    jax.block_until_ready((q, k, v))
    normalizer_fn = normalizers.get(normalizer, alpha=alpha) if alpha is not None else normalizer

    def forward(q, k, v):
        if implementation == "jax.nn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return dot_product_attention(
            q, k, v, is_causal=True, normalizer=normalizer_fn, implementation=implementation, query_block=query_block
        )

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v).astype(jnp.float32) ** 2)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)) if backward else forward)
    before = _rss_now()
    started = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "n": n,
        "normalizer": "softmax" if implementation == "jax.nn" else normalizer,
        "alpha": alpha,
        "implementation": implementation,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "backward": backward,
        "query_block": query_block,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "device_peak_bytes": _device_peak_bytes(q.devices().pop()),
        "seconds_first_call": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--normalizer", default="softmax")
    parser.add_argument("--alpha", type=float, default=None, help="alpha of --normalizer entmax (default: 1.5)")
    parser.add_argument("--implementation", default="chunked", choices=IMPLEMENTATIONS)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--query-block", type=int, default=None, help="query block of the chunked sparse path")
    args = parser.parse_args(argv)
    result = measure(
        args.n,
        args.normalizer,
        args.implementation,
        args.heads,
        args.head_dim,
        args.backward,
        args.query_block,
        alpha=args.alpha,
        dtype=args.dtype,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
