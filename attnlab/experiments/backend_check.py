"""Every attention backend against the dense reference on this device: values and gradients, per
normalizer, dtype and masking.

For each normalizer, backend (an `implementation=` name), dtype and causality, one call of
`attnlab.dot_product_attention` on q [batch, n, heads, head_dim] and k, v [batch, n, kv_heads,
head_dim] (grouped-query heads when kv_heads < heads), with key lengths [n, ceil(2n/3), ...] when
`ragged` (so padding is masked in every batch row but the first), is compared with attnlab's dense
path in float32 at the highest matmul precision on the same inputs (rounded to the point's dtype
first, so only the backend's own arithmetic is measured):

    max_abs_error_out   max |out - out_ref|
    max_abs_error_grad  max over q, k, v of |d/dx sum(out * cotangent) - its reference|
    max_abs_reference_out, max_abs_reference_grad
                        the largest |value| of each reference
    passed              both errors <= tolerance * max(1, max_abs_reference), with the dtype's tolerance

A float32 point runs its backend under `jax.default_matmul_precision("highest")`, so what it
measures is the algorithm, not TF32 rounding on a GPU (recorded as `matmul_precision`). Inputs
are N(0, 1) (q times `logit_scale`, which makes the sparse maps visibly sparse) from
fold_in(PRNGKey(seed), n). A backend that cannot serve the call records its reason under
`skipped`; one that fails to compile or run records the failure under `error` and `passed: false`.

This is the first step of the device script (benchmarks/gpu.sh): a fused kernel is picked by
`implementation=None` on a GPU only once its check passed there (attention.backends.VERIFIED_ON_GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import IMPLEMENTATIONS, dot_product_attention
from attnlab.experiments.checks import at_least, check, distinct, each, nonempty, one_of, positive, setting
from attnlab.experiments.kind import Kind
from attnlab.experiments.throughput import DTYPES, max_abs_error, to_numpy, value_and_pullback
from attnlab.normalizers import NormalizerSpec

REFERENCE = "attnlab dense, float32, highest matmul precision, on the same (dtype-rounded) inputs"


@dataclasses.dataclass(frozen=True)
class Config:
    """One check per (normalizer, backend, dtype, causal)."""

    normalizers: tuple[NormalizerSpec, ...] = (
        NormalizerSpec("softmax"),
        NormalizerSpec("ssmax"),
        NormalizerSpec("sparsemax"),
        NormalizerSpec("entmax15"),
        NormalizerSpec("entmax", (("alpha", 1.3),), "entmax α=1.3"),
        NormalizerSpec("softmax1"),
        NormalizerSpec("sigmoid"),
    )
    backends: tuple[str, ...] = setting(
        ("online", "blocked_entmax", "query_blocked", "pallas", "cudnn"),
        nonempty,
        each(one_of(IMPLEMENTATIONS)),
        distinct,
    )
    dtypes: tuple[str, ...] = setting(DTYPES, nonempty, each(one_of(DTYPES)), distinct)
    causal: tuple[bool, ...] = setting((True, False), nonempty, distinct)
    n: int = setting(256, at_least(1))
    batch: int = setting(2, at_least(1))
    heads: int = setting(4, at_least(1))
    kv_heads: int = setting(2, at_least(1))
    head_dim: int = setting(64, at_least(1))
    ragged: bool = True
    logit_scale: float = setting(2.0, positive)
    # Accepted error, relative to max(1, the reference's largest |value|), per dtype.
    tolerance_float32: float = setting(1e-5, positive)
    tolerance_bfloat16: float = setting(5e-2, positive)
    seed: int = setting(0, at_least(0))

    def relations(self) -> Iterator[str]:
        if self.heads % self.kv_heads:
            yield "{heads} must be a multiple of {kv_heads}"

    def __post_init__(self):
        check(self)


def points(config: Config) -> list[dict[str, Any]]:
    """One point per (normalizer, backend, dtype, causal), normalizer outermost."""
    return [
        {"normalizer": spec.label, "backend": backend, "dtype": dtype, "causal": causal}
        for spec in config.normalizers
        for backend in config.backends
        for dtype in config.dtypes
        for causal in config.causal
    ]


def inputs(config: Config, dtype: str) -> tuple[jax.Array, ...]:
    """q [B, n, N, H] (times logit_scale), k, v [B, n, K, H] and the cotangent [B, n, N, H], N(0, 1)
    in float32, rounded to `dtype` and back (so the reference sees what the backend sees)."""
    B, n, N, K, H = config.batch, config.n, config.heads, config.kv_heads, config.head_dim
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), n), 4)
    shapes = ((B, n, N, H), (B, n, K, H), (B, n, K, H), (B, n, N, H))
    q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes, strict=True))
    q = q * config.logit_scale
    return tuple(x.astype(dtype).astype(jnp.float32) for x in (q, k, v, cotangent))


def key_lengths(config: Config) -> jax.Array | None:
    """[n, ceil(2n/3), ceil(4n/9), ...] (at least 1) when ragged, else None."""
    if not config.ragged:
        return None
    return jnp.asarray([max(1, math.ceil(config.n * (2 / 3) ** b)) for b in range(config.batch)], jnp.int32)


def _attention(config: Config, normalizer: Any, implementation: str, causal: bool):
    return functools.partial(
        dot_product_attention,
        normalizer=normalizer,
        is_causal=causal,
        key_value_seq_lengths=key_lengths(config),
        implementation=implementation,
    )


@functools.lru_cache(maxsize=8)
def _reference(config: Config, label: str, dtype: str, causal: bool) -> tuple[tuple[np.ndarray, ...], ...]:
    """The dense output and gradients on the point's inputs, in float32 at the highest matmul precision."""
    spec = next(s for s in config.normalizers if s.label == label)
    with jax.default_matmul_precision("highest"):
        out, grads = value_and_pullback(_attention(config, spec.build(), "dense", causal))(*inputs(config, dtype))
    return to_numpy(out), to_numpy(grads)


