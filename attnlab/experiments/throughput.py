"""Attention throughput, compiled and peak memory vs sequence length n, per normalizer and implementation,
against peers measured in the same run.

Setting: self-attention q, k, v [batch, n, heads, head_dim] in `dtype`, causal or not, drawn
from N(0, 1) with jax.random (key fold_in(PRNGKey(seed), n)), together with an output cotangent.
Each case is timed in the requested modes:

  "forward"           out = attention(q, k, v);
  "forward+backward"  the gradients of sum(out * cotangent) with respect to q, k and v.

Cases (one sweep; `cases` gives their order):
  - each normalizer through `attnlab.dot_product_attention(implementation=...)` for each of
    `implementations` ("dense", "chunked", "pallas", "cudnn");
  - the peers in `peers`, for each normalizer they compute, eagerly, on the same numbers:
      "torch_sdpa"  torch.nn.functional.scaled_dot_product_attention (softmax);
      "entmax_lib"  the entmax library's sparsemax, entmax15 or entmax_bisect(alpha) on the full
                    score matrix (-inf above the diagonal when causal), then @ V;
      "adasplash"   AdaSplash's Triton kernels (Gonçalves et al. 2025; `adasplash.adasplash`) for
                    alpha-entmax, alpha in (1, 2]: on a CUDA GPU only, at n a power of two;
  - the softmax baseline `jax.nn.dot_product_attention(implementation=...)` for each of `jax_nn`
    ("xla", "cudnn"), under the case label "jax.nn".
A combination that cannot run here is recorded with a `skipped` reason: cuDNN off GPU or in
float32, Pallas off GPU unless `pallas_interpret`, cuDNN for a sparse map, Pallas for a map it has
no kernel for, the dense paths (attnlab "dense", jax.nn "xla") beyond `dense_max_n` (their memory
grows as n²), the entmax library beyond `peer_max_n` (it holds the n x n scores), AdaSplash off a
CUDA GPU, a peer that is not installed (the reason says how to install it) and a peer whose single
call at a shorter n took longer than `slow_s`. A fused kernel that fails to compile or run here
(cuDNN, Pallas), a failing peer and any out-of-memory failure are recorded under `error` instead of
stopping the sweep.

Measured per timing point ({"measure": "time", ...}; one jitted program compiled ahead of time):
  compile_seconds      tracing, lowering and compiling (`jit(f).lower(...).compile()`), apart from
                       run time (None for the peers, which run eagerly);
  first_call_seconds   the first execution (allocation, autotuning on GPU, a peer's warm-up), not in
                       the statistics, except for a peer whose first call took longer than
                       `slow_s`: that call is then the one measurement (`note` says so);
  median_seconds, min_seconds, times_seconds
                       `reps` further calls, each waited for (repetitions stop early once their sum
                       passes `rep_budget_s`; `reps` records how many ran);
  tokens_per_second    batch * n / median_seconds (and tokens_per_second_best from min_seconds);
  attention_flops, tflops_per_second
                       the matmul work of the call as FlashAttention's benchmarks count it
                       (`attention_flops`: 4 batch heads n^2 head_dim for the forward, halved when
                       causal, 3.5x for forward+backward; the normaliser's own work not counted),
                       and that over median_seconds in 10^12 per second: the same count for every
                       case, so a path that skips work (causal blocks, empty blocks) scores higher;
  compiled_*_bytes     XLA's buffer assignment of the compiled program (`compiled.memory_analysis()`):
                       arguments, outputs, and temporaries (every intermediate buffer the program
                       allocates: the n x n logits of a dense path, one block's worth for a chunked
                       one). What the program asks for, not a measured high-water mark; None for peers;
  max_abs_error        at n <= `exact_max_n`, against attnlab's dense path in float32 at the highest
                       matmul precision on the same inputs (the output in forward mode, the three
                       gradients in forward+backward mode), with max_abs_reference the largest
                       |value| of that reference, so a fast path (and a peer) is checked in the same run;
  key_blocks_reachable, key_blocks_with_weight, empty_key_block_fraction
                       for the Pallas entmax kernel (maps without a scale policy): the key blocks in
                       reach of the mask and those holding some weight, over batch, heads and query
                       blocks, and the share it skipped;
  max_abs_error_vs_peer
                       at n <= `exact_max_n`, for an attnlab or jax.nn case whose normalizer a peer in
                       `peers` computes: against that peer's result (`peer` names it);
  peer_version, torch_threads
                       for peers: the library versions (also in the point, so a changed install is a
                       new point) and torch's thread count.

Measured per memory point ({"measure": "memory", ...}, for `memory_lengths` x `memory_modes` x the
cases of `memory_cases`, peers excepted), each in a fresh process
(:mod:`attnlab.experiments.throughput_memory`), since a process's peak resident memory never goes
down: peak_rss_bytes (the process's high-water mark over compiling and one call), rss_before_bytes
(after the inputs were made, before compiling), device_peak_bytes (the device allocator's peak,
where the device reports one: GPU), peak_bytes (the device peak where reported, else the peak RSS)
and peak_metric naming which, compile_seconds and first_call_seconds. Dense paths run at
n <= `memory_dense_max_n` and when their n x n buffers fit in the memory available.

Timings on a shared machine are noisy: compare cases measured in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import IMPLEMENTATIONS, dot_product_attention
from attnlab.attention.backends import pallas_kernel
from attnlab.attention.families import static_entmax_alpha
from attnlab.experiments.checks import at_least, check, distinct, each, noted, one_of, positive, setting
from attnlab.experiments.config import Lengths, to_json
from attnlab.experiments.kind import Kind
from attnlab.normalizers import Normalizer, NormalizerSpec

MODES = ("forward", "forward+backward")
JAX_NN = "jax.nn"  # the case label of the jax.nn.dot_product_attention baseline
JAX_NN_IMPLEMENTATIONS = ("xla", "cudnn")
PEERS = ("torch_sdpa", "entmax_lib", "adasplash")
DEFAULT_PEERS = ("torch_sdpa", "entmax_lib")  # AdaSplash runs on a CUDA GPU only: named in the GPU configs
PEER_LIBRARIES = {"torch_sdpa": ("torch",), "entmax_lib": ("torch", "entmax"), "adasplash": ("torch", "adasplash")}
PEER_LIBRARY = {"torch_sdpa": "torch", "entmax_lib": "entmax", "adasplash": "adasplash"}  # the `library` of its records
PEER_INSTALL = "pip install 'attnlab[bench]' (on a CPU-only machine the CPU build of torch first; see the README)"
DTYPES = ("float32", "bfloat16")
ERROR_REFERENCE = "attnlab dense, float32, highest matmul precision"
# Seconds of quiet after a peer: its garbage (the entmax library's n x n tensors) goes and torch's
# OpenMP workers stop spinning, which otherwise slows the next case down.
SETTLE_S = 0.5
MEMORY_MODULE = "attnlab.experiments.throughput_memory"


def _sweep(accepted: tuple[str, ...]) -> tuple:
    """The rules of a list of names to sweep: each one of `accepted`, none twice."""
    return (each(one_of(accepted)), distinct)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sweep of n for each (normalizer, implementation), each peer and each jax.nn implementation."""

    normalizers: tuple[NormalizerSpec, ...] = (
        NormalizerSpec("softmax"),
        NormalizerSpec("ssmax"),
        NormalizerSpec("sparsemax"),
        NormalizerSpec("entmax15"),
    )
    implementations: tuple[str, ...] = setting(("dense", "chunked"), *_sweep(IMPLEMENTATIONS))
    # Labels of the normalizers also timed with implementation="dense"; empty: every normalizer.
    dense_normalizers: tuple[str, ...] = setting((), distinct)
    jax_nn: tuple[str, ...] = setting(JAX_NN_IMPLEMENTATIONS, *_sweep(JAX_NN_IMPLEMENTATIONS))
    # Peers timed for each normalizer they compute (skipped, with the reason, when not installed or
    # when they cannot run here: AdaSplash needs a CUDA GPU).
    peers: tuple[str, ...] = setting(DEFAULT_PEERS, *_sweep(PEERS))
    lengths: Lengths = dataclasses.field(default_factory=lambda: Lengths((256, 512, 1024, 2048, 4096)))
    batch: int = setting(1, at_least(1))
    heads: int = setting(8, at_least(1))
    head_dim: int = setting(64, at_least(1))
    dtype: str = setting("float32", one_of(DTYPES))
    causal: bool = True
    # Timed modes; empty: no timing points (a run of memory points only).
    modes: tuple[str, ...] = setting(MODES, *_sweep(MODES))
    reps: int = setting(5, at_least(1))
    # Timed repetitions stop once their sum passes this many seconds (one always runs).
    rep_budget_s: float = setting(30.0, noted(positive, "seconds"))
    # Longest n for the paths that hold n x n logits: attnlab "dense" and jax.nn "xla".
    dense_max_n: int = setting(4096, at_least(1))
    # Longest n for the entmax library, which holds the n x n scores (torch SDPA runs at every n).
    peer_max_n: int = setting(4096, at_least(1))
    # A peer call slower than this many seconds is not repeated (that call is the measurement) and
    # the peer is skipped at longer n in the same run.
    slow_s: float = setting(20.0, noted(positive, "seconds"))
    # Check against dense float32 (and against the peers) at n <= this (0: never).
    exact_max_n: int = setting(1024, noted(at_least(0), "0: no exactness check"))
    # Time the Pallas kernel off GPU too, in the Pallas interpreter (slow; a correctness run, not a timing).
    pallas_interpret: bool = False
    # Peak memory, one fresh process per point: at these n (empty: none), in these modes, for these
    # case labels (normalizer labels or "jax.nn"; empty: every case but the peers).
    memory_lengths: tuple[int, ...] = setting((), noted(each(at_least(1)), "empty: no memory points"), distinct)
    memory_modes: tuple[str, ...] = setting(("forward",), *_sweep(MODES))
    memory_cases: tuple[str, ...] = setting((), distinct)
    # Longest n of a memory point on a dense path (its peak grows as n²).
    memory_dense_max_n: int = setting(8192, at_least(1))
    # A memory point still running after this many seconds is stopped and recorded as an error.
    memory_timeout_s: float = setting(1800.0, noted(positive, "seconds"))
    seed: int = setting(0, at_least(0))

    def relations(self) -> Iterator[str]:
        labels = [spec.label for spec in self.normalizers]
        if not self.modes and not self.memory_lengths:
            yield "{modes} and {memory_lengths} are both empty: nothing to measure"
        if not self.implementations and not self.jax_nn and not self.peers:
            yield "{implementations}, {jax_nn} and {peers} are all empty: nothing to measure"
        if JAX_NN in labels:
            yield f"{{normalizers}}: the label {JAX_NN!r} is reserved for the jax.nn baseline"
        for field, accepted in (("dense_normalizers", labels), ("memory_cases", [*labels, JAX_NN])):
            if any(label not in accepted for label in getattr(self, field)):
                yield f"{{{field}}} must name normalizer labels; accepted: {', '.join(accepted)}"

    def __post_init__(self):
        check(self)


