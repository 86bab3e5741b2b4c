"""The backend table (attention.backends) and dot_product_attention's conformance with jax.nn's.

Selection is checked on `Options` alone (no computation). The conformance cases are jax.nn's
conventions: inputs without a batch axis, implementation="xla", return_residual, empty axes,
jax_debug_infs, what the backward keeps, argument errors, infinite logits and integer inputs.
Shapes are tiny and shared so that the compiled programs are few.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import normalizers
from attnlab.attention import AUTOMATIC, BACKENDS, IMPLEMENTATIONS, Options, backends, dot_product_attention
from attnlab.attention.backends import DENSE_MAX_ELEMENTS, pallas_kernel, select
from attnlab.normalizers import SOFTMAX, THRESHOLD, Description, Normalizer, Parameter, described
from attnlab.normalizers.mappings import entmax_rows, softmax_rows

B, T, S, N, K, H = 2, 6, 7, 4, 2, 8


def _inputs(seed=0, t=T, s=S):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (B, t, N, H))
    k = jax.random.normal(keys[1], (B, s, K, H))
    v = jax.random.normal(keys[2], (B, s, K, H))
    return q, k, v


def _mask(t=T, s=S):
    return jax.random.bernoulli(jax.random.PRNGKey(9), 0.6, (B, 1, t, s)).at[..., 0].set(True)


def _close(a, b, atol=2e-5, rtol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


# A softmax with a sink of its own and an entmax of fixed alpha, described from outside the package:
# the backends must run them from their family alone.
@described(
    Description(
        "sink_softmax", "sink softmax", "exp(z) / (exp(sink) + sum exp(z))", family=SOFTMAX,
        parameters=(Parameter("sink", 0.5, "the sink's logit"),), normalized=False, shift_invariant=False,
    )
)  # fmt: skip
class SinkSoftmax:
    sink: Any = 0.5

    def __call__(self, z, valid, align):
        sink = jnp.asarray(align(self.sink, "sink"), z.dtype)
        both = jnp.concatenate([jnp.broadcast_to(sink, (*z.shape[:-1], 1)), z], axis=-1)
        valid = jnp.concatenate([jnp.ones((*z.shape[:-1], 1), bool), valid], axis=-1)
        return jnp.where(jnp.any(valid[..., 1:], axis=-1, keepdims=True), softmax_rows(both, valid)[..., 1:], 0.0)


@described(Description("entmax125", "1.25-entmax", "alpha = 1.25", family=THRESHOLD, sparse=True))
class Entmax125:
    alpha = 1.25

    def __call__(self, z, valid, align):
        return entmax_rows(z, valid, 1.25)


def _options(**overrides) -> Options:
    base = dict(batch=B, queries=T, keys=S, heads=N, kv_heads=K, head_dim=H)
    return Options(**{**base, **overrides})


LARGE = {"queries": 4096, "keys": 4096}  # more than DENSE_MAX_ELEMENTS logits
GPU_HALF = {"platform": "gpu", "dtype": jnp.bfloat16}


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("softmax", {}, "dense"),
        ("softmax", {**LARGE, "weights": True}, "dense"),
        ("softmax", LARGE, "online"),
        ("softmax1", LARGE, "online"),
        ("sigmoid", LARGE, "online"),
        ("sparsemax", LARGE, "blocked_entmax"),
        ("logn_entmax15", LARGE, "blocked_entmax"),
        ("stablemax", LARGE, "query_blocked"),
        ("ssmax", {**LARGE, **GPU_HALF}, "cudnn"),
        ("softmax1", {**LARGE, **GPU_HALF}, "online"),  # cuDNN has no sink
        ("softmax", {**LARGE, "platform": "gpu"}, "online"),  # cuDNN takes half precision only
        ("softmax", {**LARGE, **GPU_HALF, "statistics": True}, "online"),
    ],
)
def test_automatic_order_takes_the_first_backend_that_serves_the_call(name, options, expected):
    assert _options(**LARGE).elements > DENSE_MAX_ELEMENTS
    assert select(None, normalizers.get(name), _options(**options)).name == expected


def test_the_table_and_its_names():
    assert set(AUTOMATIC) <= set(BACKENDS) == {"dense", "cudnn", "online", "blocked_entmax", "query_blocked", "pallas"}
    assert set(IMPLEMENTATIONS) == set(BACKENDS) | {"xla", "chunked"}
    options = _options()
    chunked = {
        "softmax": "online",
        "softmax1": "online",
        "sigmoid": "online",
        "sparsemax": "blocked_entmax",
        "entmax15": "blocked_entmax",
        "multimax": "query_blocked",
    }
    for name, backend in chunked.items():
        assert select("chunked", normalizers.get(name), options).name == backend, name
    per_head = normalizers.get("entmax", alpha=jnp.array([1.2, 1.4, 1.3, 1.5])[:, None, None])
    assert select("chunked", per_head, options).name == "query_blocked"
    assert select("chunked", lambda x, *, axis=-1, where=None: x, options).name == "query_blocked"
    assert select("chunked", Normalizer(SinkSoftmax()), options).name == "online"
    assert select("chunked", Normalizer(Entmax125()), options).name == "blocked_entmax"
    assert select("xla", normalizers.get("sparsemax"), options).name == "dense"


def test_a_backend_that_cannot_serve_the_call_says_why():
    sparsemax, softmax = normalizers.get("sparsemax"), normalizers.get("softmax")
    cases = [
        ("cudnn", sparsemax, {}, r"softmax-type normalizers only.*'sparsemax' \(family 'threshold'\)"),
        ("cudnn", softmax, {}, "cuDNN attention needs a GPU; the default backend is 'cpu'"),
        ("cudnn", softmax, {"platform": "gpu"}, "float16 or bfloat16 inputs; got float32"),
        ("pallas", normalizers.get("multimax"), {}, r"Pallas kernels run .*'multimax' \(family 'generic'\)"),
        ("pallas", sparsemax, {"mask": True, "statistics": True}, "does not support mask, statistics;"),
        ("pallas", sparsemax, {"residual": True}, "does not support return_residual"),
        ("online", sparsemax, {}, "online pass runs the 'softmax' family"),
        ("blocked_entmax", softmax, {}, "blocked entmax path runs the 'threshold' family"),
        ("chunked", softmax, {"weights": True}, "online: return_weights needs implementation='dense'"),
        ("dense", sparsemax, {"residual": True}, "return_residual is the log-sum-exp of softmax-type"),
    ]
    for implementation, normalizer, options, reason in cases:
        with pytest.raises(ValueError, match=f"implementation={implementation!r} cannot serve this call: .*{reason}"):
            select(implementation, normalizer, _options(**options))
    with pytest.raises(ValueError, match="no attention backend serves this call: dense: return_residual"):
        select(None, sparsemax, _options(residual=True))
    with pytest.raises(ValueError, match="implementation='flash'; accepted: None, 'dense', 'xla', 'chunked'"):
        select("flash", softmax, _options())


def test_pallas_kernels_are_picked_automatically_only_on_a_gpu_once_verified(monkeypatch):
    sparsemax, softmax1 = normalizers.get("sparsemax"), normalizers.get("softmax1")
    gpu = _options(**LARGE, platform="gpu")
    assert [pallas_kernel(normalizers.get(n)) for n in ("sparsemax", "softmax1", "sigmoid", "softmax", "multimax")] == [
        "entmax", "softmax", "elementwise", "softmax", None,
    ]  # fmt: skip
    assert select(None, sparsemax, gpu).name == "blocked_entmax"  # not yet verified on a GPU
    assert "not yet passed its backend check" in BACKENDS["pallas"].automatic(sparsemax, gpu)
    monkeypatch.setattr(backends, "VERIFIED_ON_GPU", frozenset({"entmax"}))
    assert select(None, sparsemax, gpu).name == "pallas"
    assert select(None, softmax1, gpu).name == "online"  # its kernel is not in the verified set
    assert select(None, sparsemax, _options(**LARGE)).name == "blocked_entmax"  # off GPU: never


def test_a_learned_per_head_sink_runs_on_the_online_pass_and_matches_dense():
    """sink_softmax with one traced sink per head: the online pass applies it after the pass (out times
    sigmoid(lse - sink)); values, statistics, the residual and the gradients of q, k, v and the sink
    equal dense, with a mask, key lengths (one row sees no key) and causality."""
    q, k, v = _inputs(seed=3)
    lengths = jnp.array([S, 0])
    run = functools.partial(
        dot_product_attention, q, k, v, mask=_mask(), is_causal=True, key_value_seq_lengths=lengths, key_block=3,
        query_block=4,
    )  # fmt: skip

    def both(sink):
        normalizer = normalizers.get("sink_softmax", sink=sink)
        options = _options(mask=True, is_causal=True, key_lengths=True)
        assert select("chunked", normalizer, options).name == "online"
        return [
            run(normalizer=normalizer, implementation=i, statistics=True, return_residual=True)
            for i in ("chunked", "dense")
        ]

    sink = jnp.linspace(-1.0, 1.5, N)[:, None, None]
    (out, residual, stats), (want_out, want_residual, want_stats) = jax.jit(both)(sink)
    _close(out, want_out)
    _close(
        jnp.where(jnp.isfinite(want_residual), residual, 0.0),
        jnp.where(jnp.isfinite(want_residual), want_residual, 0.0),
    )
    for name in ("max_weight", "entropy", "support_size"):
        _close(stats[name], want_stats[name])
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)  # batch row 1 sees no key

    def loss(q, k, v, sink, implementation):
        out = dot_product_attention(
            q, k, v, normalizer=normalizers.get("sink_softmax", sink=sink), mask=_mask(), is_causal=True,
            key_value_seq_lengths=lengths, key_block=3, query_block=4, implementation=implementation,
        )  # fmt: skip
        return jnp.sum(jnp.sin(out))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    got, want = grads(q, k, v, sink, "chunked"), grads(q, k, v, sink, "dense")
    for g, w in zip(got, want, strict=True):
        assert float(jnp.max(jnp.abs(w))) > 0
        _close(g, w, atol=1e-5)


def test_user_described_families_run_on_their_backends_and_match_dense():
    """A sink softmax (online pass from its sink) and a 1.25-entmax (blocked entmax) defined in this file;
    the dense path's closed-form derivative of a learned sink equals autodiff through the mapping."""
    q, k, v = _inputs(seed=1)
    mask = _mask()
    run = functools.partial(dot_product_attention, q, k, v, mask=mask, is_causal=True, key_block=3, query_block=4)

    def both(normalizer):
        return [run(normalizer=normalizer, implementation=i) for i in ("chunked", "dense")]

    for mapping in (SinkSoftmax(), Entmax125()):
        # bound, not an argument: its sink and alpha stay concrete under jit
        chunked, dense = jax.jit(functools.partial(both, Normalizer(mapping)))()
        _close(chunked, dense)

    def loss(sink, generic):
        norm = Normalizer(SinkSoftmax(sink))
        if generic:  # a plain callable: differentiated through the mapping itself
            norm = functools.partial(lambda n, x, *, axis=-1, where=None: n(x, axis=axis, where=where), norm)
        return jnp.sum(jnp.sin(run(normalizer=norm, implementation="dense")))

    sink = jnp.linspace(-1.0, 1.0, N)[:, None, None]
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got, want = grad(sink, False), grad(sink, True)
    assert float(jnp.max(jnp.abs(want))) > 0
    _close(got, want, atol=1e-5)


