"""attnlab.nn.MultiHeadAttention (NNX) and NormalizerSpec: references, learned parameters, options, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import normalizers
from attnlab.nn import MultiHeadAttention, NormalizerSpec, alpha_from_logit, apply_rope, inverse_mean_log_n

B, T, F, N = 2, 6, 16, 4
H = F // N


def _x(seed=0, shape=(B, T, F)):
    return jax.random.normal(jax.random.key(seed), shape)


def _layer(normalizer="softmax", **kwargs):
    kwargs.setdefault("num_heads", N)
    kwargs.setdefault("in_features", F)
    return MultiHeadAttention(normalizer=normalizer, rngs=nnx.Rngs(0), **kwargs)


def _project(layer, x):
    """q, k, v from the layer's own kernels and biases (so the reference shares only the weights)."""

    def proj(lin):
        return jnp.einsum("btf,fnh->btnh", x, lin.kernel[...]) + lin.bias[...]

    return proj(layer.query), proj(layer.key), proj(layer.value)


def _output(layer, attended):
    return jnp.einsum("btnh,nhf->btf", attended, layer.out.kernel[...]) + layer.out.bias[...]


# ------------------------------------------------------------------------------------------------
# References


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


def test_ssmax_with_rope_and_gqa_equals_a_hand_computed_reference():
    layer = _layer("ssmax", num_kv_heads=2, rope_theta=100.0)
    s = jnp.array([0.3, 0.43, 0.7, 1.1]).reshape(N, 1, 1)
    layer.normalizer.s[...] = s
    x = _x(3)
    q, k, v = _project(layer, x)
    q = apply_rope(q, jnp.arange(T), theta=100.0)
    k = apply_rope(k, jnp.arange(T), theta=100.0)
    # causal SSMax: query t sees n = t + 1 keys and its logits are scaled by s log n, folded into q.
    factor = s[:, 0, 0][None, :] * jnp.log(jnp.arange(1, T + 1.0))[:, None]  # [T, N]
    attended = jax.nn.dot_product_attention(q * factor[None, :, :, None], k, v, is_causal=True)
    np.testing.assert_allclose(layer(x, is_causal=True), _output(layer, attended), rtol=1e-5, atol=1e-5)


def test_entmax15_equals_normalizer_applied_to_reference_logits():
    layer = _layer("entmax15")
    x = _x(4)
    q, k, v = _project(layer, x)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
    p = normalizers.entmax15(logits, axis=-1)
    attended = jnp.einsum("bnts,bsnh->btnh", p, v)
    np.testing.assert_allclose(layer(x), _output(layer, attended), rtol=1e-5, atol=1e-5)
    assert float(jnp.mean(p == 0)) > 0.05  # sparse weights: the reference exercises exact zeros


def test_gqa_equals_full_attention_with_repeated_key_value_heads():
    gqa = _layer("ssmax", num_kv_heads=2)
    full = _layer("ssmax")
    assert gqa.key.kernel[...].shape == (F, 2, H)
    nnx.update(full, nnx.state(gqa, nnx.Param).filter(lambda path, _: path[0] in ("query", "out", "normalizer")))
    for name in ("key", "value"):
        src, dst = getattr(gqa, name), getattr(full, name)
        dst.kernel[...] = jnp.repeat(src.kernel[...], N // 2, axis=1)
        dst.bias[...] = jnp.repeat(src.bias[...], N // 2, axis=0)
    x = _x(5)
    np.testing.assert_allclose(gqa(x, is_causal=True), full(x, is_causal=True), rtol=1e-5, atol=1e-5)


def test_query_with_no_visible_key_gives_the_output_bias_and_zero_gradients():
    layer = _layer("ssmax")
    x = _x(2)
    mask = jnp.ones((B, 1, T, T), bool).at[0, :, 2, :].set(False)
    out = layer(x, mask=mask)
    np.testing.assert_allclose(out[0, 2], layer.out.bias[...], atol=1e-6)
    grads = nnx.jit(nnx.grad(lambda layer: jnp.sum(layer(x, mask=mask)[0, 2])))(layer)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads) if g.shape != (F,))


def test_cross_attention_uses_inputs_k_and_inputs_v():
    layer = _layer("softmax", in_kv_features=8)
    xq, xk, xv = _x(0), _x(1, (B, T, 8)), _x(2, (B, T, 8))
    q = jnp.einsum("btf,fnh->btnh", xq, layer.query.kernel[...]) + layer.query.bias[...]
    k = jnp.einsum("btf,fnh->btnh", xk, layer.key.kernel[...]) + layer.key.bias[...]
    v = jnp.einsum("btf,fnh->btnh", xv, layer.value.kernel[...]) + layer.value.bias[...]
    expected = _output(layer, jax.nn.dot_product_attention(q, k, v))
    np.testing.assert_allclose(layer(xq, xk, xv), expected, rtol=1e-5, atol=1e-5)


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
# Learned normalizer parameters


@nnx.jit
@nnx.grad
def _grads(layer, x):
    return jnp.sum(layer(x, is_causal=True) ** 2)


