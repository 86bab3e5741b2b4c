"""Gated attention (the `gate` option of the NNX and Linen layers and of `ModelConfig`): each head's
attention output times sigmoid(inputs_q @ W_gate + b_gate), before the output projection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.attention import dot_product_attention
from attnlab.nn import LinenMultiHeadAttention, ModelConfig, MultiHeadAttention, TransformerLM

B, T, F, N, K = 2, 5, 16, 4, 2
H = F // N
FRAMEWORKS = ("nnx", "linen")
GATE_SHAPES = {"headwise": {"kernel": (F, N), "bias": (N,)}, "elementwise": {"kernel": (F, N, H), "bias": (N, H)}}


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, F))


@functools.cache
def _layer(framework, **fields):
    """(params, apply): a layer's initial parameters (a pure dict, one layout in both frameworks) and
    apply(params, x), its causal self-attention output for those parameters. Jitted (one program
    compiles faster than the many small ones of an eager call) and cached, so each layer compiles
    once per input shape in this module."""
    if framework == "nnx":
        layer = MultiHeadAttention(N, F, num_kv_heads=K, **fields, rngs=nnx.Rngs(0))
        graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

        def apply(params, x):
            fresh = jax.tree.map(lambda v: v, state)  # new variables at this trace level
            nnx.replace_by_pure_dict(fresh, params)
            return nnx.merge(graphdef, fresh, rest)(x, is_causal=True)

        return nnx.to_pure_dict(state), jax.jit(apply)
    module = LinenMultiHeadAttention(N, num_kv_heads=K, **fields)
    params = module.init(jax.random.key(0), jnp.zeros((B, T, F)))["params"]
    return params, jax.jit(lambda params, x: module.apply({"params": params}, x, is_causal=True))


def _linear(x, params, spec):
    return jnp.einsum(spec, x, params["kernel"]) + params["bias"]


@functools.partial(jax.jit, static_argnames="gate")
def _direct(params, x, gate):
    """The gated layer written out: causal softmax attention on the projections, each head's output
    times sigmoid of the gate projection of x, then the output projection."""
    q = _linear(x, params["query"], "btf,fnh->btnh")
    k, v = _linear(x, params["key"], "btf,fnh->btnh"), _linear(x, params["value"], "btf,fnh->btnh")
    attended = dot_product_attention(q, k, v, normalizer="softmax", is_causal=True)  # [B, T, N, H]
    if gate == "headwise":
        attended = attended * jax.nn.sigmoid(_linear(x, params["gate"], "btf,fn->btn"))[..., None]
    elif gate == "elementwise":
        attended = attended * jax.nn.sigmoid(_linear(x, params["gate"], "btf,fnh->btnh"))
    return jnp.einsum("btnh,nhf->btf", attended, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("gate", GATE_SHAPES)
def test_gated_output_is_the_ungated_attention_times_sigmoid_of_the_gate_projection(framework, gate):
    x = _x(1)
    params, apply = _layer(framework, gate=gate)
    assert jax.tree.map(jnp.shape, dict(params["gate"])) == GATE_SHAPES[gate]
    # A bias that differs per head (and per dimension): a mix-up of the gate's axes shows.
    bias = jax.random.normal(jax.random.key(2), GATE_SHAPES[gate]["bias"])
    params = {**params, "gate": {"kernel": params["gate"]["kernel"], "bias": bias}}
    out = apply(params, x)
    np.testing.assert_allclose(out, _direct(params, x, gate), rtol=1e-5, atol=1e-6)

    # The same layer without a gate, on the same parameters less the gate's, is the ungated formula;
    # the gate changes the output.
    ungated_params, ungated_apply = _layer(framework)
    ungated = {name: value for name, value in params.items() if name != "gate"}
    assert jax.tree.map(jnp.shape, ungated) == jax.tree.map(jnp.shape, dict(ungated_params))
    plain = ungated_apply(ungated, x)
    np.testing.assert_allclose(plain, _direct(params, x, None), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(out - plain))) > 0.05


def test_the_gate_leaves_the_other_initial_parameters_and_the_ungated_layer_as_they_were():
    x = _x(3)
    default, apply_default = _layer("nnx")
    explicit, apply_explicit = _layer("nnx", gate=None)
    gated, _ = _layer("nnx", gate="elementwise")
    # gate=None: flax's parameter layout (query, key, value, out) and nothing more ...
    flax_layer = nnx.eval_shape(lambda: nnx.MultiHeadAttention(N, F, decode=False, rngs=nnx.Rngs(0)))
    flax_names = set(nnx.to_pure_dict(nnx.state(flax_layer, nnx.Param)))
    assert set(default) == set(explicit) == flax_names == {"query", "key", "value", "out"}
    # ... the same values as the default layer, and as the gated layer's other parameters (the gate
    # is drawn last)
    jax.tree.map(np.testing.assert_array_equal, explicit, default)
    jax.tree.map(np.testing.assert_array_equal, {name: gated[name] for name in default}, default)
    np.testing.assert_array_equal(apply_explicit(explicit, x), apply_default(default, x))
    np.testing.assert_allclose(apply_default(default, x), _direct(default, x, None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gradients_reach_the_gate(framework):
    x = _x(4)
    params, apply = _layer(framework, gate="headwise")
    grads = jax.grad(lambda params: jnp.sum(apply(params, x) ** 2))(params)
    for name in ("kernel", "bias"):
        g = grads["gate"][name]
        assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.any(g != 0, axis=0))), name  # every head


def test_unbatched_inputs_are_gated_as_batched_ones():
    x = _x(5)
    params, apply = _layer("nnx", gate="elementwise")
    np.testing.assert_allclose(apply(params, x[1]), apply(params, x)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["head_wise", "Headwise", True, 1])
def test_a_bad_gate_names_the_value_and_the_accepted_ones(bad):
    accepted = r"accepted: None, 'headwise', 'elementwise'"
    with pytest.raises(ValueError, match=rf"MultiHeadAttention: gate={bad!r} .*{accepted}"):
        MultiHeadAttention(N, F, gate=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"MultiHeadAttention: gate={bad!r} .*{accepted}"):
        LinenMultiHeadAttention(N, gate=bad).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=rf"ModelConfig: gate={bad!r} .*{accepted}"):
        ModelConfig(gate=bad)


@pytest.mark.parametrize(("gate", "per_layer"), [("headwise", 32 * 2), ("elementwise", 32 * 32)])
def test_transformer_with_a_gate_runs_and_grows_by_the_gate_kernels(gate, per_layer):
    tiny = {"num_layers": 2, "width": 32, "num_heads": 2, "vocab_size": 64}
    plain = nnx.eval_shape(lambda: TransformerLM(ModelConfig(**tiny), rngs=nnx.Rngs(0)))  # shapes suffice
    model = TransformerLM(ModelConfig(**tiny, gate=gate), rngs=nnx.Rngs(0))
    # the model's attention has no biases, so the gate has none: width * heads or width * width per layer
    assert model.num_params() - plain.num_params() == 2 * per_layer
    assert all(block.attention.gate is not None for block in model.blocks)
    assert model.config.to_json()["gate"] == gate
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    logits = nnx.jit(lambda model, tokens: model(tokens))(model, tokens)
    assert logits.shape == (2, 8, 64) and bool(jnp.all(jnp.isfinite(logits)))
