"""Attention throughput and compiled memory vs sequence length n, per normalizer and implementation.

Setting: self-attention q, k, v [batch, n, heads, head_dim] in `dtype`, causal or not, drawn
from N(0, 1) with jax.random (key fold_in(PRNGKey(seed), n)), together with an output cotangent.
Each case is timed in the requested modes:

  "forward"           out = attention(q, k, v);
  "forward+backward"  the gradients of sum(out * cotangent) with respect to q, k and v.

Cases: each normalizer through `attnlab.dot_product_attention(implementation=...)` for each
of `implementations` ("dense", "chunked", "pallas", "cudnn"), and the softmax baseline
`jax.nn.dot_product_attention(implementation=...)` for each of `jax_nn` ("xla", "cudnn"), all in
one sweep. A combination the backend or the normalizer does not support (cuDNN off GPU or in
float32, Pallas off GPU unless `pallas_interpret`, cuDNN for a sparse map, Pallas for softmax) is
recorded with a `skipped` reason, as are the dense paths (attnlab "dense", jax.nn "xla") beyond
`dense_max_n`, whose memory grows as n². A fused kernel that fails to compile or run here
(cuDNN, Pallas) and any out-of-memory failure are recorded under `error` instead of stopping the
sweep.

Measured per point (one jitted program, compiled ahead of time):
  compile_seconds      tracing, lowering and compiling (`jit(f).lower(...).compile()`), apart from
                       run time;
  first_call_seconds   the first execution (allocation, autotuning on GPU), not in the statistics;
  median_seconds, min_seconds, times_seconds
                       `reps` further calls, each waited for with block_until_ready (repetitions stop
                       early once their sum passes `rep_budget_s`; `reps` records how many ran);
  tokens_per_second    batch * n / median_seconds (and tokens_per_second_best from min_seconds);
  compiled_*_bytes     XLA's buffer assignment of the compiled program (`compiled.memory_analysis()`):
                       arguments, outputs, and temporaries (every intermediate buffer the program
                       allocates: the n x n logits of a dense path, one block's worth for a chunked
                       one). Deterministic and available on CPU and GPU alike; it is what the program
                       asks for, not a measured high-water mark of the device allocator (which cannot
                       be reset between points), and it excludes the runtime's own overheads;
  max_abs_error        at n <= `exact_max_n`, against attnlab's dense path in float32 at the highest
                       matmul precision on the same inputs (the output in forward mode, the three
                       gradients in forward+backward mode), with max_abs_reference the largest
                       |value| of that reference, so a fast path is checked in the same run.

Timings on a shared machine are noisy: compare cases measured in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import IMPLEMENTATIONS, dot_product_attention
from attnlab.attention.api import static_entmax_alpha
from attnlab.experiments.config import Lengths, NormalizerSpec
from attnlab.normalizers import Normalizer, Softmax

KIND = "throughput"
DESCRIPTION = "attention tokens/s, compile time and compiled memory vs n per normalizer and implementation, and jax.nn"

MODES = ("forward", "forward+backward")
JAX_NN = "jax.nn"  # the case label of the jax.nn.dot_product_attention baseline
JAX_NN_IMPLEMENTATIONS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16")
ERROR_REFERENCE = "attnlab dense, float32, highest matmul precision"


@dataclasses.dataclass(frozen=True)
class Config:
    """Sweep of n for each (normalizer, implementation) and each jax.nn implementation."""

    normalizers: tuple[NormalizerSpec, ...] = (
        NormalizerSpec("softmax"),
        NormalizerSpec("ssmax"),
        NormalizerSpec("sparsemax"),
        NormalizerSpec("entmax15"),
    )
    implementations: tuple[str, ...] = ("dense", "chunked")
    # Labels of the normalizers also timed with implementation="dense"; empty: every normalizer.
    dense_normalizers: tuple[str, ...] = ()
    jax_nn: tuple[str, ...] = JAX_NN_IMPLEMENTATIONS
    lengths: Lengths = dataclasses.field(default_factory=lambda: Lengths((256, 512, 1024, 2048, 4096)))
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = True
    modes: tuple[str, ...] = MODES
    reps: int = 5
    # Timed repetitions stop once their sum passes this many seconds (one always runs).
    rep_budget_s: float = 30.0
    # Longest n for the paths that hold n x n logits: attnlab "dense" and jax.nn "xla".
    dense_max_n: int = 4096
    # Check against dense float32 at n <= this (0: never).
    exact_max_n: int = 1024
    # Time the Pallas kernel off GPU too, in the Pallas interpreter (slow; a correctness run, not a timing).
    pallas_interpret: bool = False
    seed: int = 0

    def __post_init__(self):
        for name, values, accepted in (
            ("implementations", self.implementations, IMPLEMENTATIONS),
            ("jax_nn", self.jax_nn, JAX_NN_IMPLEMENTATIONS),
            ("modes", self.modes, MODES),
        ):
            for value in values:
                if value not in accepted:
                    raise ValueError(f"{name}: {value!r} is not accepted; accepted: {', '.join(accepted)}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value; got {list(values)}")
        if not self.modes:
            raise ValueError(f"modes must name at least one of {', '.join(MODES)}; got []")
        if not self.implementations and not self.jax_nn:
            raise ValueError("implementations and jax_nn are both empty: nothing to time")
        labels = [spec.label for spec in self.normalizers]
        if JAX_NN in labels:
            raise ValueError(f"normalizers: the label {JAX_NN!r} is reserved for the jax.nn baseline")
        unknown = [label for label in self.dense_normalizers if label not in labels]
        if unknown:
            raise ValueError(f"dense_normalizers: {unknown} are not normalizer labels; accepted: {', '.join(labels)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not accepted; accepted: {', '.join(DTYPES)}")
        for name in ("batch", "heads", "head_dim", "reps", "dense_max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)}")
        if self.exact_max_n < 0:
            raise ValueError(f"exact_max_n must be an integer >= 0 (0: no exactness check); got {self.exact_max_n}")
        if not self.rep_budget_s > 0:
            raise ValueError(f"rep_budget_s must be a number > 0 (seconds); got {self.rep_budget_s}")


def config_to_json(config: Config) -> dict[str, Any]:
    return {
        "normalizers": [spec.to_json() for spec in config.normalizers],
        "implementations": list(config.implementations),
        "dense_normalizers": list(config.dense_normalizers),
        "jax_nn": list(config.jax_nn),
        "lengths": list(config.lengths.values),
        "batch": config.batch,
        "heads": config.heads,
        "head_dim": config.head_dim,
        "dtype": config.dtype,
        "causal": config.causal,
        "modes": list(config.modes),
        "reps": config.reps,
        "rep_budget_s": config.rep_budget_s,
        "dense_max_n": config.dense_max_n,
        "exact_max_n": config.exact_max_n,
        "pallas_interpret": config.pallas_interpret,
        "seed": config.seed,
    }


def cases(config: Config) -> list[tuple[str, str]]:
    """(case, implementation) pairs in sweep order: each normalizer label, then the jax.nn baseline."""
    dense_for = set(config.dense_normalizers) or {spec.label for spec in config.normalizers}
    out = [
        (spec.label, implementation)
        for spec in config.normalizers
        for implementation in config.implementations
        if implementation != "dense" or spec.label in dense_for
    ]
    return out + [(JAX_NN, implementation) for implementation in config.jax_nn]


def points(config: Config) -> list[dict[str, Any]]:
    """One sweep point per (n, mode, case, implementation); n outermost so the references are reused."""
    return [
        {"case": case, "implementation": implementation, "n": n, "mode": mode}
        for n in config.lengths.values
        for mode in config.modes
        for case, implementation in cases(config)
    ]


def _spec(config: Config, case: str) -> NormalizerSpec:
    return next(spec for spec in config.normalizers if spec.label == case)


def skip_reason(config: Config, case: str, implementation: str, n: int, backend: str) -> str | None:
    """Why (case, implementation) does not run at n on `backend`, or None when it does."""
    if implementation == "cudnn":
        if backend != "gpu":
            return f"cuDNN attention needs a GPU backend; this one is {backend}"
        if config.dtype == "float32":
            return "cuDNN attention takes bfloat16 or float16, not float32 (set dtype = 'bfloat16')"
    if case != JAX_NN:
        normalizer = _spec(config, case).build()
        if implementation == "cudnn" and not _softmax_type(normalizer):
            return "cuDNN takes softmax-type normalizers only (softmax, scaled_softmax, ssmax)"
        if implementation == "pallas" and static_entmax_alpha(normalizer) is None:
            return "the Pallas kernel takes the entmax family with one alpha in (1, 2] only"
    if implementation == "pallas" and backend != "gpu" and not config.pallas_interpret:
        return f"Pallas compiles for GPU only; on {backend} it is interpreted, slowly (set pallas_interpret = true)"
    dense = implementation == "dense" or (case == JAX_NN and implementation == "xla")
    if dense and n > config.dense_max_n:
        return f"n > dense_max_n = {config.dense_max_n}: this path holds n x n logits"
    return None


def _softmax_type(normalizer: Any) -> bool:
    return isinstance(normalizer, Normalizer) and isinstance(normalizer.mapping, Softmax)


def attention_fn(config: Config, case: str, implementation: str) -> Callable[..., jax.Array]:
    """f(q, k, v) -> out [B, n, N, H] for one case."""
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


def compiled_memory(compiled: Any) -> dict[str, int | None]:
    """Bytes of the compiled program's buffers (XLA buffer assignment); None where not reported."""
    names = ("temp", "argument", "output", "alias", "generated_code")
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        stats = None
    out: dict[str, int | None] = {
        f"compiled_{name}_bytes": None if stats is None else int(getattr(stats, f"{name}_size_in_bytes", 0))
        for name in names
    }
    if stats is not None:
        # Aliased outputs reuse argument buffers: count them once.
        out["compiled_total_bytes"] = (
            out["compiled_argument_bytes"] + out["compiled_output_bytes"] - out["compiled_alias_bytes"]
        ) + out["compiled_temp_bytes"]
    else:
        out["compiled_total_bytes"] = None
    return out


