"""Shared fixtures: the normalizer tests' jit caches (tests/normalizers/test_normalizers_*.py), and
`replace_run_point` and `watch_training` for the experiment tests.

Compilation dominates the cost of these tests, so they go through `normalize`, which jits each
(name, axis, static parameters) once per session; jit then re-traces only for a new shape or
dtype. Numeric parameters are traced arguments (so different values share one compilation),
except alpha = 1, 1.5 or 2, which stays a Python number: it selects the exact closed forms.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

# The suite runs in several processes (pytest -n): on a GPU, none may take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Compiling, not running, is most of this suite's time on a CPU (tiny shapes, hundreds of programs):
# with LLVM's cheapest code generation a program compiles about 2.5x faster (a quick distillation run:
# 52 s -> 19 s), and XLA's older loop emitters for fusions compile about 3x faster again than the
# MLIR fusion emitters (a tiny LM's training step: 0.73 -> 0.16 s). XLA's own passes (fusion,
# simplification) still run and the arithmetic is IEEE either way; only the machine code is less
# optimised. XLA also splits each program's code generation over threads by default: with every
# core already running a test process, one thread compiles faster (a set of six test files: 323 ->
# 291 s). The processes tests start inherit the setting. A caller's own choice in XLA_FLAGS wins.
_CHEAP_CODEGEN = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
_OPTIONAL = ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"]


def _xla_knows(flags: list[str]) -> bool:
    """Whether this jaxlib's XLA accepts all of `flags` (an unknown flag in XLA_FLAGS aborts the
    process, and a later XLA may drop one): asked once, of a child process, and remembered in the
    environment."""
    probed = "ATTNLAB_TESTS_XLA_KNOWS_" + "_".join(f.lstrip("-").split("=")[0].upper() for f in flags)
    if probed not in os.environ:
        probe = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices('cpu')"],
            env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
            capture_output=True,
        )
        os.environ[probed] = str(int(probe.returncode == 0))
    return os.environ[probed] == "1"


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # one probe for them all; only if one is unknown, one per flag
    known = _OPTIONAL if _xla_knows(_OPTIONAL) else [flag for flag in _OPTIONAL if _xla_knows([flag])]
    os.environ["XLA_FLAGS"] = " ".join(os.environ.get("XLA_FLAGS", "").split() + _CHEAP_CODEGEN + known)

# (the imports below come after XLA_FLAGS is set: jax reads it once, on its first use)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from attnlab import normalizers as N  # noqa: E402

# No persistent compilation cache: most of the suite's ten thousand programs are compiled once per
# process, so writing each to disk cost more than the few hits saved (the six files above: 271 s
# without one, 291 s with one, 280 s caching only programs that took 0.5 s to compile).


def _lowering_caches() -> list:
    """jax's caches of lowered programs (private, so looked up with care: a jax without them is left
    as it is). Each entry keeps an MLIR module and its own MLIR context alive, about 5 MB, for the
    last 2048 programs lowered; and creating a context, lowering and compiling all slow down while
    thousands of contexts live (jaxpr -> MLIR 8 -> 22 ms, backend compile 17 -> 25 ms per program)."""
    from jax._src import pjit
    from jax._src.interpreters import pxla

    caches = (getattr(pjit, "_pjit_lower", None), getattr(pxla, "_cached_lowering_to_hlo", None))
    return [cache for cache in caches if callable(getattr(cache, "cache_clear", None))]


_LOWERING_CACHES = _lowering_caches()  # looked up once per process


@pytest.fixture(autouse=True)
def _release_lowered_programs():
    """After each test, drop the lowered programs jax keeps, not the compiled ones: a jitted function
    called again with the same shapes runs its executable from jit's own cache (only a call jax
    dispatches in Python, one with host callbacks, lowers and compiles again in a later test). The
    normalizer, attention and docs tests in one process: 813 -> 631 s, peak memory 4.7 -> 2.8 GB."""
    yield
    for cache in _LOWERING_CACHES:
        cache.cache_clear()


# The slowest test files on a 2-core machine (pytest --durations), slowest first. With `-n 2 --dist
# loadfile` xdist hands each worker one whole file at a time, by default the files with the most
# tests first: these long files with few tests came last, and one worker ran them while the other
# stood idle. They start first instead; the many short files then even out the two workers' ends.
_SLOWEST_FILES = (
    "test_docs.py",
    "test_device_script.py",
    "experiments/test_experiment_throughput.py",
    "experiments/test_experiment_training.py",
    "attention/test_attention.py",
    "train/test_multiprocess.py",
    "train/test_train.py",
    "attention/test_attention_fast_paths.py",
    "attention/test_mask_functions.py",
    "attention/test_lowering.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order collected below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent

    first = {name: rank for rank, name in enumerate(_SLOWEST_FILES)}

    def rank(item) -> int:
        relative = item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""
        return first.get(relative, len(first))

    items.sort(key=rank)  # stable: every file keeps its own order, the other files theirs


_CLOSED_FORM_ALPHAS = (1, 1.5, 2)


def _is_static(key, value):
    if value is None or isinstance(value, (bool, str)):
        return True
    return key == "alpha" and isinstance(value, (int, float)) and value in _CLOSED_FORM_ALPHAS


@functools.cache
def _jitted(name, axis, static):
    def run(x, where, dynamic):
        return N.get(name, **dict(static), **dynamic)(x, axis=axis, where=where)

    return jax.jit(run)


def _normalize(name, logits, *, axis=-1, where=None, **params):
    """`attnlab.normalizers.get(name, **params)(logits, axis=axis, where=where)`, jit-cached.

    Parameters are traced, except None and a Python alpha of 1, 1.5 or 2 (closed forms).
    """
    static = tuple(sorted((k, v) for k, v in params.items() if _is_static(k, v)))
    dynamic = {k: v for k, v in params.items() if not _is_static(k, v)}
    return _jitted(name, axis, static)(logits, where, dynamic)


@pytest.fixture(scope="session")
def normalize():
    return _normalize


@functools.cache
def _value_and_grad_jit(name, params):
    norm = N.get(name, **dict(params))

    def run(x, where):
        p, vjp = jax.vjp(lambda x: norm(x, where=where), x)
        # weights depend on the column only, so rows can be compared across calls
        w = jnp.cos(1.0 + jnp.arange(x.shape[-1], dtype=p.dtype))
        (g,) = vjp(jnp.broadcast_to(w, p.shape))
        return p, g

    return jax.jit(run)


def _value_and_grad(config, x, where=None):
    """(p, d sum(w * p) / dx) as numpy for config = (name, ((param, value), ...)), jit-cached.

    `where` defaults to all True (one trace per shape); w_j = cos(1 + j) weights column j.
    """
    name, params = config
    x = jnp.asarray(x, jnp.float32)
    where = jnp.ones(x.shape, bool) if where is None else jnp.asarray(where)
    p, g = _value_and_grad_jit(name, params)(x, where)
    return np.asarray(p), np.asarray(g)


@pytest.fixture(scope="session")
def value_and_grad():
    return _value_and_grad


@pytest.fixture
def replace_run_point(monkeypatch):
    """replace_run_point(kind_name, fn): the registry's kind runs its points with fn for this test."""
    import dataclasses

    from attnlab import experiments

    def replace(kind_name, fn):
        kind = experiments.KINDS[kind_name]
        monkeypatch.setitem(experiments.KINDS, kind_name, dataclasses.replace(kind, run_point=fn))

    return replace


