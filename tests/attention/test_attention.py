"""dot_product_attention: every implementation against the dense reference and jax.nn.

Compilation dominates these tests. Called eagerly, the chunked path compiles its scans and while
loops anew on every call, so chunked calls run under `jax.jit` (`_jit_chunked`: one compilation
per function and shape). Dense calls mostly stay eager: their small ops compile once and are then
shared by every test with the same shapes. Errors raised on Python values are checked eagerly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import normalizers
from attnlab.attention import dot_product_attention

B, T, S, N, K, H = 2, 19, 23, 4, 2, 8


def _inputs(seed=0, t=T, s=S, n=N, k=K, h=H, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, t, n, h), dtype)
    key = jax.random.normal(keys[1], (B, s, k, h), dtype)
    value = jax.random.normal(keys[2], (B, s, k, h), dtype)
    bias = 0.5 * jax.random.normal(keys[3], (B, n, t, s), jnp.float32)
    return q, key, value, bias


def _mask(seed=1, t=T, s=S):
    # Random, but every query keeps key 0 so that no row is empty (jax.nn gives those uniform weights).
    mask = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.7, (B, 1, t, s))
    return mask.at[..., 0].set(True)


def _loss_and_output(fn, q, *operands):
    out = fn(q, *operands)
    return jnp.sum(jnp.sin(out) * jnp.cos(jnp.arange(q.shape[-1]))), out


def _loss(fn, q, k, v, bias):
    return _loss_and_output(fn, q, k, v, bias)[0]


def _values_and_grads(fn, argnums):
    """args -> (fn(*args), grad of _loss(fn, *args) w.r.t. argnums), jitted, with one forward pass."""
    grad = jax.grad(functools.partial(_loss_and_output, fn), argnums=argnums, has_aux=True)

    def run(*args):
        grads, out = grad(*args)
        return out, grads

    return jax.jit(run)


def _jit_chunked(implementation, fn):
    """fn, jitted for the chunked implementation (see the module docstring)."""
    return jax.jit(fn) if implementation == "chunked" else fn


def _close(a, b, atol=2e-5, rtol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


SETTINGS = {
    "plain": {},
    "causal": {"is_causal": True},
    "mask": {"mask": "random"},
    "causal+lengths": {"is_causal": True, "key_value_seq_lengths": jnp.array([S, 11])},
    "window": {"local_window_size": (4, 2)},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_softmax_equals_jax_values_and_gradients(setting, implementation):
    # With a bias (and its gradient); the paths without one run in most other tests.
    q, k, v, bias = _inputs()
    options = dict(SETTINGS[setting])
    if options.get("mask") == "random":
        options["mask"] = _mask()

    def ours(q, k, v, b):
        return dot_product_attention(q, k, v, b, implementation=implementation, key_block=5, **options)

    def reference(q, k, v, b):
        return jax.nn.dot_product_attention(q, k, v, b, **options)

    argnums = (0, 1, 2, 3)
    if implementation == "chunked":
        out, got = _values_and_grads(ours, argnums)(q, k, v, bias)
    else:
        out, got = ours(q, k, v, bias), jax.grad(functools.partial(_loss, ours), argnums=argnums)(q, k, v, bias)
    _close(out, reference(q, k, v, bias))
    want = jax.grad(functools.partial(_loss, reference), argnums=argnums)(q, k, v, bias)
    for g, w in zip(got, want, strict=True):
        _close(g, w, atol=5e-5, rtol=5e-5)


# Each backend and kind of row factor at least once by default (online: softmax, a log-n factor, a sink,
# sigmoid; blocked entmax: sparsemax, a log-n factor; query-blocked: multimax); the rest are marked slow.
QUICK_NAMES = ("softmax", "ssmax", "softmax1", "sigmoid", "sparsemax", "logn_entmax15", "multimax")


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name in QUICK_NAMES else pytest.mark.slow) for name in normalizers.NAMES]
)
def test_chunked_equals_dense_for_every_normalizer(name):
    q, k, v, bias = _inputs(seed=3)
    options = dict(
        mask=_mask(seed=4),
        is_causal=True,
        key_value_seq_lengths=jnp.array([S, 9]),
        query_seq_lengths=jnp.array([T, 14]),
        normalizer=name,
    )

    def run(implementation, q, k, v, b):
        return dot_product_attention(q, k, v, b, implementation=implementation, key_block=6, query_block=4, **options)

    out, got = _values_and_grads(functools.partial(run, "chunked"), (0, 1, 2, 3))(q, k, v, bias)
    want_out, want = _values_and_grads(functools.partial(run, "dense"), (0, 1, 2, 3))(q, k, v, bias)
    _close(out, want_out)
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(g))
        _close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["softmax", "ssmax", "softmax1", "sigmoid", "sparsemax", "entmax15"])
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_query_without_visible_keys_gives_zero_output_and_finite_gradients(name, implementation):
    q, k, v, _ = _inputs(seed=5)
    mask = jnp.ones((B, 1, T, S), bool).at[:, :, 3].set(False).at[1, :, 7].set(False)

    def f(q, k, v):
        return dot_product_attention(q, k, v, mask=mask, normalizer=name, implementation=implementation, key_block=7)

    out = _jit_chunked(implementation, f)(q, k, v)
    assert np.all(np.asarray(out[:, 3]) == 0) and np.all(np.asarray(out[1, 7]) == 0)
    assert np.any(np.asarray(out[0, 7]) != 0)
    grads = _jit_chunked(implementation, jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0][:, 3]) == 0)


def test_ssmax_uses_each_querys_visible_key_count():
    q, k, v, _ = _inputs(seed=6, t=S)
    s = 0.7
    chunked = functools.partial(
        dot_product_attention, is_causal=True, normalizer=normalizers.get("ssmax", s=s), implementation="chunked"
    )
    out = jax.jit(chunked)(q, k, v)

    @jax.jit
    def want(q, k, v):
        # Row t of causal SSMax is softmax over keys 0..t of logits scaled by s * log(t + 1).
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2)) / np.sqrt(H)
        t = jnp.arange(S)
        factor = s * jnp.log(t + 1.0)[:, None]
        visible = t[None, :] <= t[:, None]
        p = jax.nn.softmax(jnp.where(visible, logits * factor, -jnp.inf), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", p, jnp.repeat(v, N // K, axis=2))

    _close(out, want(q, k, v))


def test_learned_per_head_parameters_get_gradients_through_chunked_path():
    q, k, v, _ = _inputs(seed=7)

    def loss(s, implementation):
        norm = normalizers.Normalizer(normalizers.Softmax(), normalizers.LogN(s=s))
        out = dot_product_attention(q, k, v, is_causal=True, normalizer=norm, implementation=implementation)
        return jnp.sum(out**2)

    s = jnp.linspace(0.3, 0.6, N).reshape(N, 1, 1)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_dense = grad(s, "dense")
    g_chunked = grad(s, "chunked")
    assert np.all(np.abs(np.asarray(g_dense)) > 0)
    _close(g_chunked, g_dense, atol=1e-4, rtol=1e-4)

    def alpha_loss(alpha, implementation):
        norm = normalizers.Normalizer(normalizers.Entmax(alpha))
        out = dot_product_attention(q, k, v, is_causal=True, normalizer=norm, implementation=implementation)
        return jnp.sum(out**2)

    alpha = jnp.linspace(1.2, 1.8, N).reshape(N, 1, 1)
    alpha_grad = jax.jit(jax.grad(alpha_loss), static_argnums=1)
    _close(alpha_grad(alpha, "chunked"), alpha_grad(alpha, "dense"), atol=1e-4, rtol=1e-4)


# softmax's statistics come from the same pass as ssmax's; sparsemax's are checked in test_attention_fast_paths.py.
@pytest.mark.parametrize("name", ["ssmax", "softmax1", "sigmoid", "entmax15"])
def test_statistics_match_the_weights(name):
    q, k, v, bias = _inputs(seed=8)
    mass_keys = jnp.zeros((B, S), bool).at[:, 2:5].set(True)
    options = dict(is_causal=True, normalizer=name, key_value_seq_lengths=jnp.array([S, 10]), mass_keys=mass_keys)
    _, dense = dot_product_attention(q, k, v, bias, implementation="dense", return_weights=True, **options)
    chunked_fn = functools.partial(
        dot_product_attention, implementation="chunked", key_block=5, query_block=3, **options
    )
    _, chunked = jax.jit(chunked_fn)(q, k, v, bias)
    p = np.asarray(dense["weights"], np.float64)
    assert p.shape == (B, N, T, S)
    np.testing.assert_allclose(dense["max_weight"], p.max(-1), atol=1e-6)
    np.testing.assert_allclose(dense["support_size"], (p > 0).sum(-1))
    np.testing.assert_allclose(dense["key_mass"], p[..., 2:5].sum(-1), atol=1e-6)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
    np.testing.assert_allclose(dense["entropy"], entropy, atol=1e-5)
    for stat in ("max_weight", "entropy", "support_size", "key_mass"):
        assert chunked[stat].shape == (B, N, T)
        _close(chunked[stat], dense[stat], atol=2e-5)
    if name == "entmax15":
        assert np.any(p[p.sum(-1) > 0].min() == 0), "a sparse map should give exact zeros"


ONLINE_NEWER = {
    "softmax1 (log n scaled)": normalizers.Normalizer(normalizers.Softmax1(), normalizers.LogN(s=0.7)),
    "sigmoid (bias -log n, log n scaled)": normalizers.Normalizer(normalizers.Sigmoid(), normalizers.LogN(s=0.7)),
    "sigmoid (a bias per head)": normalizers.get("sigmoid", bias=jnp.array([0.5, -1.0, 0.0, -3.0])[:, None, None]),
}


@pytest.mark.parametrize("name", list(ONLINE_NEWER))
def test_softmax1_and_sigmoid_take_the_online_path(monkeypatch, name):
    """softmax1 (the online recurrence from a sink logit 0) and sigmoid (one pass, no running max)
    never take the generic query-blocked path, and equal dense in values and gradients, those of a
    per-head sigmoid bias included; softmax1's rows sum to < 1."""
    from attnlab.attention import backends

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} went through the generic query-blocked path")

    monkeypatch.setattr(backends, "query_blocked_attention", refuse)
    q, k, v, bias = _inputs(seed=11)
    normalizer = ONLINE_NEWER[name]

    def run(implementation, q, k, v, b, normalizer):
        return dot_product_attention(
            q, k, v, b, is_causal=True, key_value_seq_lengths=jnp.array([S, 0]), normalizer=normalizer,
            implementation=implementation, key_block=8, query_block=16,
        )  # fmt: skip

    argnums = (0, 1, 2, 3, 4)
    out, got = _values_and_grads(jax.jit(functools.partial(run, "chunked")), argnums)(q, k, v, bias, normalizer)
    want_out, want = _values_and_grads(functools.partial(run, "dense"), argnums)(q, k, v, bias, normalizer)
    _close(out, want_out)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close(g, w, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(out[1]) == 0)  # no visible key
    if name.startswith("softmax1"):
        _, weights = dot_product_attention(q, k, v, is_causal=True, normalizer=normalizer, return_weights=True)
        assert np.all(np.asarray(weights["weights"]).sum(-1) < 1)