def _reference_spec(config: Config, case: str) -> NormalizerSpec:
    return NormalizerSpec("softmax") if case == JAX_NN else _spec(config, case)


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

    def both(q, k, v, cotangent):
        out, pullback = jax.vjp(forward, q, k, v)
        return out, pullback(cotangent)

    with jax.default_matmul_precision("highest"):
        out, grads = jax.jit(both)(q, k, v, cotangent)
    return {"forward": _to_numpy(out), "forward+backward": _to_numpy(grads)}


def _to_numpy(result: Any) -> tuple[np.ndarray, ...]:
    parts = result if isinstance(result, (tuple, list)) else (result,)
    return tuple(np.asarray(part.astype(jnp.float32), np.float64) for part in parts)


def time_calls(call: Callable[[], Any], reps: int, budget_s: float) -> dict[str, Any]:
    """One untimed first call, then up to `reps` timed calls (stopping once their sum passes budget_s)."""
    started = time.perf_counter()
    result = jax.block_until_ready(call())
    first = time.perf_counter() - started
    times: list[float] = []
    while len(times) < reps and (not times or sum(times) < budget_s):
        started = time.perf_counter()
        result = jax.block_until_ready(call())
        times.append(time.perf_counter() - started)
    return {
        "first_call_seconds": first,
        "median_seconds": statistics.median(times),
        "min_seconds": min(times),
        "times_seconds": [round(t, 6) for t in times],
        "reps": len(times),
        "result": result,
    }