# ---------------------------------------------------------------------------------------------- the sweep


def peer_takes(peer: str, normalizer: Any) -> bool:
    """Whether `peer` computes `normalizer`: torch SDPA plain softmax; the entmax library and AdaSplash
    sparsemax, 1.5-entmax and alpha-entmax with one alpha in (1, 2]; none a scale policy."""
    if not isinstance(normalizer, Normalizer) or normalizer.scale is not None:
        return False
    if peer == "torch_sdpa":
        return _softmax_type(normalizer)
    return static_entmax_alpha(normalizer) is not None


def cases(config: Config) -> list[tuple[str, str]]:
    """(case, implementation) pairs in sweep order: per normalizer label its implementations, then
    the peers that compute it; then the jax.nn baseline."""
    dense_for = set(config.dense_normalizers) or {spec.label for spec in config.normalizers}
    out = []
    for spec in config.normalizers:
        out += [
            (spec.label, implementation)
            for implementation in config.implementations
            if implementation != "dense" or spec.label in dense_for
        ]
        out += [(spec.label, peer) for peer in config.peers if peer_takes(peer, spec.build())]
    return out + [(JAX_NN, implementation) for implementation in config.jax_nn]


def memory_cases(config: Config) -> list[tuple[str, str]]:
    """The (case, implementation) pairs whose peak memory is measured: the cases of
    `memory_cases` (every one when empty), peers excepted."""
    chosen = set(config.memory_cases)
    return [(c, i) for c, i in cases(config) if i not in PEERS and (not chosen or c in chosen)]