def test_gqa_equals_repeated_key_value_heads():
    q, k, v, _ = _inputs(seed=9)
    grouped = jax.jit(
        functools.partial(dot_product_attention, normalizer="entmax15", implementation="chunked", query_block=4)
    )(q, k, v)
    repeated = dot_product_attention(
        q, jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2), normalizer="entmax15", implementation="dense"
    )
    _close(grouped, repeated)


@pytest.mark.parametrize("name", ["softmax", "entmax15"])
def test_bfloat16_inputs(name):
    q, k, v, _ = _inputs(seed=11)
    want = dot_product_attention(q, k, v, normalizer=name, is_causal=True, implementation="dense")
    for implementation in ("dense", "chunked"):
        low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        f = functools.partial(dot_product_attention, normalizer=name, is_causal=True, implementation=implementation)
        out = _jit_chunked(implementation, f)(*low)
        assert out.dtype == jnp.bfloat16
        _close(out.astype(jnp.float32), want, atol=5e-2, rtol=5e-2)


def test_custom_callable_normalizer():
    q, k, v, _ = _inputs(seed=12)

    def my_softmax(logits, *, axis=-1, where=None):
        return normalizers.softmax(logits, axis=axis, where=where)

    for implementation in ("dense", "chunked"):
        f = functools.partial(
            dot_product_attention, is_causal=True, normalizer=my_softmax, implementation=implementation
        )
        _close(_jit_chunked(implementation, f)(q, k, v), jax.nn.dot_product_attention(q, k, v, is_causal=True))


