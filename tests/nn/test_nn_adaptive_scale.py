"""ASEntmax's adaptive (query-dependent) scale, `adaptive_scale=True` in the NNX layer, the Linen layer
and `ModelConfig`: alpha-entmax((delta + beta (log(n + 1))^gamma) z) with beta = softplus(x W_beta),
gamma = 2 tanh(x W_gamma) per head and query (Vasylenko et al. 2026; deep-spin/asentmax's
"adapt-softplus-tanh")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import normalizers
from attnlab.nn import LinenMultiHeadAttention, ModelConfig, MultiHeadAttention, NormalizerSpec, TransformerLM

B, T, F, N, K = 2, 7, 16, 4, 2
H = F // N


def _x(seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (B, T, F), dtype)


def _layer(**kwargs):
    kwargs.setdefault("normalizer", "asentmax")
    return MultiHeadAttention(N, F, num_kv_heads=K, adaptive_scale=True, rngs=nnx.Rngs(0), **kwargs)


def _direct(params, x, alpha, delta):
    """The layer written out from the paper's equation, in x's dtype: projections, the adaptive scale
    per head and query, causal alpha-entmax (n_t = t + 1 keys), values, output projection."""

    def linear(name, spec):
        return jnp.einsum(spec, x, params[name]["kernel"]) + params[name]["bias"]

    q, k, v = (linear(name, "btf,fnh->btnh") for name in ("query", "key", "value"))
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)  # query head n reads n // G
    z = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    beta = jax.nn.softplus(jnp.swapaxes(linear("scale_beta", "btf,fn->btn"), 1, 2))[..., None]  # [B, N, T, 1]
    gamma = 2.0 * jnp.tanh(jnp.swapaxes(linear("scale_gamma", "btf,fn->btn"), 1, 2))[..., None]
    n = jnp.arange(1, T + 1, dtype=x.dtype)[:, None]
    factor = delta + beta * jnp.log(n + 1.0) ** gamma
    causal = jnp.tril(jnp.ones((T, T), bool))
    p = normalizers.get("entmax", alpha=alpha)(factor * z, where=causal)
    out = jnp.einsum("bnts,bsnh->btnh", p, v)
    return jnp.einsum("btnh,nhf->btf", out, params["out"]["kernel"]) + params["out"]["bias"]


def test_the_layer_is_the_papers_equation_in_float64():
    with jax.enable_x64(True):
        x = _x(dtype=jnp.float64)
        spec = NormalizerSpec("asentmax", {"delta": 0.5, "alpha": 1.3})
        layer = _layer(normalizer=spec, param_dtype=jnp.float64, dtype=jnp.float64)
        params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
        assert params["scale_beta"]["kernel"].shape == (F, N) and params["scale_gamma"]["bias"].shape == (N,)
        expected = _direct(params, x, alpha=1.3, delta=0.5)
        out = layer(x, is_causal=True)
        assert out.dtype == jnp.float64
        # The attention accumulates its logits in float32 (as the layer documents), the rest is float64.
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        beta, gamma = layer.adaptive_scale_parameters(x)
        assert beta.shape == gamma.shape == (B, N, T, 1)
        assert float(jnp.min(beta)) > 0 and float(jnp.max(jnp.abs(gamma))) < 2
        # Not the per-head scale: the same projections (made first, from the same key) give another output.
        fixed = MultiHeadAttention(
            N, F, num_kv_heads=K, normalizer=spec, param_dtype=jnp.float64, dtype=jnp.float64, rngs=nnx.Rngs(0)
        )
        assert float(jnp.max(jnp.abs(fixed(x, is_causal=True) - out))) > 1e-3


def _value_and_grads(layer, x):
    """sum(w * layer(x)) and its gradients with respect to the parameters and x (jitted: one program
    compiles faster than the many small ones of an eager call)."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    w = jnp.cos(jnp.arange(F, dtype=jnp.float32))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, is_causal=True) * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def test_gradients_reach_the_projections_and_the_blocked_entmax_path_equals_dense():
    x = _x(1)
    dense, (dense_params, dense_x) = _value_and_grads(_layer(implementation="dense"), x)
    blocked, (blocked_params, blocked_x) = _value_and_grads(
        _layer(implementation="blocked_entmax", query_block=3, key_block=4), x
    )
    np.testing.assert_allclose(blocked, dense, rtol=1e-5)
    for name in ("scale_beta", "scale_gamma"):
        assert float(jnp.max(jnp.abs(dense_params[name]["kernel"][...]))) > 1e-4, name
    flat_dense, flat_blocked = jax.tree.leaves(dense_params), jax.tree.leaves(blocked_params)
    for a, b in zip(flat_dense, flat_blocked, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(blocked_x, dense_x, rtol=1e-4, atol=1e-6)


def test_existing_parameters_start_as_without_the_adaptive_scale():
    plain = MultiHeadAttention(N, F, num_kv_heads=K, normalizer="asentmax", gate="headwise", rngs=nnx.Rngs(0))
    adaptive = _layer(gate="headwise")
    plain_params = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
    adaptive_params = nnx.to_pure_dict(nnx.state(adaptive, nnx.Param))
    assert set(adaptive_params) - set(plain_params) == {"scale_beta", "scale_gamma"}
    # The spec's per-head beta and gamma give way to the projections; nothing else changes.
    assert set(plain_params["normalizer"]) == {"beta", "gamma"} and "normalizer" not in adaptive_params
    for name in ("query", "key", "value", "out", "gate"):
        jax.tree.map(np.testing.assert_array_equal, adaptive_params[name], plain_params[name])


def test_transformer_option_decodes_exactly_and_is_off_by_default():
    config = ModelConfig(vocab_size=32, num_layers=1, width=16, num_heads=2, normalizer="asentmax", init_std=0.3)
    assert not config.adaptive_scale
    model = TransformerLM(ModelConfig(**{**config.to_json(), "adaptive_scale": True}), rngs=nnx.Rngs(0))
    assert model.blocks[0].attention.scale_beta.kernel[...].shape == (16, 2)
    tokens = jax.random.randint(jax.random.key(1), (B, 6), 0, 32)
    full = nnx.jit(lambda model, tokens: model(tokens))(model, tokens)
    model.init_cache(B, 8)
    step = nnx.jit(lambda model, tokens: model(tokens, decode=True))
    steps = [step(model, tokens[:, :2]), step(model, tokens[:, 2:4])]
    steps += [step(model, tokens[:, t : t + 1]) for t in (4, 5)]  # each token's beta, gamma from itself
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_linen_layer_learns_the_same_projections():
    x = _x(2)
    linen = LinenMultiHeadAttention(N, num_kv_heads=K, normalizer="asentmax", adaptive_scale=True)
    params = linen.init(jax.random.key(0), x)["params"]
    assert params["scale_beta"]["kernel"].shape == (F, N)
    layer = _layer()
    state = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(layer, state)
    np.testing.assert_allclose(
        linen.apply({"params": params}, x, is_causal=True), layer(x, is_causal=True), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"normalizer": "entmax15"},
            r"needs a normalizer whose scale policy is ASEntmaxScale \('asentmax'\); got 'entmax15'",
        ),
        ({"normalizer": NormalizerSpec("asentmax", {"beta": 0.3})}, r"cannot also set them \(params \['beta'\]\)"),
        ({"normalizer": NormalizerSpec("asentmax", learn=("gamma", "delta"))}, r"\(learn \['gamma'\]\)"),
        ({"adaptive_scale": "yes"}, "adaptive_scale must be True or False"),
    ],
)
def test_errors_name_the_value_and_what_is_accepted(kwargs, message):
    kwargs = {"normalizer": "asentmax", "adaptive_scale": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(N, F, rngs=nnx.Rngs(0), **kwargs)
    if "adaptive_scale" not in kwargs or kwargs["adaptive_scale"] is True:
        config = {"normalizer": kwargs["normalizer"], "implementation": kwargs.get("implementation")}
        with pytest.raises(ValueError, match=r"ModelConfig \(layer 0\)"):
            ModelConfig(num_layers=1, width=16, num_heads=2, adaptive_scale=True, **config)


@pytest.mark.slow  # tests/attention/test_attention_fast_paths.py checks the backend with per-query parameters
def test_the_query_blocked_backend_cuts_per_query_parameters_by_block():
    """A learned alpha (traced) with per-query beta and gamma runs on the query-blocked backend, which
    cuts [B, N, T, 1] parameters like the queries: equal to dense, values and gradients."""
    T = 11
    x = jax.random.normal(jax.random.PRNGKey(7), (2, T, F))
    layers = {
        implementation: MultiHeadAttention(
            N,
            F,
            normalizer=NormalizerSpec("asentmax", learn=("alpha",)),
            adaptive_scale=True,
            implementation=implementation,
            query_block=4,
            rngs=nnx.Rngs(0),
        )
        for implementation in ("query_blocked", "dense")
    }

    def loss(layer):
        return jnp.sum(layer(x, is_causal=True) ** 2)

    values = {name: nnx.value_and_grad(loss)(layer) for name, layer in layers.items()}
    np.testing.assert_allclose(values["query_blocked"][0], values["dense"][0], rtol=1e-5)
    got, want = (jax.tree.leaves(nnx.state(values[name][1], nnx.Param)) for name in ("query_blocked", "dense"))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