def points(config: Config) -> list[dict[str, Any]]:
    """Timing points, one per (n, mode, case, implementation), n outermost so the references are
    reused; then memory points, one per (n, mode, case, implementation) of the memory sweep. A
    peer's point also names the installed version of its libraries (`peer_version`)."""

    def point(measure: str, case: str, implementation: str, n: int, mode: str) -> dict[str, Any]:
        out = {"measure": measure, "case": case, "implementation": implementation, "n": n, "mode": mode}
        if implementation in PEERS:
            out["peer_version"] = peer_import(implementation)[0] or "not importable"
        return out

    timed = [
        point("time", case, implementation, n, mode)
        for n in config.lengths.values
        for mode in config.modes
        for case, implementation in cases(config)
    ]
    return timed + [
        point("memory", case, implementation, n, mode)
        for n in config.memory_lengths
        for mode in config.memory_modes
        for case, implementation in memory_cases(config)
    ]


def _spec(config: Config, case: str) -> NormalizerSpec:
    return next(spec for spec in config.normalizers if spec.label == case)


def _reference_spec(config: Config, case: str) -> NormalizerSpec:
    return NormalizerSpec("softmax") if case == JAX_NN else _spec(config, case)


def peer_import(peer: str) -> tuple[str | None, str | None]:
    """(versions, None) when the libraries of `peer` import, else (None, why not)."""
    versions = []
    for library in PEER_LIBRARIES[peer]:
        try:
            module = __import__(library)
        except Exception as err:  # ImportError, or a broken install
            return None, f"{library} is not importable ({type(err).__name__}: {err}): {PEER_INSTALL}"
        versions.append(f"{library} {getattr(module, '__version__', '?')}")
    return ", ".join(versions), None