# Normalizers without learned parameters: their dense gradients are checked against jax.nn and the
# memory-efficient backends in test_attention.py.
@pytest.mark.parametrize("name", ["sigmoid (bias per head)", "entmax (alpha per head)", "ssmax (s per head)"])
def test_dense_closed_form_derivatives_equal_autodiff_in_both_modes(name):
    q, k, v = _inputs(seed=2)
    mask = _mask()
    per_head = jnp.linspace(0.2, 0.8, N)[:, None, None]
    make = {
        "sigmoid (bias per head)": lambda p: normalizers.get("sigmoid", bias=-4 * p),
        "entmax (alpha per head)": lambda p: normalizers.get("entmax", alpha=1.0 + p),
        "ssmax (s per head)": lambda p: normalizers.get("ssmax", s=p),
    }[name]

    def attend(q, param, generic):
        norm = make(param)
        if generic:
            norm = functools.partial(lambda n, x, *, axis=-1, where=None: n(x, axis=axis, where=where), norm)
        out = dot_product_attention(q, k, v, mask=mask, is_causal=True, normalizer=norm, implementation="dense")
        return jnp.sum(jnp.sin(out) * jnp.arange(H))

    @functools.partial(jax.jit, static_argnums=2)
    def derivatives(q, param, generic):
        grads = jax.grad(attend, argnums=(0, 1))(q, param, generic)
        tangent = jax.jvp(lambda q: attend(q, param, generic), (q,), (jnp.cos(q),))[1]
        return grads, tangent

    got, want = derivatives(q, per_head, False), derivatives(q, per_head, True)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["softmax", "ssmax", "entmax15", "sparsemax", "sigmoid"])
