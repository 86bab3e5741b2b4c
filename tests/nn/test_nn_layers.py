"""The NNX layer and the Linen layer derived from it, through one adapter: the same checks on both.

`Layer(framework, inputs_q, ...)` builds a layer of either framework and applies it functionally:
parameters (a pure dict, one layout for both) in, output (and what it sowed) out, so gradients
are `jax.grad` of the same function in both cases.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import normalizers
from attnlab.attention import dot_product_attention
from attnlab.nn import LinenMultiHeadAttention, MultiHeadAttention, NormalizerSpec, apply_rope

B, T, F, N = 2, 6, 16, 4
H = F // N
FRAMEWORKS = ("nnx", "linen")


def _x(seed=0, shape=(B, T, F)):
    return jax.random.normal(jax.random.key(seed), shape)


class Layer:
    """An attention layer of `framework` ("nnx" or "linen"), built for inputs like inputs_q/inputs_k."""

    def __init__(self, framework, inputs_q, inputs_k=None, **fields):
        fields.setdefault("num_heads", N)
        self.framework = framework
        if framework == "nnx":
            kv = {} if inputs_k is None else {"in_kv_features": inputs_k.shape[-1]}
            layer = MultiHeadAttention(in_features=inputs_q.shape[-1], **kv, **fields, rngs=nnx.Rngs(0))
            self.graphdef, self.param_state, self.rest = nnx.split(layer, nnx.Param, ...)
            self.params = nnx.to_pure_dict(self.param_state)
        else:
            self.module = LinenMultiHeadAttention(**fields)
            self.params = self.module.init(jax.random.key(0), inputs_q, inputs_k, deterministic=True)["params"]

    def __call__(self, params, *inputs, dropout_key=None, capture=False, **call):
        """Output for `params` (and, with capture, {name: tuple of sown values})."""
        if self.framework == "nnx":
            state = jax.tree.map(lambda x: x, self.param_state)  # fresh variables at this trace level
            nnx.replace_by_pure_dict(state, params)
            layer = nnx.merge(self.graphdef, state, self.rest)
            if dropout_key is not None:
                call["rngs"] = nnx.Rngs(dropout=dropout_key)
            if not capture:
                return layer(*inputs, **call)
            out, sown = nnx.capture(layer, nnx.Intermediate)(*inputs, **call)
            return out, {name: variable.get_value() for name, variable in sown.items()}
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        if not capture:
            return self.module.apply({"params": params}, *inputs, rngs=rngs, **call)
        out, state = self.module.apply({"params": params}, *inputs, rngs=rngs, mutable=["intermediates"], **call)
        return out, dict(state.get("intermediates", {}))


def _project(params, x, name):
    return jnp.einsum("btf,fnh->btnh", x, params[name]["kernel"]) + params[name]["bias"]


def _output(params, attended):
    return jnp.einsum("btnh,nhf->btf", attended, params["out"]["kernel"]) + params["out"]["bias"]


def _differ(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b)))) > 1e-4


# ------------------------------------------------------------------------------------------------
# The computation: dot_product_attention on the layer's own projections


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", ["softmax-mask", "ssmax-gqa-causal-rope", "entmax15-cross-lengths"])
def test_output_equals_dot_product_attention_on_the_projections(framework, case):
    x = _x(1)
    xk = xv = None
    fields, call, reference = {}, {}, {}
    if case == "softmax-mask":
        visible = jnp.arange(T)[None, None, None, :] < jnp.array([6, 3])[:, None, None, None]  # [B, 1, 1, S]
        call["mask"] = reference["mask"] = visible
        normalizer = "softmax"
    elif case == "ssmax-gqa-causal-rope":
        fields = {"normalizer": "ssmax", "num_kv_heads": 2, "rope_theta": 100.0}
        call["is_causal"] = reference["is_causal"] = True
    else:
        xk, xv = x[..., :8], x[..., 8:]  # 8 features, unlike the queries' 16
        fields = {"normalizer": "entmax15"}
        call["key_value_seq_lengths"] = reference["key_value_seq_lengths"] = jnp.array([5, 2])
        normalizer = "entmax15"
    layer = Layer(framework, x, xk, **fields)
    params = layer.params
    if case == "ssmax-gqa-causal-rope":
        s = jnp.array([0.3, 0.43, 0.7, 1.1]).reshape(N, 1, 1)  # distinct per head: a head mix-up shows
        params = {**params, "normalizer": {"s": s}}
        normalizer = normalizers.get("ssmax", s=s)
    inputs = (x,) if xk is None else (x, xk, xv)
    out = layer(params, *inputs, **call)

    keys, values = (x, x) if xk is None else (xk, xv)
    q, k, v = _project(params, x, "query"), _project(params, keys, "key"), _project(params, values, "value")
    if "rope_theta" in fields:
        q, k = apply_rope(q, jnp.arange(T), theta=100.0), apply_rope(k, jnp.arange(T), theta=100.0)
    expected = _output(params, dot_product_attention(q, k, v, normalizer=normalizer, **reference))
    assert out.shape == (B, T, F)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(expected))) > 0.1  # not a comparison of near-zero outputs


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rope_theta_override_and_position_shift(framework):
    x = _x(15)
    layer = Layer(framework, x, normalizer="ssmax", rope_theta=10_000.0)
    params = layer.params
    base = layer(params, x, is_causal=True)
    np.testing.assert_allclose(layer(params, x, is_causal=True, rope_theta=10_000.0), base, rtol=1e-6)
    assert _differ(layer(params, x, is_causal=True, rope_theta=500_000.0), base)
    # RoPE sees relative positions only: shifting every position leaves the output unchanged.
    shifted = layer(params, x, is_causal=True, positions=jnp.arange(T) + 37)
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-5)
    no_rope = Layer(framework, x, normalizer="ssmax")
    assert _differ(no_rope(params, x, is_causal=True), base)
    with pytest.raises(ValueError, match="built without RoPE"):
        no_rope(params, x, rope_theta=1e5)


# ------------------------------------------------------------------------------------------------
# Statistics: returned, sown, and the weights


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_returned_and_sown_statistics_agree_with_the_sown_weights(framework):
    x = _x(14)
    plain = Layer(framework, x, normalizer="entmax15")
    params = plain.params
    out, sown = plain(params, x, is_causal=True, capture=True)
    assert sown == {}  # nothing is sown unless asked
    needle = jnp.arange(T) == 1
    returned_out, stats = plain(params, x, is_causal=True, return_statistics=True, mass_keys=needle)
    np.testing.assert_allclose(returned_out, out, rtol=1e-6)
    assert {name: value.shape for name, value in stats.items()} == {
        name: (B, N, T) for name in ("max_weight", "entropy", "support_size", "key_mass")
    }
    # query 0 sees one key: all its weight on it, entropy 0, support 1, and no weight on key 1
    np.testing.assert_allclose(stats["max_weight"][..., 0], 1.0)
    np.testing.assert_allclose(stats["entropy"][..., 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats["support_size"][..., 0], 1.0)
    np.testing.assert_allclose(stats["key_mass"][..., 0], 0.0)

    sowing = Layer(framework, x, normalizer="entmax15", sow_statistics=True)
    _, sown = sowing(params, x, is_causal=True, sow_weights=True, capture=True)
    ((sown_stats,), (weights,)) = sown["attention_statistics"], sown["attention_weights"]
    for name in ("max_weight", "entropy", "support_size"):
        np.testing.assert_allclose(sown_stats[name], stats[name], rtol=1e-6, atol=1e-7)
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-5)
    assert bool(jnp.all(jnp.triu(weights, 1) == 0))
    np.testing.assert_allclose(jnp.max(weights, -1), stats["max_weight"], rtol=1e-6)
    np.testing.assert_allclose(weights[..., 1], stats["key_mass"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jnp.sum(weights > 0, -1), stats["support_size"])


# ------------------------------------------------------------------------------------------------
# Dropout policy


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dropout_applies_only_when_not_deterministic(framework):
    x = _x(17)
    layer = Layer(framework, x, normalizer="ssmax", dropout_rate=0.5)
    params = layer.params
    plain = Layer(framework, x, normalizer="ssmax")(params, x)
    np.testing.assert_allclose(layer(params, x, deterministic=True), plain, rtol=1e-6)
    dropped = layer(params, x, deterministic=False, dropout_key=jax.random.key(1))
    assert bool(jnp.all(jnp.isfinite(dropped))) and _differ(dropped, plain)
    np.testing.assert_array_equal(layer(params, x, deterministic=False, dropout_key=jax.random.key(1)), dropped)
    assert _differ(layer(params, x, deterministic=False, dropout_key=jax.random.key(2)), dropped)
    with pytest.raises(ValueError, match="deterministic"):
        layer(params, x)
    # the call's deterministic overrides the constructor's
    fixed = Layer(framework, x, normalizer="ssmax", dropout_rate=0.5, deterministic=True)
    np.testing.assert_allclose(fixed(params, x), plain, rtol=1e-6)
    again = fixed(params, x, deterministic=False, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(again, dropped)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"normalizer": "entmax15", "dropout_rate": 0.1}, r"dropout.*unsupported.*entmax15"),
        ({"normalizer": "softmax", "dropout_rate": 0.1, "implementation": "chunked"}, r"dropout.*'dense'"),
        ({"num_kv_heads": 3}, r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
        ({"normalizer": "softmaxx"}, r"'softmaxx'.*softmax, scaled_softmax, ssmax"),
    ],
)
def test_configuration_errors_name_the_field(framework, fields, match):
    with pytest.raises(ValueError, match=match):
        Layer(framework, _x(), **fields)


# ------------------------------------------------------------------------------------------------
# Learned normalizer parameters


LEARNING = {  # a normalizer, the NormalizerSpec options that make the layer learn its parameters
    "ssmax-s-bias": ("ssmax", {"learn": ("s", "bias")}),
    "entmax-alpha": ("entmax", {"params": {"alpha": 1.3}, "learn": ("alpha",)}),
    "scaled_softmax-temperature": ("scaled_softmax", {"params": {"temperature": 2.0}, "learn": ("temperature",)}),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("learning", LEARNING)
def test_learned_normalizer_parameters_get_gradients_per_head(framework, learning):
    name, options = LEARNING[learning]
    spec = NormalizerSpec(name, **options)
    x = _x(8)
    layer = Layer(framework, x, normalizer=spec)
    assert set(layer.params["normalizer"]) == set(spec.learned)
    params = layer.params
    if name == "entmax":
        # alpha = clip(1 + sigmoid(w), 1.01, 2): heads 0 and 3 far past the clip points, 1 and 2
        # inside (alpha 1.3 and 1.7)
        w = jnp.array([-1e4, np.log(0.3 / 0.7), np.log(0.7 / 0.3), 1e4]).reshape(N, 1, 1)
        params = {**params, "normalizer": {"alpha_logit": w}}
    # jit: the two layers lower to the same program, which the second gets from the compilation cache
    grads = jax.jit(jax.grad(lambda params: jnp.sum(layer(params, x, is_causal=True) ** 2)))(params)
    for learned in spec.learned:
        g = grads["normalizer"][learned].ravel()
        assert g.shape == (N,) and bool(jnp.all(jnp.isfinite(g))), learned
        if name == "entmax":
            assert bool(jnp.all(g[1:3] != 0))  # inside its range alpha learns
            np.testing.assert_array_equal(g[jnp.array([0, 3])], 0.0)  # clipped heads get no push further out
        else:
            assert bool(jnp.all(g != 0)), learned
    for part in ("query", "key", "value", "out"):
        assert bool(jnp.any(grads[part]["kernel"] != 0)), part


# ------------------------------------------------------------------------------------------------
# Inputs: flax's defaults and shapes


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_values_without_keys_are_refused_as_in_flax(framework):
    x = _x()
    layer = Layer(framework, x)
    with pytest.raises(ValueError, match="inputs_k cannot be None when inputs_v is given"):
        layer(layer.params, x, None, _x(1))
    # keys alone are also the values
    np.testing.assert_allclose(layer(layer.params, x, _x(1)), layer(layer.params, x, _x(1), _x(1)), rtol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_inputs_without_a_batch_axis_give_results_without_one(framework):
    x = _x(9)
    layer = Layer(framework, x, normalizer="ssmax", sow_statistics=True)
    call = {"is_causal": True, "return_statistics": True, "sow_weights": True, "capture": True}
    (out, stats), sown = layer(layer.params, x[1], key_value_seq_lengths=4, **call)
    (batched, batched_stats), batched_sown = layer(layer.params, x[1:], key_value_seq_lengths=jnp.array([4]), **call)
    assert out.shape == (T, F)
    np.testing.assert_allclose(out, batched[0], rtol=1e-6)
    for name, value in stats.items():
        assert value.shape == (N, T)
        np.testing.assert_allclose(value, batched_stats[name][0], rtol=1e-6)
    assert sown["attention_weights"][0].shape == (N, T, T)
    np.testing.assert_allclose(sown["attention_weights"][0], batched_sown["attention_weights"][0][0], rtol=1e-6)
    assert sown["attention_statistics"][0]["entropy"].shape == (N, T)
    with pytest.raises(ValueError, match=r"\[batch, length, features\] or \[length, features\]"):
        layer(layer.params, x[None])


# ------------------------------------------------------------------------------------------------
# The Linen layer is the NNX layer


def test_linen_fields_are_the_nnx_constructor_arguments_with_the_same_defaults():
    nnx_arguments = inspect.signature(MultiHeadAttention.__init__).parameters
    linen_fields = {name: field for name, field in LinenMultiHeadAttention.__dataclass_fields__.items()}
    del linen_fields["parent"], linen_fields["name"]
    from_inputs_or_rngs = {"self", "in_features", "in_kv_features", "rngs", "keep_rngs"}
    assert set(linen_fields) == set(nnx_arguments) - from_inputs_or_rngs
    for name, field in linen_fields.items():
        default = nnx_arguments[name].default
        assert field.default is default or field.default == default or default is inspect.Parameter.empty, name


def test_parameters_move_between_the_two_layers_unchanged():
    x = _x(10)
    fields = {"normalizer": "ssmax", "num_kv_heads": 2, "rope_theta": 100.0}
    # the same layout, layer norms included (shapes only: nothing is computed)
    nnx_params = nnx.state(
        nnx.eval_shape(lambda: MultiHeadAttention(N, F, normalize_qk=True, **fields, rngs=nnx.Rngs(0))), nnx.Param
    )
    linen_params = jax.eval_shape(LinenMultiHeadAttention(N, normalize_qk=True, **fields).init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx_params)) == jax.tree.map(jnp.shape, linen_params["params"])
    assert "query_ln" in linen_params["params"]
    nnx_layer, linen_layer = Layer("nnx", x, **fields), Layer("linen", x, **fields)
    params = {**nnx_layer.params, "normalizer": {"s": jnp.linspace(0.2, 0.9, N).reshape(N, 1, 1)}}
    call = {"is_causal": True, "rope_theta": 1000.0}
    np.testing.assert_allclose(linen_layer(params, x, **call), nnx_layer(params, x, **call), rtol=1e-6, atol=1e-6)


def test_a_linen_layer_called_twice_keeps_its_parameters_and_sows_once_per_call():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = LinenMultiHeadAttention(N, normalizer="ssmax", sow_statistics=True)
            return layer(layer(x, is_causal=True), is_causal=True)

    x = _x(11)
    out, variables = Twice().init_with_output(jax.random.key(0), x)
    again, state = Twice().apply(variables, x, mutable=["intermediates"])
    np.testing.assert_allclose(again, out, rtol=1e-6)  # both calls at init used the stored parameters
    (first, second) = state["intermediates"]["MultiHeadAttention_0"]["attention_statistics"]
    assert first["entropy"].shape == second["entropy"].shape == (B, N, T)
    assert _differ(first["entropy"], second["entropy"])