def skip_reason(
    config: Config, case: str, implementation: str, n: int, backend: str, *, memory: bool = False
) -> str | None:
    """Why (case, implementation) does not run at n on `backend`, or None when it does. The dense
    paths stop at config.dense_max_n, or for a memory point (memory=True) at memory_dense_max_n."""
    if implementation in PEERS:
        if implementation == "adasplash" and backend != "gpu":
            return f"AdaSplash runs Triton kernels on a CUDA GPU; this backend is {backend}"
        if implementation == "adasplash" and n & (n - 1):
            return f"AdaSplash takes n a power of two (without varlen); n = {n}"
        problem = peer_import(implementation)[1]
        if problem is not None:
            return problem
        if implementation == "entmax_lib" and n > config.peer_max_n:
            return f"n > peer_max_n = {config.peer_max_n}: the entmax library holds the n x n scores"
        return None
    if implementation == "cudnn":
        if backend != "gpu":
            return f"cuDNN attention needs a GPU backend; this one is {backend}"
        if config.dtype == "float32":
            return "cuDNN attention takes bfloat16 or float16, not float32 (set dtype = 'bfloat16')"
    if case != JAX_NN:
        normalizer = _spec(config, case).build()
        if implementation == "cudnn" and not _softmax_type(normalizer):
            return "cuDNN takes softmax-type normalizers only (softmax, scaled_softmax, ssmax)"
        if implementation == "pallas" and pallas_kernel(normalizer) is None:
            return (
                "no Pallas kernel runs this normalizer (they take the entmax family with one alpha in (1, 2], "
                "softmax with no sink or one concrete sink, and sigmoid)"
            )
    if implementation == "pallas" and backend != "gpu" and not config.pallas_interpret:
        return f"Pallas compiles for GPU only; on {backend} it is interpreted, slowly (set pallas_interpret = true)"
    field = "memory_dense_max_n" if memory else "dense_max_n"
    if _dense(case, implementation) and n > getattr(config, field):
        return f"n > {field} = {getattr(config, field)}: this path holds n x n logits"
    return None


def _dense(case: str, implementation: str) -> bool:
    return implementation == "dense" or (case == JAX_NN and implementation == "xla")


def _softmax_type(normalizer: Any) -> bool:
    return isinstance(normalizer, Normalizer) and normalizer.softmax_type


# ---------------------------------------------------------------------------------------------- JAX programs


def attention_fn(config: Config, case: str, implementation: str) -> Callable[..., jax.Array]:
    """f(q, k, v) -> out [B, n, N, H] for one attnlab or jax.nn case."""
    if case == JAX_NN:
        return functools.partial(jax.nn.dot_product_attention, is_causal=config.causal, implementation=implementation)
    return functools.partial(
        dot_product_attention,
        normalizer=_spec(config, case).build(),
        is_causal=config.causal,
        implementation=implementation,
    )


def program(forward: Callable[..., jax.Array], mode: str) -> Callable[..., Any]:
    """f(q, k, v, cotangent): the output ("forward") or the gradients of sum(out * cotangent) ("forward+backward")."""
    if mode == "forward":
        return lambda q, k, v, cotangent: forward(q, k, v)

    def loss(q, k, v, cotangent):
        return jnp.sum(forward(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def inputs(config: Config, n: int) -> tuple[jax.Array, ...]:
    """q, k, v and the output cotangent, [batch, n, heads, head_dim] ~ N(0, 1) in config.dtype."""
    shape = (config.batch, n, config.heads, config.head_dim)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), n), 4)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(config.dtype) for key in keys)


def compile_program(config: Config, case: str, implementation: str, n: int, mode: str, args=None):
    """The point's program compiled ahead of time, and the seconds that took."""
    args = inputs(config, n) if args is None else args
    fn = jax.jit(program(attention_fn(config, case, implementation), mode))
    started = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - started


COMPILED_BUFFERS = ("temp", "argument", "output", "alias", "generated_code")


def compiled_memory(compiled: Any) -> dict[str, int | None]:
    """Bytes of the compiled program's buffers (XLA buffer assignment); None where not reported."""
    try:
        stats = None if compiled is None else compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        stats = None
    out: dict[str, int | None] = {
        f"compiled_{name}_bytes": None if stats is None else int(getattr(stats, f"{name}_size_in_bytes", 0))
        for name in COMPILED_BUFFERS
    }
    if stats is not None:
        # Aliased outputs reuse argument buffers: count them once.
        out["compiled_total_bytes"] = (
            out["compiled_argument_bytes"] + out["compiled_output_bytes"] - out["compiled_alias_bytes"]
        ) + out["compiled_temp_bytes"]
    else:
        out["compiled_total_bytes"] = None
    return out