def test_jit_and_default_implementation():
    q, k, v, _ = _inputs(seed=13)
    f = jax.jit(functools.partial(dot_product_attention, is_causal=True, normalizer="ssmax"))
    _close(f(q, k, v), dot_product_attention(q, k, v, is_causal=True, normalizer="ssmax", implementation="dense"))


def test_clear_errors():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dot_product_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        dot_product_attention(q[0, 0], k, v)
    with pytest.raises(ValueError, match="query batch 1 != key batch 2"):
        dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        dot_product_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="unknown normalizer 'nope'"):
        dot_product_attention(q, k, v, normalizer="nope")
    with pytest.raises(ValueError, match="implementation='fast'; accepted"):
        dot_product_attention(q, k, v, implementation="fast")
    with pytest.raises(ValueError, match="softmax-type normalizers only"):
        dot_product_attention(q, k, v, normalizer="sparsemax", implementation="cudnn")
    with pytest.raises(ValueError, match="mask must be boolean"):
        dot_product_attention(q, k, v, mask=jnp.ones((T, S)))
    with pytest.raises(ValueError, match="return_weights needs"):
        dot_product_attention(q, k, v, implementation="chunked", return_weights=True)
    with pytest.raises(TypeError, match="registry name"):
        dot_product_attention(q, k, v, normalizer=3)