def _cannot_serve(err: ValueError, implementation: str) -> bool:
    """Whether `err` is the dispatcher's "this backend cannot serve this call" (not a failure)."""
    return str(err).startswith(f"implementation={implementation!r} cannot serve")


def run_point(config: Config, point: dict[str, Any]) -> list[dict[str, Any]]:
    """The one record of a point: the errors and `passed`, or `skipped` with the backend's reason,
    or `error` (a failure to compile or run) with `passed: false`."""
    label, implementation, dtype, causal = point["normalizer"], point["backend"], point["dtype"], point["causal"]
    spec = next(s for s in config.normalizers if s.label == label)
    record: dict[str, Any] = {
        "normalizer_name": spec.name,
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "reference": REFERENCE,
    }
    q, k, v, cotangent = inputs(config, dtype)
    args = (q.astype(dtype), k.astype(dtype), v.astype(dtype), cotangent)
    attention = _attention(config, spec.build(), implementation, causal)
    try:
        jax.eval_shape(attention, *args[:3])
    except ValueError as err:
        if _cannot_serve(err, implementation):
            return [{**record, "skipped": str(err)}]
        raise
    precision = "highest" if dtype == "float32" else "default"
    try:
        with jax.default_matmul_precision(precision):
            out, grads = jax.block_until_ready(value_and_pullback(attention)(*args))
    except Exception as err:  # a kernel that does not compile or run here: recorded, not fatal
        first_line = (str(err).strip().splitlines() or [""])[0]
        return [{**record, "error": f"{type(err).__name__}: {first_line[:300]}", "passed": False}]
    out_ref, grads_ref = _reference(config, label, dtype, causal)
    errors = {
        "out": max_abs_error(to_numpy(out), out_ref),
        "grad": max_abs_error(to_numpy(grads), grads_ref),
    }
    magnitudes = {
        part: float(max(np.max(np.abs(x)) for x in ref)) for part, ref in (("out", out_ref), ("grad", grads_ref))
    }
    tolerance = getattr(config, f"tolerance_{dtype}")
    finite = all(math.isfinite(e) for e in errors.values())
    passed = finite and all(errors[part] <= tolerance * max(1.0, magnitudes[part]) for part in errors)
    return [
        {
            **record,
            "matmul_precision": precision,
            "max_abs_error_out": errors["out"],
            "max_abs_error_grad": errors["grad"],
            "max_abs_reference_out": magnitudes["out"],
            "max_abs_reference_grad": magnitudes["grad"],
            "tolerance": tolerance,
            "passed": passed,
        }
    ]


KIND = Kind(
    name="backend_check",
    description="every attention backend's values and gradients against the dense float32 reference, on this device",
    config_type=Config,
    points=points,
    run_point=run_point,
    sweep_fields={"normalizers": "normalizer", "backends": "backend", "dtypes": "dtype", "causal": "causal"},
    figures="attnlab.figures.backend_check",
)