@functools.lru_cache(maxsize=4)
def _reference(config: Config, name: str, params: tuple, n: int) -> dict[str, tuple[np.ndarray, ...]]:
    """attnlab's dense results for the normalizer `name`(**params) in float32 at the highest matmul
    precision, per mode: the output, and the gradients of sum(out * cotangent) (one program for both)."""
    q, k, v, cotangent = (x.astype(jnp.float32) for x in inputs(config, n))
    forward = functools.partial(
        dot_product_attention,
        normalizer=NormalizerSpec(name, params).build(),
        is_causal=config.causal,
        implementation="dense",
    )

    with jax.default_matmul_precision("highest"):
        out, grads = value_and_pullback(forward)(q, k, v, cotangent)
    return {"forward": to_numpy(out), "forward+backward": to_numpy(grads)}


def value_and_pullback(forward: Callable[..., jax.Array]) -> Callable[..., Any]:
    """jit of (q, k, v, cotangent) -> (out, (dq, dk, dv)): forward's output and the gradients of
    sum(out * cotangent), in one program."""

    def both(q, k, v, cotangent):
        out, pullback = jax.vjp(forward, q, k, v)
        return out, pullback(cotangent.astype(out.dtype))

    return jax.jit(both)


def to_numpy(result: Any) -> tuple[np.ndarray, ...]:
    """An array, or a tuple of them, as a tuple of float64 numpy arrays."""
    parts = result if isinstance(result, (tuple, list)) else (result,)
    return tuple(np.asarray(part.astype(jnp.float32), np.float64) for part in parts)


def max_abs_error(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> float:
    """max |a - b| over every entry of every array of the two results."""
    return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b, strict=True)))


# ---------------------------------------------------------------------------------------------- peers


def peer_inputs(config: Config, n: int) -> dict[str, Any]:
    """`inputs(config, n)` as torch tensors [B, N, n, H] (the same numbers), on the GPU when JAX
    and torch both have one, and `sync`, which waits for that device."""
    import torch

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, config.dtype)

    def convert(x: jax.Array) -> Any:
        # numpy has no bfloat16: go through float32, then cast in torch
        host = np.array(np.asarray(x.astype(jnp.float32)).transpose(0, 2, 1, 3), order="C")  # a writable copy
        return torch.from_numpy(host).to(device=device, dtype=dtype)

    q, k, v, cotangent = (convert(x) for x in inputs(config, n))
    return {"q": q, "k": k, "v": v, "cotangent": cotangent, "sync": torch.cuda.synchronize if on_gpu else None}


def peer_forward(config: Config, case: str, peer: str) -> Callable[..., Any]:
    """f(q, k, v) -> out [B, N, n, H] in torch: SDPA; AdaSplash's kernel (it scales by 1/sqrt(H) too);
    or the entmax library on the full scores s = q k^T / sqrt(H) (-inf above the diagonal when
    causal), out = mapping(s) @ v."""
    import torch

    if peer == "torch_sdpa":
        return functools.partial(torch.nn.functional.scaled_dot_product_attention, is_causal=config.causal)
    alpha = static_entmax_alpha(_spec(config, case).build())
    if peer == "adasplash":
        import adasplash

        return functools.partial(adasplash.adasplash, alpha=alpha, is_causal=config.causal)
    import entmax

    mapping = {2.0: entmax.sparsemax, 1.5: entmax.entmax15}.get(
        alpha, functools.partial(entmax.entmax_bisect, alpha=alpha)
    )
    scale = 1.0 / math.sqrt(config.head_dim)

    def attend(q, k, v):
        scores = q @ k.transpose(-1, -2) * scale
        if config.causal:
            n = scores.shape[-1]
            upper = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(upper, float("-inf"))
        return mapping(scores, dim=-1) @ v

    return attend


def peer_call(config: Config, case: str, peer: str, n: int, mode: str) -> Callable[[], tuple[Any, ...]]:
    """A function of no arguments that runs the peer once on the point's inputs, waits for it, and
    returns the output (forward) or the gradients of sum(out * cotangent) wrt q, k, v."""
    import torch

    t = peer_inputs(config, n)
    forward = peer_forward(config, case, peer)

    def wait(result):
        if t["sync"] is not None:
            t["sync"]()
        return result

    if mode == "forward":

        def call():
            with torch.inference_mode():
                return wait((forward(t["q"], t["k"], t["v"]),))

        return call
    leaves = [t[name].detach().requires_grad_() for name in ("q", "k", "v")]

    def call_with_grads():
        out = forward(*leaves)
        return wait(tuple(torch.autograd.grad(out, leaves, grad_outputs=t["cotangent"])))

    return call_with_grads


