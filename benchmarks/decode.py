"""Decoding speed per normalizer: prefill and token-by-token decode of a small TransformerLM with its
key/value cache (attnlab.nn.decoding), against softmax measured in the same run.

    .venv/bin/python benchmarks/decode.py                      # writes results/decode.json
    .venv/bin/python benchmarks/decode.py --quick --out /tmp/decode.json

For each normalizer and batch size: the prompt [B, P] through `prefill`, then M new tokens through
`decode` (one jitted lax.scan: sample, run the token at the next position), each program compiled
once before timing. Repetitions are interleaved (every case once, then every case again, ...) so
that a slow spell of a shared machine falls on all cases alike; each case reports its fastest
repetition (and the median). Decode tokens/s = B * M / time of the decode program; prefill
tokens/s = B * P / time of the prefill program. Ratios are against softmax at the same batch.
Parameters are random (no training): the speed of a step does not depend on them, except for the
sparse maps' thresholds, whose cost here is a sort over each query's cached keys either way.

The JSON holds the config, the environment (versions, device, commit) and one record per case; an
earlier results file is archived (results/archive/decode/) before it is replaced, never overwritten.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.experiments.results import environment, now, replace_results
from attnlab.nn import ModelConfig, TransformerLM
from attnlab.nn.decoding import decode, decoding_state, prefill

NORMALIZERS = ("softmax", "ssmax", "sparsemax", "entmax15", "asentmax", "sink_softmax", "stick_breaking", "sigmoid")
PEER = "softmax"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence (M)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: checks that the script runs")
    parser.add_argument("--out", type=Path, default=Path("results/decode.json"))
    args = parser.parse_args(argv)
    if PEER not in args.normalizers:
        parser.error(f"--normalizers must include {PEER!r}, the peer every ratio is taken against")
    if args.quick:
        args.width, args.layers, args.prompt, args.new, args.repeats = 32, 1, 8, 8, 2
    return args


class Case:
    """One (normalizer, batch): its model, compiled programs and timings."""

    def __init__(self, normalizer: str, batch: int, args: argparse.Namespace):
        self.normalizer, self.batch = normalizer, batch
        config = ModelConfig(num_layers=args.layers, width=args.width, num_heads=args.heads, normalizer=normalizer)
        model = TransformerLM(config, rngs=nnx.Rngs(0))
        self.prompt = jax.random.randint(jax.random.key(1), (batch, args.prompt), 0, config.vocab_size)
        self.new = args.new
        self.graphdef, self.cache, self.rest = decoding_state(model, batch, args.prompt + args.new - 1)
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}
        started = time.perf_counter()
        self.run()  # compiles both programs
        self.compile_seconds = time.perf_counter() - started

    def run(self) -> None:
        started = time.perf_counter()
        cache, logits = jax.block_until_ready(prefill(self.graphdef, self.cache, self.rest, self.prompt))
        middle = time.perf_counter()
        _, tokens = decode(
            self.graphdef, cache, self.rest, logits, jax.random.key(2), steps=self.new, temperature=jnp.float32(1.0)
        )
        jax.block_until_ready(tokens)
        self.times["prefill"].append(middle - started)
        self.times["decode"].append(time.perf_counter() - middle)

    def record(self, prompt: int) -> dict:
        best = {stage: min(times[1:]) for stage, times in self.times.items()}  # the first run compiled
        median = {stage: statistics.median(times[1:]) for stage, times in self.times.items()}
        return {
            "normalizer": self.normalizer,
            "batch": self.batch,
            "prefill_seconds": best["prefill"],
            "prefill_seconds_median": median["prefill"],
            "prefill_tokens_per_second": self.batch * prompt / best["prefill"],
            "decode_seconds": best["decode"],
            "decode_seconds_median": median["decode"],
            "decode_tokens_per_second": self.batch * self.new / best["decode"],
            "decode_ms_per_step": 1e3 * best["decode"] / self.new,
            "compile_seconds": self.compile_seconds,
        }


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    started_at, started = now(), time.perf_counter()
    cases = [Case(name, batch, args) for batch in args.batch for name in args.normalizers]
    for _ in range(args.repeats):
        for case in cases:
            case.run()
    records = [case.record(args.prompt) for case in cases]
    peers = {r["batch"]: r for r in records if r["normalizer"] == PEER}
    for r in records:
        peer = peers[r["batch"]]
        r["decode_vs_softmax"] = r["decode_tokens_per_second"] / peer["decode_tokens_per_second"]
        r["prefill_vs_softmax"] = r["prefill_tokens_per_second"] / peer["prefill_tokens_per_second"]

    print(
        f"width {args.width}, {args.layers} layers, {args.heads} heads, prompt {args.prompt}, {args.new} new tokens, "
        f"fastest of {args.repeats} interleaved repetitions, {jax.devices()[0].device_kind}"
    )
    header = f"{'normalizer':<16}{'batch':>6}{'decode tok/s':>14}{'vs softmax':>12}{'ms/step':>10}"
    header += f"{'prefill tok/s':>15}{'vs softmax':>12}"
    print(header)
    for r in records:
        print(
            f"{r['normalizer']:<16}{r['batch']:>6}{r['decode_tokens_per_second']:>14.0f}{r['decode_vs_softmax']:>11.2f}x"
            f"{r['decode_ms_per_step']:>10.2f}{r['prefill_tokens_per_second']:>15.0f}{r['prefill_vs_softmax']:>11.2f}x"
        )

    payload = {
        "benchmark": "decode",
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            key: getattr(args, key) for key in ("normalizers", "batch", "width", "layers", "heads", "prompt", "new")
        }
        | {"repeats": args.repeats, "implementation": None, "dtype": "float32"},
        "environment": environment(),
        "started_at": started_at,
        "finished_at": now(),
        "run_seconds": time.perf_counter() - started,
        "records": records,
    }
    replace_results(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
