"""Peak resident memory of one attention forward (and optionally backward) at length n.

Run one length per process, since peak RSS never goes down:

    python benchmarks/attention_memory.py --n 65536 --normalizer entmax15 [--backward]

prints one JSON line: n, normalizer, implementation, peak RSS of the process (bytes), the RSS
before the call, and the seconds the first (compiling) call took. Layout B=1, 8 heads, head dim
64, causal, float32 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(
    n: int,
    normalizer: str,
    implementation: str,
    heads: int,
    head_dim: int,
    backward: bool,
    query_block: int | None = None,
) -> dict:
    import jax
    import jax.numpy as jnp

    from attnlab.attention import dot_product_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, n, heads, head_dim), jnp.float32) for key in keys)
    jax.block_until_ready((q, k, v))

    def forward(q, k, v):
        return dot_product_attention(
            q, k, v, is_causal=True, normalizer=normalizer, implementation=implementation, query_block=query_block
        )

    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) ** 2), argnums=(0, 1, 2)) if backward else forward)
    before = _rss_now()
    started = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "n": n,
        "normalizer": normalizer,
        "implementation": implementation,
        "heads": heads,
        "head_dim": head_dim,
        "backward": backward,
        "query_block": query_block,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "seconds_first_call": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--normalizer", default="softmax")
    parser.add_argument("--implementation", default="chunked")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--query-block", type=int, default=None, help="query block of the chunked sparse path")
    args = parser.parse_args(argv)
    result = measure(
        args.n, args.normalizer, args.implementation, args.heads, args.head_dim, args.backward, args.query_block
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