def peer_numpy(result: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    """A peer's tensors [B, N, n, H] as float64 numpy [B, n, N, H]."""
    return tuple(np.asarray(p.detach().float().cpu().numpy(), np.float64).transpose(0, 2, 1, 3) for p in result)


@functools.lru_cache(maxsize=4)
def _peer_result(config: Config, case: str, peer: str, n: int, mode: str) -> tuple[np.ndarray, ...]:
    """The peer's result on the point's inputs (one untimed call), for max_abs_error_vs_peer."""
    return peer_numpy(peer_call(config, case, peer, n, mode)())


def peer_of(config: Config, case: str, n: int) -> str | None:
    """The first peer of `config.peers` that computes the normalizer of `case` and runs at n here."""
    normalizer = _reference_spec(config, case).build()
    backend = jax.default_backend()
    return next(
        (
            peer
            for peer in config.peers
            if peer_takes(peer, normalizer) and skip_reason(config, case, peer, n, backend) is None
        ),
        None,
    )


# Within one process: (peer, its normalizer, mode, setting) -> (n, seconds) of a single call that
# took longer than slow_s, so the peer is not run at longer n (see Config.slow_s).
_SLOW_PEER_CALLS: dict[tuple, tuple[int, float]] = {}


def _slow_key(config: Config, case: str, peer: str, mode: str) -> tuple:
    spec = _spec(config, case)
    setting = (config.batch, config.heads, config.head_dim, config.dtype, config.causal, config.slow_s)
    return (peer, spec.name, spec.params, mode, setting)


# ---------------------------------------------------------------------------------------------- timing


def time_calls(call: Callable[[], Any], reps: int, budget_s: float, slow_s: float | None = None) -> dict[str, Any]:
    """One untimed first call, then up to `reps` timed calls (stopping once their sum passes budget_s).

    With `slow_s`: a first call slower than that is not repeated; it is the one measurement (for
    eager calls, whose first call compiles nothing).
    """
    started = time.perf_counter()
    result = jax.block_until_ready(call())
    first = time.perf_counter() - started
    times: list[float] = []
    note = None
    if slow_s is not None and first > slow_s:
        times, note = [first], f"one call only: it took {first:.1f} s > slow_s = {slow_s:g} s"
    while not note and len(times) < reps and (not times or sum(times) < budget_s):
        started = time.perf_counter()
        result = jax.block_until_ready(call())
        times.append(time.perf_counter() - started)
    return {
        "first_call_seconds": first,
        "median_seconds": statistics.median(times),
        "min_seconds": min(times),
        "times_seconds": [round(t, 6) for t in times],
        "reps": len(times),
        "note": note,
        "result": result,
    }


def _failure(err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:300]}"


def _identity(config: Config, case: str, implementation: str) -> dict[str, Any]:
    """What every record of a case says about it: its library, normalizer and device."""
    library = PEER_LIBRARY.get(implementation) or ("jax.nn" if case == JAX_NN else "attnlab")
    return {
        "library": library,
        "normalizer": _reference_spec(config, case).name,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
    }


def run_point(config: Config, point: dict[str, Any]) -> list[dict[str, Any]]:
    """The one record of a point: a timing ({"measure": "time"}) or a peak memory ({"measure": "memory"})."""
    if point.get("measure", "time") == "memory":
        return [memory_record(config, point)]
    return [time_record(config, point)]


def time_record(config: Config, point: dict[str, Any]) -> dict[str, Any]:
    """Time one case at one n and mode (see the module docstring for the fields)."""
    case, implementation, n, mode = point["case"], point["implementation"], int(point["n"]), point["mode"]
    record = _identity(config, case, implementation)
    reason = skip_reason(config, case, implementation, n, record["backend"])
    if reason is None and implementation in PEERS:
        slow = _SLOW_PEER_CALLS.get(_slow_key(config, case, implementation, mode))
        if slow is not None and slow[0] < n:
            reason = f"a single call at n={slow[0]} took {slow[1]:.1f} s > slow_s = {config.slow_s:g} s"
    if reason is not None:
        return {**record, "skipped": reason}
    if implementation in PEERS:
        return {**record, **_time_peer(config, case, implementation, n, mode)}
    return {**record, **_time_jax(config, case, implementation, n, mode)}