def test_dense_backward_keeps_at_most_two_logits_sized_arrays(name):
    """jax.nn keeps about four (the masked logits, the weights, the mask...); autodiff through the
    normalizer kept about ten. Ours: the weights, and for entmax p^(2 - alpha)."""
    s = 4 * H  # more keys than head_dim, so that only logits-sized arrays pass the size cut
    q, k, v = _inputs(seed=3, s=s)
    mask = _mask(s=s)
    size = B * N * T * s

    def saved(f):
        # traced, not run: the pullback's leaves are the arrays it keeps
        residuals = jax.eval_shape(lambda q, k, v: jax.tree.leaves(jax.vjp(f, q, k, v)[1]), q, k, v)
        return [x.shape for x in residuals if x.size >= size]

    ours = saved(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, normalizer=name, implementation="dense"))
    assert len(ours) <= (2 if name in ("entmax15", "sparsemax") else 1), ours
    kv = functools.partial(jnp.repeat, repeats=N // K, axis=2)
    assert len(saved(lambda q, k, v: jax.nn.dot_product_attention(q, kv(k), kv(v), mask=mask))) >= 3


def test_inputs_without_a_batch_axis_and_xla_as_dense():
    q, k, v = (x[0] for x in _inputs(seed=4))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert want.shape == (T, N, H)

    @jax.jit
    def outputs(q, k, v):
        run = functools.partial(dot_product_attention, q, k, v, is_causal=True, key_block=4)
        every = [run(implementation=implementation) for implementation in ("xla", "dense", "chunked")]
        return every, run(statistics=True, return_residual=True, return_weights=True)

    every, (out, residual, aux) = outputs(q, k, v)
    for out in every:
        assert out.shape == (T, N, H)
        _close(out, want)
    assert residual.shape == (T, N) and aux["weights"].shape == (N, T, S) and aux["entropy"].shape == (N, T)


def test_return_residual_is_jax_nn_log_sum_exp():
    q, k, v = _inputs(seed=5)
    lengths = jnp.array([S, 3], jnp.int32)
    options = dict(is_causal=True, key_value_seq_lengths=lengths, bias=0.3 * jnp.ones((1, N, 1, S)))
    kv = functools.partial(jnp.repeat, repeats=N // K, axis=2)
    want_out, want = jax.nn.dot_product_attention(q, kv(k), kv(v), return_residual=True, **options)
    # softmax1 adds its sink: log(1 + sum e^z); a query that sees nothing has log(e^0) = 0 (softmax: -inf)
    hidden = jnp.zeros((B, 1, T, S), bool).at[0].set(True)

    @functools.partial(jax.jit, static_argnums=3)
    def residuals(q, k, v, implementation):
        run = functools.partial(
            dot_product_attention, q, k, v, return_residual=True, implementation=implementation, key_block=4
        )
        return run(**options), run(mask=hidden)[1], run(mask=hidden, normalizer="softmax1")[1]

    for implementation in ("dense", "chunked"):
        (out, residual), plain, sink = residuals(q, k, v, implementation)
        assert residual.shape == (B, T, N)
        _close(out, want_out)
        _close(residual, want)
        assert np.all(np.isneginf(np.asarray(plain[1])))
        _close(sink[0], jnp.logaddexp(plain[0], 0.0))
        np.testing.assert_array_equal(np.asarray(sink[1]), 0.0)
    with pytest.raises(ValueError, match="return_residual is the log-sum-exp of softmax-type"):
        dot_product_attention(q, k, v, normalizer="sparsemax", return_residual=True)


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_empty_key_or_query_axis_gives_an_empty_safe_result(implementation):
    q, k, v = _inputs(seed=6)
    for name in ("softmax", "sparsemax", "stablemax"):
        run = functools.partial(dot_product_attention, normalizer=name, implementation=implementation)
        out, aux = run(q, k[:, :0], v[:, :0], statistics=True, mass_keys=jnp.zeros((B, 0), bool))
        assert out.shape == (B, T, N, H) and not np.any(np.asarray(out))
        assert set(aux) == {"max_weight", "entropy", "support_size", "key_mass"}
        assert all(x.shape == (B, N, T) and not np.any(np.asarray(x)) for x in aux.values())
        assert run(q[:, :0], k, v).shape == (B, 0, N, H)
    loss = lambda q: jnp.sum(dot_product_attention(q, k[:, :0], v[:, :0], implementation=implementation))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss))(q)), 0.0)


