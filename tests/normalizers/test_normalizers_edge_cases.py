"""Edge cases: fully masked rows, extreme and non-finite logits, dtypes, parameter validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from normalizer_configs import EVERY_NAME, all_configs

from attnlab import normalizers as N
from attnlab.normalizers.mappings import softmax_band


def test_configs_cover_every_name():
    assert set(N.NAMES) == EVERY_NAME


names = pytest.mark.parametrize("name", N.NAMES)


SHAPE = (4, 6)  # the shape of the hypothesis inputs in test_normalizers_properties.py, which
# shares the jit-cached `value_and_grad` fixture (tests/conftest.py): one compilation per config
ALL = np.ones(SHAPE, bool)


# ---------------------------------------------------------------------------------------------
# Rows with nothing valid


X = np.array(
    [
        [0.5, -1.0, 2.0, 0.3, 1.1, -0.4],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [-2.0, 0.7, 0.2, 1.9, -0.1, 0.8],
        [0.0, 0.1, -0.3, 1.2, 0.6, -0.9],
    ],
    np.float32,
)
NONE_VALID = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 1, 1]], bool)


@all_configs
@pytest.mark.parametrize("how", ["where", "neg_inf"])
def test_all_masked_row_is_zero_with_zero_finite_gradient(value_and_grad, config, how):
    if how == "where":
        p, g = value_and_grad(config, X, NONE_VALID)
    else:
        p, g = value_and_grad(config, np.where(NONE_VALID, X, -np.inf))
    np.testing.assert_array_equal(p[1], 0.0)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[1], 0.0)
    np.testing.assert_allclose(p.sum(-1), [1, 0, 1, 1], atol=1e-6)
    # the other rows are unaffected: the same as when row 1 is an ordinary row
    ordinary = NONE_VALID.copy()
    ordinary[1] = True
    p_ref, g_ref = value_and_grad(config, X, ordinary)
    np.testing.assert_array_equal(p[[0, 2, 3]], p_ref[[0, 2, 3]])
    np.testing.assert_array_equal(g[[0, 2, 3]], g_ref[[0, 2, 3]])
    assert p_ref[1].sum() > 0.99


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [("scaled_softmax", "temperature", 0.7), ("ssmax", "s", 0.6), ("ssmax", "bias", 0.3), ("entmax", "alpha", 1.4)],
)
def test_all_masked_row_parameter_gradients_are_finite(name, param, value):
    mask = jnp.asarray(NONE_VALID)

    @jax.jit
    @jax.grad
    def grad(v, w):
        return jnp.sum(w * N.get(name, **{param: v})(X, where=mask))

    w = jnp.cos(jnp.arange(24.0)).reshape(SHAPE)
    g = grad(jnp.float32(value), w)
    assert np.isfinite(float(g))
    assert float(g) != 0.0
    # the empty row contributes nothing: the same gradient when its weights are zeroed
    g_rest = grad(jnp.float32(value), w.at[1].set(0.0))
    np.testing.assert_allclose(float(g), float(g_rest), rtol=1e-6)


@names
def test_single_all_masked_row_and_empty_where(normalize, name):
    p = normalize(name, jnp.full((5,), -jnp.inf))
    assert p.shape == (5,) and p.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p), 0.0)
    p = normalize(name, jnp.arange(5.0), where=jnp.zeros((5,), bool))
    np.testing.assert_array_equal(np.asarray(p), 0.0)
    # and a single row with something valid: shape, dtype and sum
    p = normalize(name, jnp.arange(5.0), where=jnp.arange(5) != 2)
    assert p.shape == (5,) and p.dtype == jnp.float32
    if N.get(name).normalized:
        np.testing.assert_allclose(float(p.sum()), 1.0, atol=1e-6)
    assert float(p[2]) == 0.0 and float(p.sum()) > 0


# ---------------------------------------------------------------------------------------------
# Extreme values


EXTREME = np.array(
    [
        [1e30, -1e30, 0.0, 5.0, -1e30, 1e29],
        [-1e30, -1e30, -1e30, 0.0, -1e30, -1e29],
        [3e38, -3e38, 1.0, 2.0, -3e38, -3.4e38],  # differences overflow float32
        [-1e30, -1e30, -1e30, -1e30, -1e30, -1e30],  # all equal: uniform
    ],
    np.float32,
)


@all_configs
def test_huge_logits_give_one_hot_without_overflow(value_and_grad, config):
    p, g = value_and_grad(config, EXTREME)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[0], [1, 0, 0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[1], [0, 0, 0, 1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[2], [1, 0, 0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[3], 1 / 6, atol=1e-6)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize(("name", "param"), [("ssmax", "s"), ("scaled_softmax", "temperature"), ("entmax", "alpha")])
def test_huge_logits_parameter_gradients_are_finite(name, param):
    # factor s log n (> 1 here, n = 16) or 1 / temperature pushes the floored differences past
    # the float32 range; the parameter gradient must stay finite.
    x = jnp.tile(jnp.asarray([3e38, -3e38, 0.0, 1.0], jnp.float32), 4)
    value = {"s": 0.6, "temperature": 0.25, "alpha": 2.5}[param]
    p, g = jax.jit(jax.value_and_grad(lambda v: N.get(name, **{param: v})(x)[0]))(jnp.float32(value))
    assert np.isfinite(float(g))
    np.testing.assert_allclose(float(p), 0.25, atol=1e-6)


@all_configs
def test_positive_infinity_rows_are_uniform_over_the_infinite_entries(value_and_grad, config):
    inf = np.inf
    x = np.array(
        [
            [inf, 1.0, inf, -3.0, 0.0, 2.0],
            [inf, -inf, 2.0, inf, -inf, 1e30],
            [inf, inf, inf, inf, inf, inf],
            [-inf, 7.0, inf, -inf, 1e30, -1e30],
        ],
        np.float32,
    )
    p, g = value_and_grad(config, x)
    np.testing.assert_allclose(p[0], [0.5, 0, 0.5, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[1], [0.5, 0, 0, 0.5, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[2], 1 / 6, atol=1e-7)
    np.testing.assert_allclose(p[3], [0, 0, 1, 0, 0, 0], atol=1e-7)
    assert np.all(np.isfinite(g))


@all_configs
def test_masked_positive_infinity_is_ignored(value_and_grad, config):
    x = X.copy()
    x[0, 0] = x[2, 3] = np.inf
    mask = ALL.copy()
    mask[0, 0] = mask[2, 3] = False
    p, g = value_and_grad(config, x, mask)
    p_ref, g_ref = value_and_grad(config, X, mask)
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_array_equal(g, g_ref)
    assert p[0, 0] == 0.0 and p[2, 3] == 0.0


@all_configs
def test_nan_in_a_masked_entry_does_not_affect_the_output(value_and_grad, config):
    x = X.copy()
    x[0, 0] = x[2, 1] = x[2, 2] = np.nan
    mask = ~np.isnan(x)
    p, g = value_and_grad(config, x, mask)
    p_ref, g_ref = value_and_grad(config, np.where(mask, x, 123.0), mask)
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_array_equal(g, g_ref)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(g))


@all_configs
def test_nan_row_does_not_leak_into_other_rows(value_and_grad, config):
    x = X.copy()
    x[1, 2] = np.nan
    p, g = value_and_grad(config, x)
    p_ref, g_ref = value_and_grad(config, X)
    rows = [0, 2, 3]
    np.testing.assert_array_equal(p[rows], p_ref[rows])
    np.testing.assert_array_equal(g[rows], g_ref[rows])


@all_configs
def test_nan_in_a_valid_entry_makes_the_row_nan(value_and_grad, config):
    # What the math dictates: every output of a row depends on every valid logit (through the
    # normaliser / threshold), so a NaN logit makes the whole row NaN, never a plausible
    # distribution. (Regression: at 6a65e39 softmax([nan, 1, 2]) gave the unnormalised
    # [nan, 2.718, 7.389], and sparsemax / entmax silently dropped the NaN entry.)
    x = X.copy()
    x[1, 2] = np.nan
    p, _ = value_and_grad(config, x)
    assert np.all(np.isnan(p[1])), f"row with a NaN logit gave {p[1]}"


# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("name", ["softmax", "ssmax", "sparsemax", "logn_entmax"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_matches_float32_to_dtype_precision(normalize, name, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 9)) * 3, dtype)
    mask = jnp.asarray(rng.uniform(size=(4, 9)) > 0.2)
    p = normalize(name, x, where=mask)
    assert p.dtype == dtype
    assert p.shape == x.shape
    # same rounded inputs in float32: the only difference is the rounding of the output
    p32 = np.asarray(normalize(name, x.astype(jnp.float32), where=mask))
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(p, np.float32), p32, rtol=eps, atol=1e-7)
    assert np.all(np.asarray(p, np.float32)[~np.asarray(mask)] == 0)
    np.testing.assert_allclose(np.asarray(p, np.float32).sum(-1), 1.0, atol=4 * eps)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_large_logits_do_not_overflow(dtype):
    # float16 overflows at 65504: computing in float32 keeps exp and the scaled logits finite
    x = jnp.asarray([[60000.0, -60000.0, 100.0], [-jnp.inf, 30.0, 12.0]], dtype)
    for name in ("softmax", "ssmax", "sparsemax", "entmax15"):
        p = np.asarray(N.get(name)(x), np.float32)
        assert np.all(np.isfinite(p))
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-2)
        assert p[0, 0] == 1.0


@names
def test_integer_and_bool_input_return_float32(name):
    x_int = jnp.asarray([[3, -1, 0, 2], [1, 1, 1, 1]], jnp.int32)
    p = N.get(name)(x_int)
    assert p.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(p), np.asarray(N.get(name)(x_int.astype(jnp.float32))), atol=0)
    assert N.get(name)(jnp.asarray([True, False, True])).dtype == jnp.float32


def test_float64_stays_float64_with_x64():
    with jax.enable_x64(True):
        x = jnp.asarray([[0.1, -0.3, 0.25, 1.0]], jnp.float64)
        for name in ("softmax", "ssmax", "sparsemax", "entmax15"):
            p = N.get(name)(x)
            assert p.dtype == jnp.float64
            np.testing.assert_allclose(float(p.sum()), 1.0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Parameter validation


@pytest.mark.parametrize("temperature", [0.0, -1.0, np.array([1.0, 0.0])])
def test_nonpositive_temperature_raises(temperature):
    with pytest.raises(ValueError, match=r"'temperature' must be > 0"):
        N.get("scaled_softmax", temperature=temperature)
    with pytest.raises(ValueError, match=r"'temperature' must be > 0"):
        N.scaled_softmax(jnp.zeros(3), temperature=temperature)
    with pytest.raises(ValueError, match=r"'temperature' must be > 0"):
        N.Temperature(temperature)


@pytest.mark.parametrize("alpha", [0.99, 0.0, -2.0, np.array([1.5, 0.5])])
def test_alpha_below_one_raises(alpha):
    for name in ("entmax", "logn_entmax"):
        with pytest.raises(ValueError, match=r"'alpha' must be >= 1"):
            N.get(name, alpha=alpha)
    with pytest.raises(ValueError, match=r"'alpha' must be >= 1"):
        N.entmax(jnp.zeros(3), alpha=alpha)
    with pytest.raises(ValueError, match=r"'alpha' must be >= 1"):
        N.Entmax(alpha)


@pytest.mark.parametrize("s", [0.0, -0.43, jnp.asarray([0.5, -0.1])])
def test_nonpositive_s_raises(s):
    for name in ("ssmax", "logn_sparsemax", "logn_entmax15", "logn_entmax"):
        with pytest.raises(ValueError, match=r"'s' must be > 0"):
            N.get(name, s=s)
    with pytest.raises(ValueError, match=r"'s' must be > 0"):
        N.ssmax(jnp.zeros(3), s=s)
    with pytest.raises(ValueError, match=r"'s' must be > 0"):
        N.LogN(s=s)


def test_explicit_n_below_one_raises():
    with pytest.raises(ValueError, match=r"'n' must be >= 1"):
        N.get("ssmax", n=0)


def test_boundary_values_are_accepted():
    x = jnp.asarray([0.2, -0.1, 0.4])
    np.testing.assert_allclose(np.asarray(N.entmax(x, alpha=1.0)), np.asarray(N.softmax(x)))
    assert np.isfinite(np.asarray(N.ssmax(x, s=1e-6))).all()
    assert np.isfinite(np.asarray(N.scaled_softmax(x, temperature=1e-3))).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown normalizer 'softmax2'") as info:
        N.get("softmax2")
    for name in N.NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        N.parameters("nope")


@pytest.mark.parametrize(
    ("name", "params", "accepted"),
    [
        ("softmax", {"temperature": 2.0}, ["no parameters"]),
        ("ssmax", {"alpha": 1.5}, ["s", "bias", "n"]),
        ("entmax", {"temperatur": 1.0}, ["alpha"]),
        ("logn_entmax", {"beta": 1.0}, ["alpha", "s", "bias", "n"]),
    ],
)
def test_unknown_parameter_lists_accepted_parameters(name, params, accepted):
    with pytest.raises(ValueError, match=f"does not take {next(iter(params))}") as info:
        N.get(name, **params)
    for word in accepted:
        assert word in str(info.value).split("accepts", 1)[1]
    if hasattr(N, name):  # the functional form, too
        with pytest.raises(ValueError, match="does not take"):
            getattr(N, name)(jnp.zeros(3), **params)


@pytest.mark.parametrize(
    ("name", "param", "shape"),
    [
        ("scaled_softmax", "temperature", (3,)),
        ("ssmax", "s", (2, 1, 1)),
        ("ssmax", "bias", (5,)),
        ("entmax", "alpha", (4, 5)),
        ("logn_entmax", "n", (3, 1)),
    ],
)
def test_non_broadcastable_parameter_shape_raises(name, param, shape):
    logits = jnp.zeros((4, 5))  # a per-row parameter has shape (4, 1) or broadcasts to it
    value = jnp.full(shape, 1.5)
    with pytest.raises(ValueError, match=rf"parameter '{param}' has shape \({shape[0]},.*does not broadcast"):
        N.get(name, **{param: value})(logits)


def test_broadcastable_parameter_shapes_are_accepted():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 5)), jnp.float32)
    for shape in [(1,), (3, 1, 1), (2, 3, 4, 1)]:
        p = N.entmax(logits, alpha=jnp.full(shape, 1.3))
        np.testing.assert_allclose(np.asarray(p), np.asarray(N.entmax(logits, alpha=1.3)), atol=1e-6)


def test_traced_parameters_are_not_checked_inside_jit():
    x = jnp.asarray([0.2, -1.0, 0.7, 1.3])

    @jax.jit
    def f(s):
        return N.ssmax(x, s=s)

    np.testing.assert_allclose(np.asarray(f(0.5)), np.asarray(N.ssmax(x, s=0.5)), atol=1e-7)
    # a value that would be rejected if concrete goes through untouched (no error, still a
    # distribution: softmax of negatively scaled logits)
    p = np.asarray(f(-0.5))
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(p, np.asarray(N.softmax(-0.5 * np.log(4) * x)), atol=1e-6)
    g = jax.grad(lambda s: N.ssmax(x, s=s)[3])(0.5)
    assert np.isfinite(float(g)) and float(g) > 0


def test_a_concrete_array_alpha_captured_by_jit_works():
    # A concrete alpha array closed over by a jitted function (not passed as an argument).
    z = jnp.array([[-1.0, 0.0, 0.5], [1.0, 2.0, 3.5]])
    alpha = jnp.float32(1.33)
    got = jax.jit(lambda x: N.entmax(x, alpha=alpha))(z)
    np.testing.assert_allclose(got, N.entmax(z, alpha=1.33), rtol=1e-5, atol=1e-6)
    at_one = jnp.array([[1.0], [1.5]])
    mixed = jax.jit(lambda x: N.entmax(x, alpha=at_one))(z)
    np.testing.assert_allclose(mixed[0], N.softmax(z[0]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# alpha-entmax at and below alpha = 1 (softmax_band)


def _entmax_value_and_grads(x, alpha, cotangent):
    """(p, d<p, c>/dz, d<p, c>/dalpha) with a traced alpha."""

    def f(x, alpha):
        p = N.entmax(x, alpha=alpha)
        return jnp.sum(p * cotangent), p

    (_, p), (gx, ga) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, alpha)
    return p, gx, ga


_traced_entmax = jax.jit(_entmax_value_and_grads)


@jax.jit
def _softmax_value_and_grad(x, cotangent):
    """(softmax(x), d<softmax(x), c>/dx)."""
    return N.softmax(x), jax.grad(lambda x: jnp.sum(N.softmax(x) * cotangent))(x)


def test_traced_alpha_below_one_is_clamped_to_softmax():
    cotangent = np.linspace(-1.0, 1.0, X.shape[1], dtype=np.float32)
    softmax, softmax_grad = _softmax_value_and_grad(X, cotangent)
    for alpha in (0.9, 0.5, -3.0):
        p, gx, ga = _traced_entmax(X, np.float32(alpha), cotangent)
        np.testing.assert_allclose(p, softmax, atol=1e-7)
        np.testing.assert_allclose(gx, softmax_grad, atol=1e-7)
        assert ga == 0.0
    # one alpha per row, some below 1
    alpha = np.array([[0.9], [1.5], [0.0], [2.0]], np.float32)
    p = np.asarray(jax.jit(lambda x, a: N.entmax(x, alpha=a))(X, alpha))
    np.testing.assert_allclose(p[[0, 2]], np.asarray(softmax)[[0, 2]], atol=1e-7)
    np.testing.assert_allclose(p[[1, 3]], N.entmax(X[[1, 3]], alpha=alpha[[1, 3]]), atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alpha_within_the_band_above_one_is_softmax(dtype):
    band = softmax_band(dtype)
    assert band == pytest.approx(np.sqrt(np.finfo(dtype).eps) / 8)
    cotangent = np.linspace(-1.0, 1.0, X.shape[1]).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        x = X.astype(dtype)
        softmax, softmax_grad = _softmax_value_and_grad(x, cotangent)
        # float32 once gave all zeros at 1 + 1e-8 (alpha - 1 rounds to 0 in float32)
        for alpha in (1.0 + band / 10, 1.0 + band / 2, 1.0 + 1e-9):
            static = N.entmax(x, alpha=alpha)
            np.testing.assert_array_equal(static, softmax)
            p, gx, ga = _traced_entmax(x, dtype(alpha), cotangent)
            np.testing.assert_array_equal(p, softmax)
            np.testing.assert_allclose(gx, softmax_grad, atol=10 * np.finfo(dtype).eps)
            assert ga == 0.0
        # just above the band: entmax, finite, within about 2 sqrt(eps) of softmax
        p, gx, ga = _traced_entmax(x, dtype(1.0 + 2 * band), cotangent)
        assert np.isfinite(gx).all() and np.isfinite(ga)
        assert 0 < np.abs(p - softmax).max() < 2 * np.sqrt(np.finfo(dtype).eps)


def test_float32_entmax_error_stays_small_across_alpha_near_one():
    # The band's purpose: float32 rounding in the entmax form grows like eps / (alpha - 1) as alpha
    # -> 1, its distance to softmax shrinks like alpha - 1; with the switch at the band neither
    # exceeds a few 1e-4 (without it: 4e-3 at 1 + 1e-6, all zeros at 1 + 1e-8).
    errors = []
    for delta in (1e-1, 1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-8):
        with jax.enable_x64(True):
            exact = np.asarray(N.entmax(X.astype(np.float64), alpha=1.0 + delta))
        errors.append(np.abs(np.asarray(N.entmax(X, alpha=1.0 + delta)) - exact).max())
    assert max(errors) < 3e-4, errors


def test_logn_entmax_near_one_is_ssmax():
    # logn_entmax scales the logits (s log n) before entmax: at alpha = 1 + 1e-6 float32 rounding
    # gave errors of 7e-3 against ssmax, the limit at alpha = 1.
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32) * 3
    ssmax = N.get("ssmax")
    np.testing.assert_allclose(N.get("logn_entmax", alpha=1 + 1e-6)(x), ssmax(x), atol=1e-7)
    with jax.enable_x64(True):  # above the float64 band: entmax, within alpha - 1 of ssmax
        x64 = x.astype(np.float64)
        near = np.asarray(N.get("logn_entmax", alpha=1 + 1e-6)(x64))
        assert 0 < np.abs(near - np.asarray(ssmax(x64))).max() < 1e-5


@pytest.mark.parametrize("implementation", ["dense"])
def test_masked_attention_makes_no_infinity_under_jax_debug_infs(implementation):
    # jax's own debugging flag raises FloatingPointError on any op that makes an inf; masking and
    # empty rows must not (they used -inf internally).
    from attnlab.attention import dot_product_attention

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, 8))
    mask = jnp.ones((1, 1, 4, 4), bool).at[..., 0, :].set(False)  # query 0 sees nothing
    jax.config.update("jax_debug_infs", True)
    try:
        for name in N.NAMES:
            out = dot_product_attention(
                q, q, q, mask=mask, is_causal=True, normalizer=name, implementation=implementation
            )
            assert bool(jnp.all(out[:, 0] == 0)), name
            N.get(name)(jnp.ones((2, 3)), where=jnp.asarray([[True, False, True], [False, False, False]]))
    finally:
        jax.config.update("jax_debug_infs", False)


@names
def test_an_empty_normalised_axis_gives_an_empty_result(name):
    for shape, axis in (((0,), -1), ((3, 0), -1), ((0, 4), 0), ((0, 4), 1)):
        p = N.get(name)(jnp.zeros(shape), axis=axis)
        assert p.shape == shape and p.dtype == jnp.float32
    grad = jax.grad(lambda z: jnp.sum(N.get(name)(z)))(jnp.zeros((2, 0)))
    assert grad.shape == (2, 0)