def test_learned_s_has_a_nonzero_finite_gradient_per_head():
    layer = _layer("ssmax")
    assert layer.normalizer.s[...].shape == (N, 1, 1)
    np.testing.assert_allclose(layer.normalizer.s[...], 0.43)
    g = _grads(layer, _x(8)).normalizer.s[...]
    assert g.shape == (N, 1, 1)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g != 0))


def test_learned_bias_starts_at_zero_and_gets_a_gradient():
    layer = _layer(NormalizerSpec("ssmax", learn_bias=True))
    np.testing.assert_array_equal(layer.normalizer.bias[...], np.zeros((N, 1, 1)))
    g = _grads(layer, _x(9)).normalizer
    assert bool(jnp.all(jnp.isfinite(g.bias[...]))) and bool(jnp.all(g.bias[...] != 0))


def test_frozen_s_is_not_a_parameter_and_equals_fixed_ssmax():
    frozen = _layer(NormalizerSpec("ssmax", learn_s=False, s_init=0.6))
    learned = _layer(NormalizerSpec("ssmax", s_init=0.6))
    assert not hasattr(frozen.normalizer, "s")
    assert len(jax.tree.leaves(nnx.state(frozen.normalizer, nnx.Param))) == 0
    x = _x(10)
    np.testing.assert_allclose(frozen(x, is_causal=True), learned(x, is_causal=True), rtol=1e-6)


def test_inverse_mean_log_n_initial_value():
    # mean_{n=1..4} log n = log(4!) / 4, so s = 4 / log 24.
    assert inverse_mean_log_n(4) == pytest.approx(4 / math.log(24))
    L = 1024
    assert inverse_mean_log_n(L) == pytest.approx(1 / np.mean(np.log(np.arange(1, L + 1))), rel=1e-12)
    layer = _layer(NormalizerSpec("ssmax", s_init="inverse_mean_log_n", train_length=L))
    np.testing.assert_allclose(layer.normalizer.s[...], np.full((N, 1, 1), inverse_mean_log_n(L)), rtol=1e-6)


@pytest.mark.parametrize("w", [-1e30, -1e4, -50.0, -4.6, 0.0, 4.6, 50.0, 1e4, 1e30, -jnp.inf, jnp.inf])
def test_alpha_stays_in_its_range_for_any_logit(w):
    alpha = float(alpha_from_logit(jnp.float32(w)))
    assert np.float32(1.01) <= alpha <= 2.0


def test_learned_alpha_starts_at_alpha_init_and_survives_extreme_logits():
    layer = _layer(NormalizerSpec("entmax", learn_alpha=True, alpha_init=1.3))
    np.testing.assert_allclose(alpha_from_logit(layer.normalizer.alpha_logit[...]), 1.3, rtol=1e-6)
    # heads 0 and 3 pushed far past the clip points, heads 1 and 2 inside (alpha 1.3 and 1.7)
    w = jnp.array([-1e4, math.log(0.3 / 0.7), math.log(0.7 / 0.3), 1e4]).reshape(N, 1, 1)
    layer.normalizer.alpha_logit[...] = w
    x = _x(11)
    assert bool(jnp.all(jnp.isfinite(layer(x, is_causal=True))))
    g = _grads(layer, x).normalizer.alpha_logit[...].ravel()
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(g[1:3] != 0))  # inside the range alpha learns
    np.testing.assert_array_equal(g[jnp.array([0, 3])], 0.0)  # clipped heads get no push further out


def test_learned_alpha_at_its_ends_matches_sparsemax_and_near_softmax():
    # alpha clipped at 2 is sparsemax exactly.
    learned = _layer(NormalizerSpec("entmax", learn_alpha=True))
    learned.normalizer.alpha_logit[...] = jnp.full((N, 1, 1), 1e4)
    sparse = _layer("sparsemax")
    x = _x(12)
    np.testing.assert_allclose(learned(x), sparse(x), rtol=1e-4, atol=1e-5)


def test_learned_temperature_starts_at_params_temperature():
    learned = _layer(NormalizerSpec("scaled_softmax", params={"temperature": 2.0}, learn_temperature=True))
    fixed = _layer(NormalizerSpec("scaled_softmax", params={"temperature": 2.0}))
    x = _x(13)
    np.testing.assert_allclose(learned(x), fixed(x), rtol=1e-6)
    g = _grads(learned, x).normalizer.log_temperature[...]
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g != 0))


# ------------------------------------------------------------------------------------------------
# Statistics, RoPE override, dropout


def test_sow_statistics_puts_per_head_per_query_arrays_in_intermediates():
    layer = _layer("entmax15", sow_statistics=True)
    out, intermediates = nnx.capture(layer, nnx.Intermediate)(_x(14), is_causal=True)
    (stats,) = intermediates["attention_statistics"].get_value()
    assert set(stats) == {"max_weight", "entropy", "support_size"}
    for value in stats.values():
        assert value.shape == (B, N, T)
    # query 0 sees one key: all its weight on it, entropy 0, support 1
    np.testing.assert_allclose(stats["max_weight"][..., 0], 1.0)
    np.testing.assert_allclose(stats["support_size"][..., 0], 1.0)
    assert bool(jnp.all(stats["support_size"] <= jnp.arange(1, T + 1)))
    assert out.shape == (B, T, F)