def _time_jax(config: Config, case: str, implementation: str, n: int, mode: str) -> dict[str, Any]:
    args = inputs(config, n)
    try:
        compiled, compile_seconds = compile_program(config, case, implementation, n, mode, args)
        timing = time_calls(lambda: compiled(*args), config.reps, config.rep_budget_s)
    except Exception as err:
        # A fused kernel may not support this backend, shape or dtype, and any path may run out of
        # device memory: record why and go on with the sweep. Anything else is a bug: raise it.
        if implementation in ("cudnn", "pallas") or "RESOURCE_EXHAUSTED" in str(err):
            return {"error": _failure(err)}
        raise
    measured = to_numpy(timing.pop("result"))
    record = _timing_fields(config, n, mode, timing, compile_seconds) | compiled_memory(compiled)
    record |= _exactness(config, case, n, mode, measured)
    if implementation == "pallas":
        record |= key_block_sparsity(config, case, args)
    return record | _against_peer(config, case, n, mode, measured)


def key_block_sparsity(config: Config, case: str, args: tuple[jax.Array, ...]) -> dict[str, Any]:
    """For the Pallas entmax kernel on a map without a scale policy: the key blocks in reach of the
    causal mask (`key_blocks_reachable`) and those the p @ v pass visited (`key_blocks_with_weight`),
    summed over batch, heads and query blocks, and `empty_key_block_fraction` = 1 - their ratio:
    the share of the work the kernel skipped. Empty for other cases."""
    normalizer = _spec(config, case).build()
    alpha = static_entmax_alpha(normalizer)
    if alpha is None or normalizer.scale is not None:
        return {}
    from attnlab.attention.pallas_sparse import sparse_attention_block_counts

    q, k, v = args[:3]
    _, counts = sparse_attention_block_counts(
        q * (1.0 / math.sqrt(config.head_dim)), k, v, alpha=alpha, is_causal=config.causal
    )
    reachable, visited = (int(jnp.sum(counts[name])) for name in ("reachable", "output"))
    return {
        "key_blocks_reachable": reachable,
        "key_blocks_with_weight": visited,
        "empty_key_block_fraction": 1.0 - visited / reachable if reachable else None,
    }