@pytest.fixture(scope="session")
def watch_training():
    """watch_training(calls) -> a stand-in for attnlab.experiments.lm.train_model that first appends
    to `calls`, per call, a dict of: name (the model's, as given), label (the attention
    normalizer's), output (the output normalizer's label), seed and seq_len (the training's),
    weights (the initial parameters' sum of squares) and inputs (the first two training batches'
    inputs); then it trains as the real one does, on the same batches."""
    import itertools

    from flax import nnx

    from attnlab.experiments import lm

    real = lm.train_model

    def factory(calls: list[dict]):
        def watched(model_setting, training, normalizer, batches, **keywords):
            first = list(itertools.islice(batches, 2))
            output = keywords.get("output", "softmax")
            initial = model_setting.build(normalizer, training.seed, output)
            params = jax.tree.leaves(nnx.state(initial, nnx.Param))
            calls.append(
                {
                    "name": keywords.get("name"),
                    "label": normalizer.label,
                    "output": getattr(output, "label", output),
                    "seed": training.seed,
                    "seq_len": training.seq_len,
                    "weights": float(sum(np.sum(np.square(np.asarray(p))) for p in params)),
                    "inputs": [batch.inputs for batch in first],
                }
            )
            return real(model_setting, training, normalizer, itertools.chain(first, batches), **keywords)

        return watched

    return factory