def test_no_statistics_are_sown_by_default():
    layer = _layer("softmax")
    _, intermediates = nnx.capture(layer, nnx.Intermediate)(_x())
    assert "attention_statistics" not in intermediates


def test_sow_weights_gives_rows_summing_to_one():
    layer = _layer("sparsemax")
    _, intermediates = nnx.capture(layer, nnx.Intermediate)(_x(), is_causal=True, sow_weights=True)
    (weights,) = intermediates["attention_weights"].get_value()
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-5)
    assert bool(jnp.all(jnp.triu(weights, 1) == 0))


def test_rope_theta_override_changes_the_output():
    layer = _layer("ssmax", rope_theta=10_000.0)
    x = _x(15)
    base = layer(x, is_causal=True)
    np.testing.assert_allclose(layer(x, is_causal=True, rope_theta=10_000.0), base, rtol=1e-6)
    raised = layer(x, is_causal=True, rope_theta=500_000.0)
    assert float(jnp.max(jnp.abs(raised - base))) > 1e-4
    no_rope = _layer("ssmax")
    assert float(jnp.max(jnp.abs(no_rope(x, is_causal=True) - base))) > 1e-4


def test_positions_shift_invariance_of_self_attention():
    # RoPE depends on relative positions only: shifting all positions leaves the output unchanged.
    layer = _layer("softmax", rope_theta=100.0)
    x = _x(16)
    a = layer(x, is_causal=True)
    b = layer(x, is_causal=True, positions=jnp.arange(T) + 37)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_softmax_dropout_is_applied_only_when_not_deterministic():
    layer = _layer("ssmax", dropout_rate=0.5)
    plain = _layer("ssmax")
    x = _x(17)
    np.testing.assert_allclose(layer(x, deterministic=True), plain(x), rtol=1e-6)
    dropped = layer(x, deterministic=False)
    assert bool(jnp.all(jnp.isfinite(dropped)))
    assert float(jnp.max(jnp.abs(dropped - plain(x)))) > 1e-3
    with pytest.raises(ValueError, match="deterministic"):
        layer(x)


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalizer": "softmaxx"}, r"softmaxx.*softmax, scaled_softmax, ssmax"),
        ({"num_kv_heads": 3}, r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
        ({"qkv_features": 10}, r"qkv_features \(10\) must be divisible by num_heads"),
        ({"normalizer": "entmax15", "dropout_rate": 0.1}, r"dropout.*unsupported.*entmax15"),
        ({"normalizer": "softmax", "dropout_rate": 0.1, "implementation": "chunked"}, r"dropout.*'dense'"),
        ({"implementation": "flash"}, r"implementation='flash'; accepted"),
        ({"rope_theta": -1.0}, r"rope_theta"),
        ({"rope_theta": 1e4, "qkv_features": 12, "num_heads": 4}, r"even head_dim"),
    ],
)
def test_construction_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _layer(**kwargs)


def test_call_time_rope_theta_needs_a_rope_layer():
    with pytest.raises(ValueError, match="built without RoPE"):
        _layer("softmax")(_x(), rope_theta=1e5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "ssmax2"}, r"NormalizerSpec.name='ssmax2'; accepted: softmax"),
        ({"name": "ssmax", "s_init": "mean"}, r"s_init='mean'; accepted: a number > 0 or inverse_mean_log_n"),
        ({"name": "ssmax", "s_init": -0.5}, r"s_init=-0.5"),
        ({"name": "ssmax", "s_init": "inverse_mean_log_n"}, r"needs train_length"),
        ({"name": "ssmax", "s_init": "inverse_mean_log_n", "train_length": 1}, r"train_length must be an int >= 2"),
        ({"name": "ssmax", "learn_alpha": True}, r"learn_alpha applies only to entmax, logn_entmax"),
        ({"name": "softmax", "learn_bias": True}, r"learn_bias applies only to ssmax"),
        ({"name": "entmax", "learn_alpha": True, "alpha_init": 2.0}, r"alpha_init=2.0; accepted"),
        ({"name": "entmax", "learn_alpha": True, "alpha_init": 1.0}, r"alpha_init=1.0; accepted"),
        ({"name": "entmax", "alpha_init": 1.2}, r"alpha_init needs learn_alpha=True"),
        ({"name": "ssmax", "params": {"s": 0.5}}, r"'s' is not accepted here; s is set by s_init"),
        ({"name": "softmax", "params": {"temperature": 2.0}}, r"'softmax' does not take 'temperature'"),
        ({"name": "scaled_softmax", "params": {"temperature": -1.0}}, r"temperature"),
        ({"name": "entmax", "params": {"alpha": 0.5}}, r"alpha"),
        ({"name": "ssmax", "learn_s": 1}, r"learn_s must be True or False"),
    ],
)
def test_spec_errors_name_the_field_and_the_accepted_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormalizerSpec(**kwargs)


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