@pytest.mark.parametrize("name", ["softmax", "entmax15"])
# A full [B, N, T, S] bias and its gradient: test_softmax_equals_jax_values_and_gradients and the fast paths' tests.
@pytest.mark.parametrize("bias_shape", [(1, 1, 1, S), (B, N, T, 1), (1, N, 1, 1)])
def test_chunked_bias_gradients_for_broadcast_shapes(bias_shape, name):
    q, k, v, _ = _inputs(seed=14)
    bias = jax.random.normal(jax.random.PRNGKey(15), bias_shape)

    def grads(implementation):
        def loss(q, k, v, b):
            out = dot_product_attention(
                q, k, v, b, is_causal=True, implementation=implementation, key_block=8, query_block=5, normalizer=name
            )
            return jnp.sum(jnp.sin(out))

        return _jit_chunked(implementation, jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    for got, want in zip(grads("chunked"), grads("dense"), strict=True):
        assert got.shape == want.shape
        _close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", ["softmax", "entmax15"])
def test_single_query_and_single_key(name):
    q, k, v, _ = _inputs(seed=16, t=1, s=1)
    for implementation in ("dense", "chunked"):
        # both jitted: new shapes, so the eager dense ops would compile anew here
        out = jax.jit(functools.partial(dot_product_attention, normalizer=name, implementation=implementation))(q, k, v)
        _close(out, jnp.repeat(v, N // K, axis=2))