def _against_peer(config: Config, case: str, n: int, mode: str, measured: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """max_abs_error_vs_peer against the case's peer at n <= exact_max_n (None without one); a
    peer that fails here is named under peer_error and leaves the timing as it is."""
    peer = peer_of(config, case, n) if n <= config.exact_max_n else None
    if peer is None:
        return {"peer": None, "max_abs_error_vs_peer": None}
    try:
        reference = _peer_result(config, case, peer, n, mode)
    except Exception as err:
        return {"peer": peer, "max_abs_error_vs_peer": None, "peer_error": _failure(err)}
    return {"peer": peer, "max_abs_error_vs_peer": max_abs_error(measured, reference)}


def _time_peer(config: Config, case: str, peer: str, n: int, mode: str) -> dict[str, Any]:
    import torch

    gc.collect()
    try:
        timing = time_calls(peer_call(config, case, peer, n, mode), config.reps, config.rep_budget_s, config.slow_s)
    except Exception as err:  # a peer's failure (out of memory, an unsupported dtype) is its own
        return {"error": _failure(err)}
    finally:
        gc.collect()
        time.sleep(SETTLE_S)
    if timing["note"] is not None:
        _SLOW_PEER_CALLS.setdefault(_slow_key(config, case, peer, mode), (n, timing["first_call_seconds"]))
    measured = peer_numpy(timing.pop("result"))
    record = _timing_fields(config, n, mode, timing, None) | compiled_memory(None)
    record |= _exactness(config, case, n, mode, measured)
    record.update(peer=None, max_abs_error_vs_peer=None, torch_threads=torch.get_num_threads())
    return record


def attention_flops(batch: int, heads: int, head_dim: int, n: int, causal: bool, mode: str) -> float:
    """The matmul work of self-attention over n tokens as FlashAttention's benchmarks count it:
    q k^T and p v are 2 n^2 head_dim each per batch row and head (half when causal); the backward
    adds 2.5x the forward's (dv, dp, dq, dk: four matmuls, and q k^T again)."""
    forward = 4.0 * batch * heads * n * n * head_dim / (2.0 if causal else 1.0)
    return forward * (3.5 if mode == "forward+backward" else 1.0)


def _timing_fields(
    config: Config, n: int, mode: str, timing: dict[str, Any], compile_seconds: float | None
) -> dict[str, Any]:
    tokens = config.batch * n
    flops = attention_flops(config.batch, config.heads, config.head_dim, n, config.causal, mode)
    out = {
        "compile_seconds": None if compile_seconds is None else round(compile_seconds, 6),
        "first_call_seconds": round(timing["first_call_seconds"], 6),
        "median_seconds": timing["median_seconds"],
        "min_seconds": timing["min_seconds"],
        "times_seconds": timing["times_seconds"],
        "reps": timing["reps"],
        "tokens_per_second": tokens / timing["median_seconds"],
        "tokens_per_second_best": tokens / timing["min_seconds"],
        "attention_flops": flops,
        "tflops_per_second": flops / timing["median_seconds"] / 1e12,
    }
    if timing.get("note"):
        out["note"] = timing["note"]
    return out


def _exactness(config: Config, case: str, n: int, mode: str, measured: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """max_abs_error against attnlab's dense float32 result at n <= exact_max_n (None beyond)."""
    if n > config.exact_max_n:
        return {"max_abs_error": None, "max_abs_reference": None, "error_reference": None}
    spec = _reference_spec(config, case)
    reference = _reference(config, spec.name, spec.params, n)[mode]
    return {
        "max_abs_error": max_abs_error(measured, reference),
        "max_abs_reference": float(max(np.max(np.abs(b)) for b in reference)),
        "error_reference": ERROR_REFERENCE,
    }


# ---------------------------------------------------------------------------------------------- memory


def _available_bytes(backend: str) -> int | None:
    """Memory a new process could use: the device's limit on GPU, MemAvailable on a CPU host."""
    if backend == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dense_need_bytes(config: Config, n: int, mode: str) -> int:
    """Estimated peak of a dense path: 3 (forward) or 6 (forward+backward) float32 [B, N, n, n]
    buffers (logits, mask, weights; and their cotangents)."""
    copies = 3 if mode == "forward" else 6
    return copies * config.batch * config.heads * n * n * 4


def memory_skip_reason(config: Config, case: str, implementation: str, n: int, mode: str) -> str | None:
    """Why a memory point does not run, or None: the timing reasons (dense paths capped at
    memory_dense_max_n), a peer, or a dense path whose n x n buffers would not fit."""
    backend = jax.default_backend()
    if implementation in PEERS:
        return "peak memory is measured for attnlab and jax.nn only"
    reason = skip_reason(config, case, implementation, n, backend, memory=True)
    if reason is None and _dense(case, implementation):
        need, available = dense_need_bytes(config, n, mode), _available_bytes(backend)
        if available is not None and need > 0.8 * available:
            gib = 1 << 30
            reason = (
                f"would need about {need / gib:.1f} GiB ({3 if mode == 'forward' else 6} x [B, N, n, n] float32), "
                f"{available / gib:.1f} GiB available"
            )
    return reason


def memory_command(config: Config, point: dict[str, Any]) -> tuple[list[str], str]:
    """The command measuring one memory point in a fresh process, and the request it reads on stdin
    (the config as JSON, which that process checks and rebuilds, and the point)."""
    return [sys.executable, "-m", MEMORY_MODULE], json.dumps({"config": to_json(config), "point": point})


def measure_in_subprocess(command: list[str], request: str, timeout_s: float) -> dict[str, Any]:
    """Run `command` with `request` on stdin and return the JSON object of its last output line;
    ValueError saying why when it fails."""
    root = str(Path(__file__).resolve().parents[2])  # so `-m attnlab...` imports this same attnlab
    # No persistent compilation cache in the measuring process: its peak must count compiling the
    # program, and a cache (JAX_COMPILATION_CACHE_DIR, JAX_PERSISTENT_CACHE_*) changes what it holds.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env = {**inherited, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run(command, input=request, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ValueError(f"stopped after memory_timeout_s = {timeout_s:g} s") from None
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        raise ValueError(f"exit code {done.returncode}{killed}: {tail[0][:300]}")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ValueError(f"no JSON result on the last output line: {done.stdout[-300:]!r}") from None


def memory_record(config: Config, point: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one case at one n and mode, measured in a fresh process."""
    case, implementation, n, mode = point["case"], point["implementation"], int(point["n"]), point["mode"]
    record = _identity(config, case, implementation)
    reason = memory_skip_reason(config, case, implementation, n, mode)
    if reason is not None:
        return {**record, "skipped": reason}
    try:
        measured = measure_in_subprocess(*memory_command(config, point), config.memory_timeout_s)
    except ValueError as err:
        return {**record, "error": str(err)}
    device = measured.get("device_peak_bytes")
    return {
        **record,
        "peak_bytes": device if device else measured["peak_rss_bytes"],
        "peak_metric": "device peak bytes in use" if device else "peak RSS of the process",
        **measured,
    }


KIND = Kind(
    name="throughput",
    description=(
        "attention tokens/s, compile time, compiled and peak memory vs n per normalizer and implementation, "
        "with jax.nn, torch SDPA, the entmax library and (GPU) AdaSplash as peers"
    ),
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={
        "normalizers": "case",
        "implementations": "implementation",
        "dense_normalizers": "case",
        "jax_nn": "implementation",
        "peers": "implementation",
        "lengths": "n",
        "modes": "mode",
        "memory_lengths": "n",
        "memory_modes": "mode",
        "memory_cases": "case",
    },
    figures="attnlab.figures.throughput",
)
