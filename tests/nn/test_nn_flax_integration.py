"""The three entry points inside Flax models: training steps under jit, parity with flax's own layers,
the Linen layer, and attention_fn's handling of flax's keywords."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab.nn import LinenMultiHeadAttention, MultiHeadAttention, NormalizerSpec, attention_fn

B, T, F, N, V = 2, 6, 16, 4, 11
NORMALIZERS = ("softmax", "ssmax", "entmax15")


def _x(seed=0, shape=(B, T, F)):
    return jax.random.normal(jax.random.key(seed), shape)


def _tokens(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, V)
    return tokens[:, :-1], tokens[:, 1:]


def _changed(before, after):
    return float(jnp.max(jnp.abs(jnp.asarray(after) - jnp.asarray(before)))) > 0


# ------------------------------------------------------------------------------------------------
# One optax step under jit, one model per entry point holding a softmax, an ssmax and an entmax15 layer


class NNXModel(nnx.Module):
    def __init__(self, make_attention, rngs):
        self.embed = nnx.Embed(V, F, rngs=rngs)
        self.layers = nnx.List([make_attention(name, rngs) for name in NORMALIZERS])
        self.head = nnx.Linear(F, V, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x, is_causal=True)
        return self.head(x)


def _ours_nnx(name, rngs):
    return MultiHeadAttention(N, F, num_kv_heads=2, normalizer=name, rope_theta=10_000.0, rngs=rngs)


def _flax_nnx_with_attention_fn(name, rngs):
    return nnx.MultiHeadAttention(N, F, attention_fn=attention_fn(name), decode=False, rngs=rngs)


@pytest.mark.parametrize("make_attention", [_ours_nnx, _flax_nnx_with_attention_fn], ids=["attnlab", "flax+fn"])
def test_nnx_models_take_a_jitted_optax_step(make_attention):
    model = NNXModel(make_attention, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = nnx.clone(nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, tokens, targets):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    tokens, targets = _tokens()
    loss = step(model, optimizer, tokens, targets)
    assert np.isfinite(float(loss)) and float(loss) > 0
    after = nnx.state(model, nnx.Param)
    for i, name in enumerate(NORMALIZERS):
        for part in ("query", "key", "value", "out"):
            old, new = before["layers"][i][part]["kernel"][...], after["layers"][i][part]["kernel"][...]
            assert _changed(old, new), (name, part)
    if make_attention is _ours_nnx:
        # the ssmax layer's per-head s moved too
        i = NORMALIZERS.index("ssmax")
        assert _changed(before["layers"][i]["normalizer"]["s"][...], after["layers"][i]["normalizer"]["s"][...])
    assert np.isfinite(float(step(model, optimizer, tokens, targets)))


class LinenModel(nn.Module):
    make_attention: object

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, F)(tokens)
        for name in NORMALIZERS:
            x = x + self.make_attention(name)(x)
        return nn.Dense(V)(x)


def _ours_linen(name):
    layer = LinenMultiHeadAttention(N, num_kv_heads=2, normalizer=name, rope_theta=10_000.0)
    return lambda x: layer(x, is_causal=True)


def _flax_linen_with_attention_fn(name):
    layer = nn.MultiHeadDotProductAttention(N, attention_fn=attention_fn(name))
    return lambda x: layer(x, mask=nn.make_causal_mask(x[..., 0]))


@pytest.mark.parametrize("make_attention", [_ours_linen, _flax_linen_with_attention_fn], ids=["attnlab", "flax+fn"])
def test_linen_models_take_a_jitted_optax_step(make_attention):
    model = LinenModel(make_attention)
    tokens, targets = _tokens()
    params = model.init(jax.random.key(0), tokens)["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits = model.apply({"params": params}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    new_params, _, loss = step(params, opt_state)
    assert np.isfinite(float(loss)) and float(loss) > 0
    layer_names = sorted(k for k in params if k != "Embed_0" and k != "Dense_0")
    assert len(layer_names) == len(NORMALIZERS)
    for layer in layer_names:
        for part in ("query", "key", "value", "out"):
            assert _changed(params[layer][part]["kernel"], new_params[layer][part]["kernel"]), (layer, part)
    if make_attention is _ours_linen:
        ssmax_layer = layer_names[NORMALIZERS.index("ssmax")]
        assert params[ssmax_layer]["normalizer"]["s"].shape == (N, 1, 1)
        assert _changed(params[ssmax_layer]["normalizer"]["s"], new_params[ssmax_layer]["normalizer"]["s"])


# ------------------------------------------------------------------------------------------------
# attention_fn inside flax's own layers equals flax's default attention (softmax)


def test_attention_fn_softmax_equals_flax_default_in_nnx():
    num_kv_heads = 2
    default = nnx.MultiHeadAttention(N, F, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(
        N, F, num_kv_heads=num_kv_heads, attention_fn=attention_fn("softmax"), decode=False, rngs=nnx.Rngs(0)
    )
    nnx.update(ours, nnx.state(default, nnx.Param))
    x = _x()
    # a float 0/1 padding mask, as nnx.make_attention_mask builds it, combined with is_causal
    mask = nnx.make_attention_mask(jnp.ones((B, T)), jnp.arange(T)[None] < jnp.array([[6], [4]]))
    assert mask.dtype == jnp.float32
    for kwargs in ({}, {"mask": mask, "is_causal": True}):
        np.testing.assert_allclose(ours(x, **kwargs), default(x, **kwargs), rtol=1e-5, atol=1e-5, err_msg=str(kwargs))


def test_attention_fn_handles_several_batch_axes_and_none():
    default = nnx.MultiHeadAttention(N, F, decode=False, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(N, F, attention_fn=attention_fn("softmax"), decode=False, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(default, nnx.Param))
    x = _x(1, (1, B, T, F))
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None, None]  # [1, 1, 1, T, T] against [1, B, N, T, T]
    batched = ours(x, mask=mask)
    np.testing.assert_allclose(batched, default(x, mask=mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(x[0, 1], mask=mask[0, 0]), batched[0, 1], rtol=1e-5, atol=1e-5)


def test_attention_fn_softmax_equals_flax_default_in_linen():
    default = nn.MultiHeadDotProductAttention(N)
    ours = nn.MultiHeadDotProductAttention(N, attention_fn=attention_fn("softmax"))
    x = _x(2)
    variables = default.init(jax.random.key(0), x)
    mask = nn.make_attention_mask(jnp.ones((B, T)), jnp.arange(T)[None] < jnp.array([[3], [6]]))
    mask = nn.combine_masks(mask, nn.make_causal_mask(x[..., 0]))
    np.testing.assert_allclose(
        ours.apply(variables, x, mask=mask), default.apply(variables, x, mask=mask), rtol=1e-5, atol=1e-5
    )


def test_attention_fn_sows_the_same_weights_as_flax():
    default = nnx.MultiHeadAttention(N, F, decode=False, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(N, F, attention_fn=attention_fn("softmax"), decode=False, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(default, nnx.Param))
    x = _x(3)
    _, theirs = nnx.capture(default, nnx.Intermediate)(x, is_causal=True, sow_weights=True)
    _, mine = nnx.capture(ours, nnx.Intermediate)(x, is_causal=True, sow_weights=True)
    (expected,) = theirs["attention_weights"].get_value()
    (weights,) = mine["attention_weights"].get_value()
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)


def test_attention_fn_sows_weights_in_linen():
    layer = nn.MultiHeadDotProductAttention(N, attention_fn=attention_fn("sparsemax"))
    x = _x(4)
    variables = layer.init(jax.random.key(0), x)
    _, state = layer.apply(variables, x, sow_weights=True, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-5)


def test_attention_fn_weight_dropout_for_softmax_and_a_clear_error_for_sparse_maps():
    x = _x(5)
    layer = nnx.MultiHeadAttention(
        N, F, attention_fn=attention_fn("ssmax"), dropout_rate=0.5, decode=False, rngs=nnx.Rngs(0, dropout=1)
    )
    plain = layer(x, deterministic=True)
    dropped = layer(x, deterministic=False)
    assert bool(jnp.all(jnp.isfinite(dropped))) and _changed(plain, dropped)
    sparse = nnx.MultiHeadAttention(
        N, F, attention_fn=attention_fn("entmax15"), dropout_rate=0.5, decode=False, rngs=nnx.Rngs(0, dropout=1)
    )
    sparse(x, deterministic=True)  # no dropout requested: fine
    with pytest.raises(ValueError, match=r"dropout.*unsupported.*entmax15"):
        sparse(x, deterministic=False)
    chunked = nnx.MultiHeadAttention(
        N,
        F,
        attention_fn=attention_fn("softmax", implementation="chunked"),
        dropout_rate=0.5,
        decode=False,
        rngs=nnx.Rngs(0, dropout=1),
    )
    with pytest.raises(ValueError, match=r"dropout.*implementation=None or 'dense'"):
        chunked(x, deterministic=False)


def test_attention_fn_options_and_normalizer_errors():
    with pytest.raises(TypeError, match=r"unknown options \['key_blocks'\]; accepted: implementation, key_block"):
        attention_fn("softmax", key_blocks=4)
    with pytest.raises(ValueError, match=r"normalizer='softmaxx'; accepted names: softmax"):
        attention_fn("softmaxx")
    with pytest.raises(ValueError, match=r"learns s.*holds no parameters"):
        attention_fn(NormalizerSpec("ssmax"))
    with pytest.raises(ValueError, match="implementation='flash'"):
        attention_fn("softmax", implementation="flash")
    fn = attention_fn(NormalizerSpec("ssmax", {"s": 0.5}, learn=()))
    q = _x(6, (B, T, N, F // N))
    with pytest.raises(ValueError, match="qk_attn_weights_einsum"):
        fn(q, q, q, qk_attn_weights_einsum=lambda *a: None)
    fn(q, q, q, some_future_flax_keyword=None, promote_dtype=None)  # unknown keywords are accepted


def test_attention_fn_names_the_keywords_linen_filters_on():
    import inspect

    names = set(inspect.signature(attention_fn("softmax")).parameters)
    assert {"mask", "bias", "dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic", "dtype"} <= names
    assert {"module", "is_causal", "force_fp32_for_softmax", "kwargs"} <= names


def test_attention_fn_refuses_query_and_key_with_different_batch_axes():
    q, k = jnp.zeros((2, T, N, F // N)), jnp.zeros((3, T, N, F // N))
    with pytest.raises(ValueError, match=r"same batch axes.*query \(2, 6, 4, 4\), key \(3, 6, 4, 4\)"):
        attention_fn("softmax")(q, k, k)


def test_attention_fn_computes_the_softmax_in_float32_as_force_fp32_for_softmax_asks():
    q, k, v = (_x(seed, (B, T, N, 4)).astype(jnp.bfloat16) for seed in (8, 9, 10))
    fn = attention_fn("softmax")
    call = lambda module: fn(q, k, v, dtype=jnp.bfloat16, module=module, force_fp32_for_softmax=True)  # noqa: E731
    out, sown = nnx.capture(call, nnx.Intermediate)(nnx.Module())
    (weights,) = sown["attention_weights"].get_value()
    # head_dim 4: the scale 1/2 is exact in bfloat16, so the float32 reference sees the same logits
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) / 2
    expected = jax.nn.softmax(logits, axis=-1)
    assert out.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-7)
    in_bfloat16 = jax.nn.softmax(logits.astype(jnp.bfloat16), axis=-1).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(in_bfloat16 - expected))) > 1e-4  # the tolerance tells the two apart
    # (flax's Linen layer passes the keyword because the signature names it: the test above)


# ------------------------------------------------------------------------------------------------
# The Linen layer: parity with flax's Linen layer (the checks shared with the NNX layer are in
# tests/nn/test_nn_layers.py)


def test_linen_layer_softmax_equals_flax_linen_layer():
    theirs = nn.MultiHeadDotProductAttention(N)
    ours = LinenMultiHeadAttention(N)
    x = _x(7)
    variables = theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    mask = nn.make_causal_mask(x[..., 0])
    expected = theirs.apply(variables, x, mask=mask)
    np.testing.assert_allclose(ours.apply(variables, x, mask=mask), expected, atol=1e-5)
    np.testing.assert_allclose(ours.apply(variables, x, is_causal=True), expected, atol=1e-5)