def test_dense_with_a_mask_raises_nothing_under_jax_debug_infs():
    q, k, v = _inputs(seed=7)
    mask = _mask()
    jax.config.update("jax_debug_infs", True)
    try:
        for name in ("softmax", "sparsemax"):
            out = dot_product_attention(q, k, v, mask=mask, normalizer=name, implementation="dense")
            assert np.all(np.isfinite(np.asarray(out)))
    finally:
        jax.config.update("jax_debug_infs", False)


def test_arguments_that_cannot_be_right_raise_value_errors():
    q, k, v = _inputs()
    cases = [
        ({"bias": jnp.zeros((B, N, T, S + 1))}, r"bias has shape \(2, 4, 6, 8\), which does not broadcast"),
        ({"bias": jnp.zeros((3, 1, 1, 1))}, "bias has shape"),
        ({"key_value_seq_lengths": jnp.array([S])}, r"key_value_seq_lengths must be integers of shape \[B\] = \(2,\)"),
        ({"query_seq_lengths": jnp.array([1.0, 2.0])}, "query_seq_lengths must be integers"),
        ({"mass_keys": jnp.ones((B, S - 1), bool)}, r"mass_keys has shape \(2, 6\), which does not broadcast"),
        ({"local_window_size": -1}, "local_window_size must be an int >= 0"),
        ({"local_window_size": (2, -1)}, "local_window_size must be an int >= 0"),
        ({"key_block": 0}, "key_block must be a positive int; got 0"),
        ({"query_block": -4}, "query_block must be None or a positive int; got -4"),
    ]
    for implementation in ("dense", "chunked"):
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                dot_product_attention(q, k, v, implementation=implementation, **kwargs)


