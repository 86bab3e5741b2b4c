"""Train one small byte-level language model per normalizer on the default corpus; report the
validation loss reached and the training speed.

    python benchmarks/train_lm.py                        # width 128, 4 layers, 300 steps each
    python benchmarks/train_lm.py --steps 20 --eval-batches 2 --normalizers softmax ssmax   # smoke test
    python benchmarks/train_lm.py --checkpoints results/checkpoints   # keep each trained model

Every model sees the same data (train windows from the same seed, validation windows in order),
the same initialisation seed and the same optimizer, so the losses differ only by the attention
normalizer. The corpus is the Python standard library's source under the running interpreter
(`attnlab.data.load_corpus()`), split by file. Records (one per normalizer, with the training
curve) go to one JSON file, rewritten atomically after each model; a rerun skips the normalizers
already there, so an interrupted run resumes (with --checkpoints, mid-model too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from rich.console import Console
from rich.table import Table

from attnlab.data import eval_batches, load_corpus, train_batches
from attnlab.experiments.results import ResultsFile
from attnlab.nn import ModelConfig, NormalizerSpec, TransformerLM
from attnlab.train import OptimizerConfig, TrainConfig, train

# "entmax_learned_alpha": entmax with alpha learned per head from 1.5.
NORMALIZERS = {
    "softmax": "softmax",
    "ssmax": "ssmax",
    "sparsemax": "sparsemax",
    "entmax15": "entmax15",
    "entmax_learned_alpha": NormalizerSpec("entmax", learn_alpha=True, alpha_init=1.5),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS), choices=list(NORMALIZERS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches (of --batch-size windows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/train_lm_cpu.json")
    parser.add_argument("--checkpoints", default=None, help="folder for one checkpoint per normalizer")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def setting(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("steps", "batch_size", "seq_len", "width", "layers", "heads", "learning_rate", "warmup", "eval_batches")
    return {key: getattr(args, key) for key in keys} | {"seed": args.seed}


def train_one(name: str, args: argparse.Namespace, corpus: Any) -> dict[str, Any]:
    config = ModelConfig(num_layers=args.layers, width=args.width, num_heads=args.heads, normalizer=NORMALIZERS[name])
    model = TransformerLM(config, rngs=nnx.Rngs(args.seed))
    optimizer = OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=args.warmup, schedule="cosine")
    train_config = TrainConfig(steps=args.steps, optimizer=optimizer, log_every=10)

    def validation():
        return eval_batches(
            corpus.validation, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.eval_batches
        )

    checkpoint = None if args.checkpoints is None else Path(args.checkpoints) / f"train_lm_{name}.npz"
    started = time.perf_counter()
    result = train(
        model,
        train_batches(corpus.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed),
        train_config,
        eval_batches=validation,
        checkpoint=checkpoint,
        metadata={"model_config": config.to_json()},
        progress=not args.no_progress,
        description=name,
    )
    final = result.evaluations[-1]
    return {
        "model_config": config.to_json(),
        "parameters": model.num_params(),
        "validation_loss": final["loss"],
        "validation_bits_per_byte": final["loss"] / 0.6931471805599453,
        "validation_accuracy": final["token_accuracy"],
        "validation_tokens": final["scored_tokens"],
        "train_loss_last": result.history[-1]["loss"],
        "tokens_per_second": result.tokens_per_second,
        "compile_seconds": result.compile_seconds,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "history": result.history,
    }


def print_table(records: list[dict[str, Any]]) -> None:
    table = Table(title="validation loss after training (nats per byte)")
    for column in ("normalizer", "params", "val loss", "bits/byte", "val acc", "tokens/s", "train s", "compile s"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            r["normalizer"],
            f"{r['parameters']:,}",
            f"{r['validation_loss']:.4f}",
            f"{r['validation_bits_per_byte']:.3f}",
            f"{r['validation_accuracy']:.3f}",
            f"{r['tokens_per_second']:,.0f}",
            f"{r['train_seconds']:.0f}",
            f"{r['compile_seconds']:.1f}",
        )
    Console(width=120).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    corpus = load_corpus()
    config = {**setting(args), "corpus": corpus.describe()}
    out = Path(args.out)
    results = ResultsFile(out, name=out.stem, kind="train_lm_benchmark", config=config)
    if results.previous is not None:
        print(f"{out}: the setting changed; previous results kept in {results.previous}", file=sys.stderr)
    results.payload["command"] = "python benchmarks/train_lm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"corpus: {corpus.source}, {len(corpus.train):,} train / {len(corpus.validation):,} validation bytes; "
        f"devices: {jax.devices()}"
    )
    for name in args.normalizers:
        point = {"normalizer": name}
        if results.done(point):
            continue
        results.add(point, [train_one(name, args, corpus)])
    results.payload["run_seconds"] = round(sum(r["wall_seconds"] for r in results.records), 1)
    results.finish()
    print_table([r for r in results.records if r["normalizer"] in args.normalizers])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
