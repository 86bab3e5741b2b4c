"""The field since SSMax: Llama 4's and Qwen's length scaling, critical log-n scaling, ASEntmax, a
learned attention sink and stick-breaking attention.

Values and gradients against direct float64 implementations of the published formulas (numpy, row
by row, masked entries dropped), the Llama 4 and Qwen factors at known positions, stick-breaking's
masking (a hidden key is a removed key), dense and chunked attention agreeing, and a learned sink
getting gradients in an attention layer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import normalizers as N
from attnlab.attention import dot_product_attention
from attnlab.attention.backends import Options, select
from attnlab.nn import MultiHeadAttention, NormalizerSpec
from attnlab.normalizers.recent import sum_after

NEW_NAMES = (
    "llama4_softmax",
    "llama4_entmax15",
    "qwen_softmax",
    "critical_softmax",
    "asentmax",
    "sink_softmax",
    "stick_breaking",
)

# Logits [heads = 2, rows = 3, n = 6] and a mask: per-head parameters are [2, 1, 1]. Rows see 6, 5,
# 3, 2, 4 and 0 (an empty row) valid entries, so every length-dependent factor differs per row.
X = np.array(
    [
        [[0.55, -1.1, 2.05, 0.3, 1.15, -0.4], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-2.1, 0.7, 0.2, 1.9, -0.15, 0.8]],
        [[-3.0, -0.65, -0.3, -1.2, -2.2, -0.9], [0.4, -0.2, 1.3, 0.9, -1.4, 0.1], [2.2, 1.1, -0.6, 0.05, 0.75, -1.3]],
    ]
)  # fmt: skip
MASK = np.array(
    [
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1], [1, 0, 1, 0, 0, 1]],
        [[0, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]],
    ],
    bool,
)
HEADS = (2, 1, 1)


# ------------------------------------------------------------------------------- direct formulas


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _entmax(z, alpha):
    """alpha-entmax by bisection on tau (float64, 200 halvings of the bracket)."""
    u = (alpha - 1.0) * (z - z.max())
    low, high = -1.0, -(float(z.size) ** (1.0 - alpha))
    for _ in range(200):
        tau = 0.5 * (low + high)
        if (np.maximum(u - tau, 0.0) ** (1.0 / (alpha - 1.0))).sum() > 1.0:
            low = tau
        else:
            high = tau
    p = np.maximum(u - 0.5 * (low + high), 0.0) ** (1.0 / (alpha - 1.0))
    return p / p.sum()


def _stick_breaking(z):
    """w_j = beta_j prod_{k > j} (1 - beta_k), beta = sigmoid(z), as a product (not in log space)."""
    beta = 1.0 / (1.0 + np.exp(-z))
    return np.array([beta[j] * np.prod(1.0 - beta[j + 1 :]) for j in range(z.size)])


def _factor(name, n, p):
    if name.startswith("llama4"):
        return 1.0 + p["attn_scale"] * math.log(math.floor(n / p["floor_scale"]) + 1)
    if name == "qwen_softmax":
        return max(1.0, math.log(n) / math.log(p["seq_length"]))
    if name == "critical_softmax":
        return p["gamma"] * math.log(n)
    if name == "asentmax":
        return p.get("delta", 1.0) + p["beta"] * math.log(n + 1) ** p["gamma"]
    return 1.0


def _mapping(name, z, p):
    if name == "llama4_entmax15":
        return _entmax(z, 1.5)
    if name == "asentmax":
        return _entmax(z, p.get("alpha", 1.5))
    if name == "stick_breaking":
        return _stick_breaking(z)
    if name == "sink_softmax":
        return np.exp(z) / (np.exp(p["sink"]) + np.exp(z).sum())
    return _softmax(z)


def _reference(name, x, params):
    """The normalizer `name` on logits [2, rows, n] (rows of head h take parameter entry h), float64."""
    out = np.zeros(x.shape)
    for h, r in np.ndindex(*x.shape[:2]):
        keep = MASK[h, r]
        if keep.any():
            p = {k: float(np.ravel(v)[h] if np.ndim(v) else v) for k, v in params.items()}
            out[h, r, keep] = _mapping(name, _factor(name, int(keep.sum()), p) * x[h, r, keep], p)
    return out


# (name, parameters, the parameters differentiated); per-head values are [2, 1, 1]
CONFIGS = [
    ("llama4_softmax", {"attn_scale": 0.3, "floor_scale": 2.0}, ("attn_scale",)),
    ("llama4_entmax15", {"attn_scale": np.array([0.5, 0.2]).reshape(HEADS), "floor_scale": 3.0}, ("attn_scale",)),
    ("qwen_softmax", {"seq_length": 2.5}, ()),
    ("critical_softmax", {"gamma": np.array([0.8, 1.6]).reshape(HEADS)}, ("gamma",)),
    (
        "asentmax",
        {"delta": 0.5, "beta": np.array([0.8, 0.3]).reshape(HEADS), "gamma": np.array([1.5, -0.5]).reshape(HEADS)},
        ("delta", "beta", "gamma"),
    ),
    ("asentmax", {"alpha": 1.3, "beta": 0.7, "gamma": 1.0}, ("beta",)),
    ("sink_softmax", {"sink": np.array([-0.5, 1.5]).reshape(HEADS)}, ("sink",)),
    ("stick_breaking", {}, ()),
]


@pytest.mark.parametrize(("name", "params", "differentiated"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_values_and_gradients_match_the_published_formulas(name, params, differentiated):
    """float64: values to 1e-12; d/dlogits (one random direction) and d/dparameter against central
    differences of the direct formula."""
    with jax.enable_x64(True):
        fixed = {k: v for k, v in params.items() if k not in differentiated}
        weights = np.cos(1.0 + np.arange(X.size)).reshape(X.shape)

        def loss(x, values):
            p = N.get(name, **fixed, **values)(x, where=MASK)
            return jnp.sum(p * weights), p

        values = {k: jnp.asarray(params[k], jnp.float64) for k in differentiated}
        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, p), (dx, dvalues) = value_and_grad(jnp.asarray(X), values)
        np.testing.assert_allclose(p, _reference(name, X, params), rtol=1e-12, atol=1e-14)
        assert np.all(np.asarray(p)[~MASK] == 0) and np.all(np.asarray(dx)[~MASK] == 0)

        def reference_loss(x=X, **changed):
            return float(np.sum(_reference(name, x, {**params, **changed}) * weights))

        eps = 1e-6
        direction = np.random.default_rng(0).normal(size=X.shape)
        fd = (reference_loss(X + eps * direction) - reference_loss(X - eps * direction)) / (2 * eps)
        assert float(jnp.vdot(dx, direction)) == pytest.approx(fd, rel=1e-6, abs=1e-9)
        for key in differentiated:
            value = np.asarray(params[key], np.float64)
            for index in np.ndindex(value.shape):
                step = np.zeros_like(value)
                step[index] = eps
                fd = (reference_loss(**{key: value + step}) - reference_loss(**{key: value - step})) / (2 * eps)
                assert float(dvalues[key][index]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (key, index)


# ------------------------------------------------------------------------------- the scale policies


def _factor_of(policy, n):
    return np.asarray(policy.factor(jnp.asarray(n, jnp.float64), lambda value, name: jnp.asarray(value)))


def test_llama4_and_qwen_factors_at_known_positions():
    with jax.enable_x64(True):
        n = [1, 8191, 8192, 8193, 16384, 100000]  # keys seen = position + 1
        # 1 + 0.1 log(floor(n / 8192) + 1): floor 0, 0, 1, 1, 2, 12
        llama4 = [1.0, 1.0, 1.0693147180559945, 1.0693147180559945, 1.109861228866811, 1.2564949357461537]
        np.testing.assert_allclose(_factor_of(N.Llama4Temperature(), n), llama4, rtol=1e-15)
        # max(1, log n / log 2048): 1 up to the training length, then log_2048 n (4096: 12/11)
        n = [1, 2047, 2048, 2049, 4096, 100000]
        qwen = [1.0, 1.0, 1.0, 1.0000640244555679, 12.0 / 11.0, 1.509967315857892]
        np.testing.assert_allclose(_factor_of(N.QwenLogN(), n), qwen, rtol=1e-15)
        assert _factor_of(N.QwenLogN(seq_length=8192), 8193) == pytest.approx(1.0000135461143418, rel=1e-15)

        # Through the normalizer, n = the row's valid entries: logits [1, 0, ..., 0] give
        # p_0 = e^f / (e^f + n - 1) for the row's factor f.
        width = 100000
        z = np.zeros((3, width))
        z[:, 0] = 1.0
        for name, ns, factors in (
            ("llama4_softmax", [8191, 8192, width], [1.0, llama4[2], llama4[-1]]),
            ("qwen_softmax", [2048, 4096, width], [1.0, qwen[4], qwen[-1]]),
        ):
            where = np.arange(width)[None, :] < np.asarray(ns)[:, None]
            p0 = np.asarray(jax.jit(N.get(name))(z, where=where))[:, 0]
            f, ns = np.asarray(factors), np.asarray(ns)
            np.testing.assert_allclose(p0, np.exp(f) / (np.exp(f) + ns - 1), rtol=1e-12)


def test_critical_scaling_is_log_n_at_s_gamma_and_names_gamma():
    z = jnp.asarray(X[0], jnp.float32)
    critical, ssmax = jax.jit(N.critical_softmax), jax.jit(N.ssmax)
    np.testing.assert_array_equal(critical(z, gamma=0.7), ssmax(z, s=0.7, bias=0.0))
    assert N.parameters("critical_softmax") == {"gamma": 1.0}
    assert N.NormalizerSpec("critical_softmax").learn == ()  # the critical gamma is fixed; ssmax learns s
    with pytest.raises(ValueError, match=r"critical_log_n: parameter 'gamma' must be > 0; got \[-1.0\]"):
        N.get("critical_softmax", gamma=-1.0)
    with pytest.raises(ValueError, match="parameter 'gamma' has shape"):
        N.get("critical_softmax", gamma=jnp.ones((3, 1, 1)))(jnp.zeros((2, 4, 5)))


def test_asentmax_learns_beta_and_gamma_per_head_and_composes_with_any_alpha():
    spec = NormalizerSpec("asentmax")
    assert spec.learn == ("beta", "gamma") and spec.learned == ("beta", "gamma")
    start = spec.initial_params(4)
    assert start["beta"].shape == (4, 1, 1) and start["beta"][0, 0, 0] == pytest.approx(0.55)
    assert start["gamma"][0, 0, 0] == 0.0
    assert N.get("asentmax").mapping == N.Entmax15()  # alpha 1.5: the exact closed form
    with pytest.raises(ValueError, match=r"asentmax_scale: parameter 'beta' must be >= 0"):
        N.get("asentmax", beta=-0.1)


# ------------------------------------------------------------------------------- stick-breaking


def test_stick_breaking_hidden_keys_are_removed_keys():
    with jax.enable_x64(True):
        x = jnp.asarray(X)
        stick_breaking = jax.jit(N.stick_breaking, static_argnames="axis")
        p = np.asarray(stick_breaking(x, where=MASK))
        for h, r in np.ndindex(*X.shape[:2]):
            keep = MASK[h, r]
            if keep.any():
                np.testing.assert_allclose(p[h, r, keep], stick_breaking(x[h, r, keep]), rtol=1e-14, atol=0)
        # -inf is a hidden key: same values; along another axis the key order is that axis's
        np.testing.assert_array_equal(stick_breaking(jnp.where(MASK, x, -jnp.inf)), p)
        np.testing.assert_array_equal(stick_breaking(jnp.swapaxes(x, 1, 2), axis=1, where=MASK.swapaxes(1, 2)),
                                      p.swapaxes(1, 2))  # fmt: skip
        # rows sum to 1 - prod (1 - beta) < 1; the last key takes sigmoid(z) of the whole stick
        row = X[0, 0]
        assert p[0, 0].sum() == pytest.approx(1.0 - np.prod(1.0 / (1.0 + np.exp(row))), rel=1e-14)
        assert p[0, 0, -1] == pytest.approx(1.0 / (1.0 + np.exp(-row[-1])), rel=1e-14)


@pytest.mark.parametrize("n", [1, 5, 128, 130, 300])
def test_sums_after_each_key_over_several_chunks_and_stick_breaking_on_long_rows(n):
    """sum_after goes in chunks of SUM_CHUNK (128): whole, padded and single chunks, in float64."""
    rng = np.random.default_rng(n)
    with jax.enable_x64(True):
        x = rng.normal(size=(3, n))
        after = np.cumsum(x[:, ::-1], axis=1)[:, ::-1] - x  # the float64 reference
        np.testing.assert_allclose(sum_after(jnp.asarray(x)), after, rtol=1e-12, atol=1e-12)
        cotangent = rng.normal(size=(3, n))  # its transpose: the sums before each key
        grad = jax.grad(lambda x: jnp.sum(sum_after(x) * cotangent))(jnp.asarray(x))
        np.testing.assert_allclose(grad, np.cumsum(cotangent, axis=1) - cotangent, rtol=1e-12, atol=1e-12)
        z = 0.3 * rng.normal(size=n) + 3.0  # most of the stick taken far from the end: small weights early on
        np.testing.assert_allclose(N.stick_breaking(jnp.asarray(z)), _stick_breaking(z), rtol=1e-10, atol=1e-300)


# ------------------------------------------------------------------------------- the sink


def test_sink_softmax_shares_softmax1_and_survives_an_empty_row():
    z = jnp.asarray(X[0], jnp.float32)
    np.testing.assert_array_equal(N.sink_softmax(z, where=MASK[0]), N.softmax1(z, where=MASK[0]))
    p = N.sink_softmax(z, sink=-1e30, where=MASK[1])  # row 2 is empty, e^sink underflows
    assert np.all(np.isfinite(p)) and np.all(p[2] == 0)
    np.testing.assert_allclose(p[:2].sum(-1), 1.0, rtol=1e-6)  # a sink at -inf: plain softmax
    assert N.entry("sink_softmax").family == N.SOFTMAX and N.get("sink_softmax").mapping.sink == 0.0


# ------------------------------------------------------------------------------- attention


def _qkv():
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    return [jax.random.normal(key, (2, 12, 2, 8)) for key in keys]


@pytest.mark.parametrize("name", ["stick_breaking", "sink_softmax"])
def test_dense_and_chunked_attention_agree_with_a_learned_parameter(name):
    """Causal attention with padded keys, values and gradients (q, k, v and a per-head sink): dense
    and chunked (query blocks of 5, memory linear in T) agree."""
    q, k, v = _qkv()
    lengths = jnp.asarray([12, 7])
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, k, v, sink, implementation):
        normalizer = N.get("sink_softmax", sink=sink) if name == "sink_softmax" else name
        out = dot_product_attention(q, k, v, normalizer=normalizer, is_causal=True, key_value_seq_lengths=lengths,
                                    implementation=implementation, query_block=5)  # fmt: skip
        return jnp.sum(out * w)

    sink = jnp.asarray([-0.5, 1.0]).reshape(HEADS)
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    grads = {impl: value_and_grad(q, k, v, sink, impl) for impl in ("dense", "chunked")}
    (dense, d_grads), (chunked, c_grads) = grads["dense"], grads["chunked"]
    assert float(chunked) == pytest.approx(float(dense), rel=1e-5)
    for a, b in zip(d_grads, c_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    if name == "sink_softmax":
        assert np.all(np.asarray(d_grads[3]) != 0)  # the learned sink's gradient, per head
    options = Options(batch=2, queries=12, keys=12, heads=2, kv_heads=2, head_dim=8, is_causal=True)
    assert select("chunked", N.get(name), options).name == ("online" if name == "sink_softmax" else "query_blocked")


def test_a_concrete_sink_runs_the_online_pass_like_dense():
    q, k, v = _qkv()
    attention = jax.jit(dot_product_attention, static_argnames=("normalizer", "is_causal", "implementation"))
    out = {
        impl: attention(q, k, v, normalizer="sink_softmax", is_causal=True, implementation=impl)
        for impl in ("dense", "online")
    }
    np.testing.assert_allclose(out["online"], out["dense"], rtol=2e-5, atol=2e-6)


def test_an_attention_layer_learns_one_sink_per_head():
    spec = NormalizerSpec("sink_softmax", learn=("sink",))
    assert spec.learned == ("sink",) and spec.initial_params(2)["sink"].shape == (2, 1, 1)
    layer = MultiHeadAttention(num_heads=2, in_features=8, normalizer=spec, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 8))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2)))(layer)
    sink = grads.normalizer.sink[...]
    assert sink.shape == (2, 1, 1) and np.all(np.isfinite(sink)) and np.all(sink != 0)


# ------------------------------------------------------------------------------- the registry


def test_every_new_normalizer_is_registered_with_its_family():
    assert set(NEW_NAMES) <= set(N.NAMES)
    families = {name: N.entry(name).family for name in NEW_NAMES}
    assert families == {
        "llama4_softmax": N.SOFTMAX,
        "llama4_entmax15": N.THRESHOLD,
        "qwen_softmax": N.SOFTMAX,
        "critical_softmax": N.SOFTMAX,
        "asentmax": N.THRESHOLD,
        "sink_softmax": N.SOFTMAX,
        "stick_breaking": N.GENERIC,
    }
    assert len({N.entry(name).color for name in N.NAMES}) == len(N.NAMES)
    for name in NEW_NAMES:
        assert getattr(N, name).__name__ == name  # the functional form