def test_infinite_logits_give_what_dense_gives_on_every_backend():
    """q * 1e38 overflows some logits to +-inf: the row is cut to its +inf keys, -inf keys are hidden; the
    others are huge and finite. Every normalizing map then picks the best key(s), as dense does."""
    q, k, v = _inputs(seed=8)
    q = q * 1e38
    logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, N // K, H), k)
    assert np.any(np.isposinf(np.asarray(logits))) and np.any(np.isneginf(np.asarray(logits)))

    @functools.partial(jax.jit, static_argnums=3)
    def both(q, k, v, name):
        run = functools.partial(dot_product_attention, q, k, v, normalizer=name, key_block=3, query_block=4)
        return run(implementation="dense"), run(implementation="chunked")

    one_hot = None
    for name in ("softmax", "softmax1", "sparsemax", "entmax15", "sigmoid"):
        want, got = both(q, k, v, name)
        assert np.all(np.isfinite(np.asarray(want))), name
        _close(got, want, atol=1e-6)
        if name in ("softmax", "sparsemax", "entmax15"):  # normalised (softmax1's sink, sigmoid: not)
            one_hot = want if one_hot is None else one_hot
            _close(want, one_hot, atol=1e-6)
    loss = lambda q: jnp.sum(dot_product_attention(q, k, v, implementation="chunked", key_block=3))  # noqa: E731
    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(loss))(q))))


def test_integer_and_boolean_inputs_are_computed_as_float32():
    q, k, v = (jnp.round(2 * x) for x in _inputs(seed=9))
    want = dot_product_attention(q, k, v)
    for dtype in (jnp.int32, jnp.int8):
        out = dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))
        assert out.dtype == jnp.float32
        _close(out, want)
    out = dot_product_attention(q > 0, k > 0, v > 0)
    assert out.dtype == jnp.float32
    _close(out, dot_product_attention(*(jnp.float32(x > 0) for x in (q, k, v))))