def _failure(err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:300]}"


def run_point(config: Config, point: dict[str, Any]) -> list[dict[str, Any]]:
    case, implementation, n, mode = point["case"], point["implementation"], int(point["n"]), point["mode"]
    backend = jax.default_backend()
    record: dict[str, Any] = {
        "library": "jax.nn" if case == JAX_NN else "attnlab",
        "normalizer": "softmax" if case == JAX_NN else _spec(config, case).name,
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
    }
    reason = skip_reason(config, case, implementation, n, backend)
    if reason is not None:
        return [{**record, "skipped": reason}]
    args = inputs(config, n)
    try:
        compiled, compile_seconds = compile_program(config, case, implementation, n, mode, args)
        timing = time_calls(lambda: compiled(*args), config.reps, config.rep_budget_s)
    except Exception as err:
        # A fused kernel may not support this backend, shape or dtype, and any path may run out of
        # device memory: record why and go on with the sweep. Anything else is a bug: raise it.
        if implementation in ("cudnn", "pallas") or "RESOURCE_EXHAUSTED" in str(err):
            return [{**record, "error": _failure(err)}]
        raise
    result = timing.pop("result")
    tokens = config.batch * n
    record.update(
        compile_seconds=round(compile_seconds, 6),
        first_call_seconds=round(timing.pop("first_call_seconds"), 6),
        median_seconds=timing["median_seconds"],
        min_seconds=timing["min_seconds"],
        times_seconds=timing["times_seconds"],
        reps=timing["reps"],
        tokens_per_second=tokens / timing["median_seconds"],
        tokens_per_second_best=tokens / timing["min_seconds"],
        **compiled_memory(compiled),
        max_abs_error=None,
        max_abs_reference=None,
        error_reference=None,
    )
    if n <= config.exact_max_n:
        spec = _reference_spec(config, case)
        reference = _reference(config, spec.name, spec.params, n)[mode]
        measured = _to_numpy(result)
        record.update(
            max_abs_error=float(max(np.max(np.abs(a - b)) for a, b in zip(measured, reference, strict=True))),
            max_abs_reference=float(max(np.max(np.abs(b)) for b in reference)),
            error_reference=ERROR_REFERENCE,
        )
    return [record]
