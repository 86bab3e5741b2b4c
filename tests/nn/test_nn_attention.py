"""attnlab.nn.MultiHeadAttention (NNX): parity with flax's NNX layer, options, the start values of
learned normalizer parameters, errors. The checks run on both the NNX and the Linen layer are in
tests/nn/test_nn_layers.py; NormalizerSpec's own errors in tests/normalizers/test_normalizers_descriptions.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import MultiHeadAttention, NormalizerSpec, alpha_from_logit, inverse_mean_log_n

B, T, F, N = 2, 6, 16, 4


def _x(seed=0, shape=(B, T, F)):
    return jax.random.normal(jax.random.key(seed), shape)


def _layer(normalizer="softmax", **kwargs):
    kwargs.setdefault("num_heads", N)
    kwargs.setdefault("in_features", F)
    return MultiHeadAttention(normalizer=normalizer, rngs=nnx.Rngs(0), **kwargs)


# ------------------------------------------------------------------------------------------------
# Parity with flax, options (the output against dot_product_attention on the projections, GQA, RoPE,
# statistics and dropout: tests/nn/test_nn_layers.py, on both layers)


@pytest.mark.parametrize(("num_kv_heads", "masking"), [(N, "none"), (2, "causal"), (2, "mask")])
def test_softmax_without_rope_equals_flax_multihead_attention(num_kv_heads, masking):
    ours = _layer("softmax", num_kv_heads=num_kv_heads)
    theirs = nnx.MultiHeadAttention(N, F, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs, nnx.Param))  # same kernels, copied
    x = _x()
    kwargs = {}
    if masking == "causal":
        kwargs["is_causal"] = True
    elif masking == "mask":
        # Key padding only: a query with no visible key differs on purpose (attnlab: output 0, no NaN;
        # flax: uniform weights over the hidden keys).
        lengths = jnp.array([6, 3])
        kwargs["mask"] = nnx.make_attention_mask(jnp.ones((B, T)), jnp.arange(T)[None] < lengths[:, None])
    expected = theirs(x, **kwargs)
    np.testing.assert_allclose(ours(x, **kwargs), expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(expected))) > 0.1  # the comparison is not between near-zero outputs


def test_values_without_keys_are_refused_as_flax_refuses_them():
    # (checked on both layers in tests/nn/test_nn_layers.py; flax takes [T, F] inputs too, as ours do:
    # tests/nn/test_nn_flax_integration.py runs flax's layer on them)
    x = _x()
    with pytest.raises(ValueError, match="inputs_k` cannot be None if `inputs_v` is not None"):
        nnx.MultiHeadAttention(N, F, decode=False, rngs=nnx.Rngs(1))(x, inputs_v=x)
    with pytest.raises(ValueError, match="inputs_k cannot be None when inputs_v is given"):
        _layer("softmax")(x, inputs_v=x)


def test_query_with_no_visible_key_gives_the_output_bias():
    # (its zero output and zero gradients before the output projection: tests/attention/test_attention.py)
    layer = _layer("ssmax")
    mask = jnp.ones((B, 1, T, T), bool).at[0, :, 2, :].set(False)
    out = layer(_x(2), mask=mask)
    np.testing.assert_allclose(out[0, 2], layer.out.bias[...], atol=1e-6)


def test_chunked_implementation_matches_dense():
    dense = _layer("ssmax", implementation="dense")
    chunked = _layer("ssmax", implementation="chunked", key_block=4)
    x = _x(6)
    np.testing.assert_allclose(chunked(x, is_causal=True), dense(x, is_causal=True), rtol=1e-5, atol=1e-5)


def test_key_value_seq_lengths_hide_padding():
    layer = _layer("logn_entmax15")
    x = _x(7)
    lengths = jnp.array([4, 6])
    noisy = x.at[0, 4:].set(100.0)  # change only the padding of example 0
    a = layer(x, key_value_seq_lengths=lengths)
    b = layer(noisy, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Learned normalizer parameters (their gradients: tests/nn/test_nn_layers.py)


def test_learned_parameters_start_at_their_given_values():
    x = _x(9)
    bias = _layer(NormalizerSpec("ssmax", learn=("s", "bias")))
    np.testing.assert_array_equal(bias.normalizer.bias[...], np.zeros((N, 1, 1)))
    np.testing.assert_allclose(bias(x, is_causal=True), _layer("ssmax")(x, is_causal=True), rtol=1e-6)
    alpha = _layer(NormalizerSpec("entmax", {"alpha": 1.3}, learn=("alpha",)))
    np.testing.assert_allclose(alpha_from_logit(alpha.normalizer.alpha_logit[...]), 1.3, rtol=1e-6)
    learned = _layer(NormalizerSpec("scaled_softmax", {"temperature": 2.0}, learn=("temperature",)))
    fixed = _layer(NormalizerSpec("scaled_softmax", params={"temperature": 2.0}))
    np.testing.assert_allclose(learned(x), fixed(x), rtol=1e-6)


def test_frozen_s_is_not_a_parameter_and_equals_fixed_ssmax():
    frozen = _layer(NormalizerSpec("ssmax", {"s": 0.6}, learn=()))
    learned = _layer(NormalizerSpec("ssmax", {"s": 0.6}))
    assert not hasattr(frozen.normalizer, "s")
    assert len(jax.tree.leaves(nnx.state(frozen.normalizer, nnx.Param))) == 0
    x = _x(10)
    np.testing.assert_allclose(frozen(x, is_causal=True), learned(x, is_causal=True), rtol=1e-6)


def test_inverse_mean_log_n_initial_value():
    # mean_{n=1..4} log n = log(4!) / 4, so s = 4 / log 24.
    assert inverse_mean_log_n(4) == pytest.approx(4 / math.log(24))
    L = 1024
    assert inverse_mean_log_n(L) == pytest.approx(1 / np.mean(np.log(np.arange(1, L + 1))), rel=1e-12)
    layer = _layer(NormalizerSpec("ssmax", {"s": inverse_mean_log_n(L)}))
    np.testing.assert_allclose(layer.normalizer.s[...], np.full((N, 1, 1), inverse_mean_log_n(L)), rtol=1e-6)


@pytest.mark.parametrize("w", [-1e30, -1e4, -50.0, -4.6, 0.0, 4.6, 50.0, 1e4, 1e30, -jnp.inf, jnp.inf])
def test_alpha_stays_in_its_range_for_any_logit(w):
    alpha = float(alpha_from_logit(jnp.float32(w)))
    assert np.float32(1.01) <= alpha <= 2.0


def test_learned_alpha_at_its_ends_matches_sparsemax_and_near_softmax():
    # alpha clipped at 2 is sparsemax exactly.
    learned = _layer(NormalizerSpec("entmax", {"alpha": 1.5}, learn=("alpha",)))
    learned.normalizer.alpha_logit[...] = jnp.full((N, 1, 1), 1e4)
    sparse = _layer("sparsemax")
    x = _x(12)
    np.testing.assert_allclose(learned(x), sparse(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qkv_features": 10}, r"qkv_features \(10\) must be divisible by num_heads"),
        ({"implementation": "flash"}, r"implementation='flash'; accepted"),
        ({"rope_theta": -1.0}, r"rope_theta"),
        ({"rope_theta": 1e4, "qkv_features": 12, "num_heads": 4}, r"even head_dim"),
    ],
)
def test_construction_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _layer(**kwargs)


def test_spec_is_hashable_and_a_string_means_its_defaults():
    spec = NormalizerSpec("entmax", params={"alpha": 1.3})
    assert hash(spec) == hash(NormalizerSpec("entmax", params={"alpha": 1.3}))
    assert _layer("ssmax").normalizer_spec == NormalizerSpec("ssmax")


def test_bfloat16_computation_returns_bfloat16_close_to_float32():
    full = _layer("ssmax", rope_theta=10_000.0)
    half = _layer("ssmax", rope_theta=10_000.0, dtype=jnp.bfloat16)
    x = _x(18)
    out = half(x, is_causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), full(x, is_causal=True), rtol=0.05, atol=0.05)
