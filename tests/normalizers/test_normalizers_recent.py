"""The normalizers proposed since SSMax: softmax1, sigmoid, StableMax, softpick, MultiMax.

Values against independent numpy references, the identities that define them, masking and
limits as for every normalizer here, float64 finite differences for the logits and every
parameter, the learned MultiMax of an attention layer, and the causal sigmoid's n.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads
from normalizer_configs import RECENT_CONFIGS, recent_configs

from attnlab import normalizers as N
from attnlab.attention import dot_product_attention
from attnlab.nn import MultiHeadAttention, NormalizerSpec

# Well separated logits, none within 0.05 of a kink (0 for softpick and stablemax; -0.5, 0, 0.5
# and 1 for the MultiMax bends used here); row 1 has nothing valid, rows 2 and 3 are masked.
X = np.array(
    [
        [0.55, -1.10, 2.05, 0.30, 1.15, -0.40],
        [1.00, 2.00, 3.00, 4.00, 5.00, 6.00],
        [-2.10, 0.70, 0.20, 1.90, -0.15, 0.80],
        [-3.00, -0.65, -0.30, -1.20, -2.20, -0.90],
    ]
)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 1, 1]], bool)


def _reference(name: str, x: np.ndarray, mask: np.ndarray, **params) -> np.ndarray:
    """Row by row in float64 numpy, straight from the definitions (masked entries dropped)."""
    out = np.zeros_like(x, dtype=np.float64)
    for i, (row, keep) in enumerate(zip(x.astype(np.float64), mask, strict=True)):
        z = row[keep]
        if z.size == 0:
            continue
        if name == "softmax1":
            p = np.exp(z) / (1.0 + np.exp(z).sum())
        elif name == "sigmoid":
            bias = params.get("bias", -np.log(z.size))
            p = 1.0 / (1.0 + np.exp(-(z + bias)))
        elif name == "stablemax":
            s = np.array([v + 1.0 if v >= 0 else 1.0 / (1.0 - v) for v in z])
            p = s / s.sum()
        elif name == "softpick":
            p = np.maximum(np.exp(z) - 1.0, 0.0) / (np.abs(np.exp(z) - 1.0).sum() + params.get("eps", 1e-6))
        else:
            b_low, b_high = params.get("b_low", 0.0), params.get("b_high", 1.0)
            slope_low, slope_high = params.get("slope_low", 2.0), params.get("slope_high", 0.5)
            phi = np.where(z < b_low, b_low + slope_low * (z - b_low), z)
            phi = np.where(z > b_high, b_high + slope_high * (z - b_high), phi)
            p = np.exp(phi - phi.max()) / np.exp(phi - phi.max()).sum()
        out[i, keep] = p
    return out


@recent_configs
def test_values_match_the_definitions_and_masked_entries_get_nothing(value_and_grad, config):
    name, params = config
    p, g = value_and_grad(config, X, MASK)
    np.testing.assert_allclose(p, _reference(name, X, MASK, **dict(params)), rtol=2e-6, atol=1e-7)
    assert np.all(p[~MASK] == 0) and np.all(g[~MASK] == 0) and np.all(np.isfinite(g))
    # -inf is the same as where=False, value and gradient.
    p_inf, g_inf = value_and_grad(config, np.where(MASK, X, -np.inf))
    np.testing.assert_array_equal(p_inf, p)
    np.testing.assert_array_equal(g_inf, g)
    # A NaN in a masked entry changes nothing.
    p_nan, _ = value_and_grad(config, np.where(MASK, X, np.nan), MASK)
    np.testing.assert_array_equal(p_nan, p)


def test_what_each_row_sums_to():
    z = jnp.asarray(X[[0, 2, 3]], jnp.float32)
    sums = {name: np.asarray(N.get(name)(z)).sum(-1) for name in ("softmax1", "stablemax", "softpick", "multimax")}
    np.testing.assert_allclose(sums["stablemax"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(sums["multimax"], 1.0, rtol=1e-6)
    assert np.all(sums["softmax1"] < 1.0) and np.all(sums["softpick"] <= 1.0)
    # Softpick gives exact zeros wherever z <= 0: the all-negative row is all zeros.
    assert sums["softpick"][2] == 0.0 and np.all(np.asarray(N.softpick(z))[z <= 0] == 0)
    # softmax1 can attend to nothing: a row of very negative logits gets almost no weight.
    assert float(N.softmax1(jnp.full((8,), -30.0)).sum()) < 1e-11
    assert [N.get(name).normalized for name in ("softmax1", "sigmoid", "stablemax", "softpick", "multimax")] == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert not any(N.get(name).shift_invariant for name in ("softmax1", "sigmoid", "stablemax", "softpick"))


def test_identities():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(3, 7)) * 2, jnp.float32)
    # softmax1 is softmax with one more logit, 0, whose weight is dropped.
    with_zero = jax.nn.softmax(jnp.concatenate([z, jnp.zeros((3, 1))], axis=-1))[:, :-1]
    np.testing.assert_allclose(N.softmax1(z), with_zero, rtol=1e-6)
    # sigmoid(z - log n) = e^z / (e^z + n).
    np.testing.assert_allclose(N.sigmoid(z), jnp.exp(z) / (jnp.exp(z) + 7), rtol=1e-5)
    # MultiMax with both slopes 1 is softmax, wherever the bends are.
    np.testing.assert_allclose(N.multimax(z, b_low=-1.0, b_high=0.3, slope_low=1.0, slope_high=1.0), jax.nn.softmax(z))


@pytest.mark.parametrize("name", ["softmax1", "sigmoid", "stablemax", "softpick", "multimax"])
def test_limits_extremes_and_nan(name):
    norm = N.get(name)
    # A row holding +inf keeps only those entries: uniform over them (sigmoid: 1 on each).
    p = np.asarray(norm(jnp.asarray([1.0, jnp.inf, -2.0, jnp.inf])))
    np.testing.assert_array_equal(p, [0, 1, 0, 1] if name == "sigmoid" else [0, 0.5, 0, 0.5])
    # Huge logits stay finite (StableMax's s grows like z itself, so not up to float max: XLA
    # divides through a reciprocal, which underflows); half precision is computed in float32.
    huge = np.asarray(norm(jnp.asarray([1e30, 1.0, -1e30])))
    assert np.all(np.isfinite(huge)) and huge[0] == pytest.approx(1.0, abs=1e-6)
    half = norm(jnp.asarray([[60000.0, -60000.0, 100.0]], jnp.float16))
    assert half.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(half, np.float32)))
    # A NaN in a valid entry: that row's output is NaN there (everywhere but for sigmoid), other rows are untouched.
    rows = norm(jnp.asarray([[0.3, jnp.nan, -1.0], [0.3, 0.2, -1.0]]))
    assert np.isnan(rows[0, 1]) and np.isnan(rows[0]).all() == (name != "sigmoid")
    assert np.all(np.isfinite(rows[1]))


FD = {"order": 1, "modes": ("fwd", "rev"), "eps": 1e-6, "atol": 1e-6, "rtol": 1e-6}


@recent_configs
def test_gradient_wrt_logits_matches_finite_differences(config):
    name, params = config
    with jax.enable_x64(True):
        norm = N.get(name, **dict(params))
        check_grads(functools.partial(norm, where=MASK), (jnp.asarray(X, jnp.float64),), **FD)


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [
        ("sigmoid", "bias", -0.7),
        ("softpick", "eps", 0.3),
        ("multimax", "b_low", 0.1),
        ("multimax", "b_high", 0.6),
        ("multimax", "slope_low", 1.7),
        ("multimax", "slope_high", 0.4),
    ],
)
def test_gradient_wrt_parameters_matches_finite_differences(name, param, value):
    with jax.enable_x64(True):
        x = jnp.asarray(X, jnp.float64)

        def f(v):
            return N.get(name, **{param: v})(x, where=MASK)

        check_grads(f, (jnp.float64(value),), **FD)


def test_parameter_errors_name_the_value():
    with pytest.raises(ValueError, match=r"softpick: parameter 'eps' must be > 0; got \[0.0\]"):
        N.get("softpick", eps=0.0)
    with pytest.raises(ValueError, match=r"multimax: parameter 'slope_low' must be > 0"):
        N.get("multimax", slope_low=-1.0)
    with pytest.raises(ValueError, match=r"multimax: b_low=2.0 must be <= b_high=1.0"):
        N.get("multimax", b_low=2.0)
    with pytest.raises(ValueError, match="does not take temperature; it accepts bias"):
        N.get("sigmoid", temperature=2.0)
    # One value per head, [H, 1, 1] against [B, H, T, S] logits.
    heads = N.get("sigmoid", bias=jnp.asarray([-1.0, 0.0]).reshape(2, 1, 1))(jnp.zeros((1, 2, 3, 4)))
    np.testing.assert_allclose(heads[0, :, 0, 0], jax.nn.sigmoid(jnp.asarray([-1.0, 0.0])))


def test_causal_sigmoid_attention_uses_the_keys_each_query_sees():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 5, 2, 8)) for i in range(3))
    _, aux = dot_product_attention(q, k, v, is_causal=True, normalizer="sigmoid", return_weights=True)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
    t = np.arange(5)
    want = jax.nn.sigmoid(logits - np.log(t + 1)[:, None]) * (t[None, :] <= t[:, None])
    np.testing.assert_allclose(aux["weights"], want, rtol=1e-5, atol=1e-7)


def test_an_attention_layer_learns_multimax_per_head():
    learn = ("b_low", "b_high", "slope_low", "slope_high")
    spec = NormalizerSpec("multimax", learn=learn, params={"slope_low": 3.0})
    start = spec.initial_params(2)
    assert set(start) == set(spec.learned) and start["log_slope_low"][0, 0, 0] == pytest.approx(np.log(3.0))
    assert start["b_high"].shape == (2, 1, 1) and start["b_high"][1, 0, 0] == 1.0
    layer = MultiHeadAttention(num_heads=2, in_features=16, normalizer=spec, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 16))
    grads = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(layer)
    for name in spec.learned:
        value = getattr(grads.normalizer, name)[...]
        assert value.shape == (2, 1, 1) and np.all(np.isfinite(value)) and np.any(value != 0)
    with pytest.raises(ValueError, match="'softmax' cannot learn 'slope_low'; learnable: nothing"):
        NormalizerSpec("softmax", learn=("slope_low",))


def test_every_recent_config_builds():
    for name, params in RECENT_CONFIGS:
        assert N.get(name, **dict(params)).name == name
