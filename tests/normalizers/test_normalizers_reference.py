"""Known values and independent references: REFERENCES.md values, closed forms, KKT conditions,
numpy (float64) sort-based and bisection implementations, alpha limits, SSMax n, stats."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import normalizers as N

HYPOTHESIS = settings(max_examples=40, deadline=None)
ROWS, COLS = 4, 9
finite_logits = hnp.arrays(np.float32, (ROWS, COLS), elements=st.floats(-20, 20, width=32))


# ---------------------------------------------------------------------------------------------
# Independent numpy references (float64). Sort-based exact thresholds for sparsemax and
# 1.5-entmax (Martins & Astudillo 2016; Peters et al. 2019), bisection for general alpha.


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_sparsemax(z):
    z = np.asarray(z, np.float64)
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        srt = np.sort(row)[::-1]
        cumsum = np.cumsum(srt)
        k = np.arange(1, row.size + 1)
        k_star = k[1 + k * srt > cumsum].max()
        tau = (cumsum[k_star - 1] - 1) / k_star
        out[idx] = np.maximum(row - tau, 0)
    return out


def np_entmax15(z):
    z = np.asarray(z, np.float64)
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        y = z[idx] / 2
        srt = np.sort(y)[::-1]
        k = np.arange(1, y.size + 1)
        mean = np.cumsum(srt) / k
        spread = np.array([np.sum((srt[:j] - mean[j - 1]) ** 2) for j in k])
        tau = mean - np.sqrt(np.maximum(0, (1 - spread) / k))
        k_star = np.sum(tau <= srt)
        out[idx] = np.maximum(y - tau[k_star - 1], 0) ** 2
    return out


def np_entmax_bisect(z, alpha, iters=200):
    """alpha-entmax by bisection on tau in [(a-1) max z - 1, (a-1) max z - n^(1-a)]; alpha per row ok."""
    z = np.asarray(z, np.float64)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (*z.shape[:-1], 1))
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        a = float(alpha[idx][0])
        if a == 1.0:
            out[idx] = np_softmax(z[idx])
            continue
        u = (a - 1) * z[idx]
        lo, hi = u.max() - 1, u.max() - u.size ** (1 - a)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if np.sum(np.maximum(u - mid, 0) ** (1 / (a - 1))) >= 1:
                lo = mid
            else:
                hi = mid
        p = np.maximum(u - 0.5 * (lo + hi), 0) ** (1 / (a - 1))
        out[idx] = p / p.sum()
    return out


def test_numpy_references_agree_with_each_other():
    # The references are only useful if they are right: bisection at alpha = 2 and 1.5 must
    # reproduce the sort-based sparsemax and 1.5-entmax, and alpha -> 1 approaches softmax.
    z = np.random.default_rng(0).normal(size=(6, 11)) * 3
    np.testing.assert_allclose(np_entmax_bisect(z, 2.0), np_sparsemax(z), atol=1e-12)
    np.testing.assert_allclose(np_entmax_bisect(z, 1.5), np_entmax15(z), atol=1e-12)
    np.testing.assert_allclose(np_entmax_bisect(z, 1.0 + 1e-6), np_softmax(z), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Reference values (REFERENCES.md)


def test_sparsemax_and_entmax15_reference_values():
    z = jnp.array([-2.0, 0.0, 0.5])
    np.testing.assert_allclose(np.asarray(N.sparsemax(z)), [0.0, 0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(np.asarray(N.entmax15(z)), [0.0, 0.3260, 0.6740], atol=1e-4)
    np.testing.assert_allclose(np.asarray(N.entmax(z, alpha=2.0)), [0.0, 0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(np.asarray(N.entmax(z, alpha=1.5)), [0.0, 0.3260, 0.6740], atol=1e-4)
    assert float(N.sparsemax(z)[0]) == 0.0
    assert float(N.entmax15(z)[0]) == 0.0


def test_entmax_alpha_133_reference_values_and_alpha_derivative(normalize):
    z = jnp.array([[-1.0, 0.0, 0.5], [1.0, 2.0, 3.5]])
    expected = [[0.0460, 0.3276, 0.6264], [0.0026, 0.1012, 0.8963]]
    np.testing.assert_allclose(np.asarray(normalize("entmax", z, alpha=1.33)), expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(normalize("entmax", z, alpha=jnp.array(1.33))), expected, atol=1e-4)
    dp00 = jax.grad(lambda a: normalize("entmax", z, alpha=a)[0, 0])(jnp.array(1.33))
    np.testing.assert_allclose(float(dp00), -0.2562, atol=1e-4)
    # and independently: a central difference of the float64 numpy bisection reference
    h = 1e-5
    fd = (np_entmax_bisect(z, 1.33 + h)[0, 0] - np_entmax_bisect(z, 1.33 - h)[0, 0]) / (2 * h)
    np.testing.assert_allclose(float(dp00), fd, atol=1e-4)


def test_softmax_cat_dog_bird():
    # REFERENCES.md lists softmax([5, 2, -1]) = [0.952, 0.047, 0.001]: rounded figures that are
    # off in the last digit (exact: [0.9503, 0.0473, 0.0024]), so the test uses the math.
    z = np.array([5.0, 2.0, -1.0])
    exact = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(exact, [0.9503, 0.0473, 0.0024], atol=1e-4)
    np.testing.assert_allclose(np.asarray(N.softmax(jnp.asarray(z, jnp.float32))), exact, rtol=1e-6)


def test_two_input_closed_forms(normalize):
    t = np.linspace(-3.0, 3.0, 601)
    rows = jnp.asarray(np.stack([t, np.zeros_like(t)], -1), jnp.float32)
    sparse = np.asarray(normalize("sparsemax", rows))[:, 0]
    np.testing.assert_allclose(sparse, np.clip((t + 1) / 2, 0, 1), atol=1e-6)
    ent = np.asarray(normalize("entmax15", rows))[:, 0]
    inside = np.abs(t) <= 2
    t_in = t[inside]
    np.testing.assert_allclose(ent[inside], ((t_in / 2 + np.sqrt(2 - t_in**2 / 4)) / 2) ** 2, atol=1e-6)
    np.testing.assert_array_equal(ent[t > 2], 1.0)
    np.testing.assert_array_equal(ent[t < -2], 0.0)
    # the same through the general alpha code path
    ent_dynamic = np.asarray(normalize("entmax", rows, alpha=jnp.array(1.5)))[:, 0]
    np.testing.assert_allclose(ent_dynamic, ent, atol=2e-6)


@pytest.mark.parametrize(
    ("n", "rounded_softmax", "rounded_ssmax"), [(100, 0.600, 0.995), (1000, 0.129, 0.9996), (10000, 0.0146, 1.0)]
)
def test_ssmax_paper_figure_1(normalize, n, rounded_softmax, rounded_ssmax):
    x = jnp.full((n,), -2.0).at[n // 3].set(3.0)
    p_soft = np.asarray(normalize("softmax", x))
    p_ss = np.asarray(normalize("ssmax", x, s=0.43))
    assert p_soft.argmax() == n // 3
    assert p_ss.argmax() == n // 3
    np.testing.assert_allclose(p_soft.max(), 1 / (1 + (n - 1) * np.exp(-5.0)), rtol=1e-5)
    # s log n * (3 - (-2)) = 0.43 * 5 * log n = 2.15 log n
    np.testing.assert_allclose(p_ss.max(), 1 / (1 + (n - 1) * n**-2.15), rtol=1e-5)
    np.testing.assert_allclose(p_ss.sum(), 1.0, rtol=1e-5)
    # the rounded figures quoted in REFERENCES.md
    np.testing.assert_allclose(p_soft.max(), rounded_softmax, rtol=5e-3)
    np.testing.assert_allclose(p_ss.max(), rounded_ssmax, atol=5e-4)


# ---------------------------------------------------------------------------------------------
# KKT / projection


@HYPOTHESIS
@given(z=finite_logits)
def test_sparsemax_kkt(normalize, z):
    p = np.asarray(normalize("sparsemax", z), np.float64)
    z = z.astype(np.float64)
    for zr, pr in zip(z, p, strict=True):
        support = pr > 0
        assert support.any()
        tau = zr[support] - pr[support]
        np.testing.assert_allclose(tau, tau.mean(), atol=2e-5)  # z_i - p_i = tau on the support
        assert np.all(zr[~support] <= tau.mean() + 2e-5)  # z_i <= tau off it


@HYPOTHESIS
@given(z=finite_logits, seed=st.integers(0, 2**32 - 1))
def test_sparsemax_is_the_euclidean_projection_onto_the_simplex(normalize, z, seed):
    p = np.asarray(normalize("sparsemax", z), np.float64)
    z = z.astype(np.float64)
    rng = np.random.default_rng(seed)
    candidates = np.concatenate(
        [rng.dirichlet(np.full(COLS, 0.3), size=(64,)), rng.dirichlet(np.ones(COLS), size=(64,)), np.eye(COLS)]
    )
    for zr, pr in zip(z, p, strict=True):
        best = np.sum((pr - zr) ** 2)
        others = np.sum((candidates - zr) ** 2, axis=-1)
        assert np.all(best <= others + 1e-4)


@HYPOTHESIS
@given(z=finite_logits)
def test_entmax15_kkt(normalize, z):
    p = np.asarray(normalize("entmax15", z), np.float64)
    z = z.astype(np.float64)
    for zr, pr in zip(z, p, strict=True):
        support = pr > 0
        tau = zr[support] / 2 - np.sqrt(pr[support])  # z_i/2 - tau = sqrt(p_i) on the support
        np.testing.assert_allclose(tau, tau.mean(), atol=2e-5)
        assert np.all(zr[~support] / 2 <= tau.mean() + 2e-5)  # z_i/2 <= tau off it


@pytest.mark.parametrize("alpha", [1.2, 1.7, 2.5])
def test_general_entmax_kkt(normalize, alpha):
    z = np.random.default_rng(5).normal(size=(8, 12)) * 2
    p = np.asarray(normalize("entmax", jnp.asarray(z, jnp.float32), alpha=alpha), np.float64)
    for zr, pr in zip(z, p, strict=True):
        support = pr > 0
        tau = (alpha - 1) * zr[support] - pr[support] ** (alpha - 1)
        np.testing.assert_allclose(tau, tau.mean(), atol=1e-4)
        assert np.all((alpha - 1) * zr[~support] <= tau.mean() + 1e-4)


# ---------------------------------------------------------------------------------------------
# Against the numpy references


@HYPOTHESIS
@given(z=finite_logits)
def test_sparsemax_and_entmax15_match_sort_based_references(normalize, z):
    np.testing.assert_allclose(np.asarray(normalize("sparsemax", z)), np_sparsemax(z), atol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize("entmax15", z)), np_entmax15(z), atol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize("softmax", z)), np_softmax(z), atol=1e-6)


# float32 tolerance per alpha: for alpha > 2, p = gap^(1/(alpha-1)) amplifies errors in the
# threshold on entries just inside the support: at alpha = 3 an error of k float32 ulps near
# tau ~ -1 (6e-8 each) moves such an entry by up to sqrt(k * 6e-8), 2.4e-4 for one ulp (a
# gap of 1e-8, below float32 resolution, still carries p = 1e-4). The search stops once its
# bracket is 2 eps wide (up to ~4 ulps), so allow 1e-3 there; float64 is checked to 1e-10.
ALPHAS = {1.2: 1e-5, 1.3: 1e-5, 1.7: 1e-5, 2.5: 1e-4, 3.0: 1e-3}


@pytest.mark.parametrize("alpha", list(ALPHAS))
@HYPOTHESIS
@given(z=finite_logits)
def test_entmax_matches_bisection_reference(normalize, alpha, z):
    expected = np_entmax_bisect(z, alpha)
    np.testing.assert_allclose(np.asarray(normalize("entmax", z, alpha=alpha)), expected, atol=ALPHAS[alpha])


@pytest.mark.parametrize("alpha", list(ALPHAS))
def test_entmax_float64_matches_bisection_reference_tightly(normalize, alpha):
    rng = np.random.default_rng(6)
    z = np.concatenate([rng.normal(size=(6, 10)) * s for s in (0.3, 2.0, 8.0)])
    expected = np_entmax_bisect(z, alpha)
    with jax.enable_x64(True):
        got = normalize("entmax", jnp.asarray(z, jnp.float64), alpha=jnp.float64(alpha))
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-10)


def test_long_rows_match_references(normalize):
    rng = np.random.default_rng(7)
    z = (rng.normal(size=(3, 1000)) * np.array([[0.5], [3.0], [30.0]])).astype(np.float32)
    np.testing.assert_allclose(np.asarray(normalize("sparsemax", z)), np_sparsemax(z), atol=1e-6)
    np.testing.assert_allclose(np.asarray(normalize("entmax15", z)), np_entmax15(z), atol=1e-6)
    np.testing.assert_allclose(np.asarray(normalize("entmax", z, alpha=1.3)), np_entmax_bisect(z, 1.3), atol=1e-6)


def test_keras_sparsemax_threshold_regression(normalize):
    # Keras 3 once returned all zeros for [1, 0.9, 0.8]
    p = np.asarray(normalize("sparsemax", jnp.array([1.0, 0.9, 0.8])))
    np.testing.assert_allclose(p, [0.4333333, 0.3333333, 0.2333333], atol=1e-6)


def test_ties(normalize):
    z = jnp.array([[1.0, 1.0, 1.0, -5.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for name in ("sparsemax", "entmax15"):
        p = np.asarray(normalize(name, z))
        np.testing.assert_allclose(p[0], [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-6)
        np.testing.assert_allclose(p[2], 0.25, atol=1e-6)
        assert p[1, 0] == p[1, 1]
    np.testing.assert_allclose(np.asarray(normalize("sparsemax", z))[1], [0.5, 0.5, 0, 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Alpha limits and array alpha


X_HEADS = jnp.asarray(np.random.default_rng(8).normal(size=(2, 4, 3, 7)) * 2, jnp.float32)


def test_alpha_limits_select_the_named_mappings():
    # through the public functional API (eager)
    x = X_HEADS
    soft, sparse, ent15 = (np.asarray(f(x)) for f in (N.softmax, N.sparsemax, N.entmax15))
    np.testing.assert_array_equal(np.asarray(N.entmax(x, alpha=1.0)), soft)
    np.testing.assert_array_equal(np.asarray(N.entmax(x, alpha=1)), soft)
    np.testing.assert_array_equal(np.asarray(N.entmax(x, alpha=2.0)), sparse)
    np.testing.assert_array_equal(np.asarray(N.entmax(x, alpha=1.5)), ent15)
    np.testing.assert_array_equal(np.asarray(N.entmax(x)), ent15)  # default alpha


def test_array_alpha_at_limits_matches_named_mappings(normalize):
    # arrays go through the general (differentiable-in-alpha) code path
    x = X_HEADS
    np.testing.assert_allclose(
        np.asarray(normalize("entmax", x, alpha=jnp.array(1.0))), np.asarray(normalize("softmax", x)), atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(normalize("entmax", x, alpha=jnp.array(2.0))), np.asarray(normalize("sparsemax", x)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(normalize("entmax", x, alpha=jnp.array(1.5))), np.asarray(normalize("entmax15", x)), atol=1e-6
    )


def test_alpha_close_to_one_is_close_to_softmax(normalize):
    x = X_HEADS
    soft = np.asarray(normalize("softmax", x))
    err_1001 = np.abs(np.asarray(normalize("entmax", x, alpha=jnp.array(1.001))) - soft).max()
    err_101 = np.abs(np.asarray(normalize("entmax", x, alpha=jnp.array(1.01))) - soft).max()
    assert err_1001 < 5e-3
    assert err_1001 < err_101  # and the gap closes as alpha -> 1
    np.testing.assert_allclose(np.asarray(normalize("entmax", x, alpha=1.001)), soft, atol=5e-3)
    # softmax has full support; entmax near 1 is (almost) dense too on these moderate logits
    assert np.all(np.asarray(normalize("entmax", x, alpha=jnp.array(1.001))) > 0)


def test_per_head_alpha_equals_each_head_with_its_scalar_alpha(normalize):
    alphas = [1.0, 1.5, 2.0, 1.3]
    alpha = jnp.asarray(alphas).reshape(4, 1, 1)  # logits [B, H, T, S], alpha [H, 1, 1]
    p = np.asarray(N.entmax(X_HEADS, alpha=alpha))  # eager, concrete array alpha
    # alpha = 1, 1.5, 2 in an array give softmax, 1.5-entmax, sparsemax; 1.3 the scalar entmax
    expected = {
        1.0: normalize("softmax", X_HEADS[:, 0]),
        1.5: normalize("entmax15", X_HEADS[:, 1]),
        2.0: normalize("sparsemax", X_HEADS[:, 2]),
        1.3: normalize("entmax", X_HEADS[:, 3], alpha=1.3),
    }
    for h, a in enumerate(alphas):
        np.testing.assert_allclose(p[:, h], np.asarray(expected[a]), atol=1e-6)


def test_per_head_alpha_inside_jit(normalize):
    alpha = jnp.asarray([1.2, 1.5, 2.0, 2.5]).reshape(4, 1, 1)
    p = np.asarray(normalize("entmax", X_HEADS, alpha=alpha))  # traced alpha
    for h, a in enumerate([1.2, 1.5, 2.0, 2.5]):
        np.testing.assert_allclose(p[:, h], np_entmax_bisect(X_HEADS[:, h], a), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# SSMax / log-n: n semantics


def test_ssmax_causal_rows_use_their_own_n(normalize):
    t = 6
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(t, t)) * 2, jnp.float32)
    causal = np.tril(np.ones((t, t), bool))
    p = np.asarray(normalize("ssmax", x, s=0.8, where=causal))
    for i in range(t):
        # row i equals ssmax of the prefix of length i + 1 (n = i + 1, not the tensor length t)
        np.testing.assert_allclose(p[i, : i + 1], np.asarray(normalize("ssmax", x[i, : i + 1], s=0.8)), atol=1e-6)
        np.testing.assert_allclose(p[i, : i + 1], np_softmax(0.8 * np.log(i + 1) * x[i, : i + 1]), atol=1e-6)
        np.testing.assert_array_equal(p[i, i + 1 :], 0)
    # -inf padding counts as invalid, too
    p_inf = np.asarray(normalize("ssmax", jnp.where(causal, x, -jnp.inf), s=0.8))
    np.testing.assert_array_equal(p_inf, p)
    # the sparse log-n variants follow the same rule
    for name, mapping in [("logn_sparsemax", np_sparsemax), ("logn_entmax15", np_entmax15)]:
        p = np.asarray(normalize(name, x, s=0.8, where=causal))
        for i in range(t):
            expected = mapping(0.8 * np.log(i + 1) * np.asarray(x[i, : i + 1], np.float64))
            np.testing.assert_allclose(p[i, : i + 1], expected, atol=1e-6)
            np.testing.assert_array_equal(p[i, i + 1 :], 0)


def test_ssmax_formula_with_bias(normalize):
    z = np.array([[0.3, -1.2, 2.0, 0.7, -0.4]])
    for s, bias in [(0.43, 0.0), (0.43, 0.5), (1.3, -0.2)]:
        p = np.asarray(normalize("ssmax", jnp.asarray(z, jnp.float32), s=s, bias=bias))
        np.testing.assert_allclose(p, np_softmax((s * np.log(5) + bias) * z), atol=1e-6)


def test_ssmax_explicit_n_overrides_the_valid_count(normalize):
    rng = np.random.default_rng(10)
    z = rng.normal(size=(3, 8)).astype(np.float32)
    mask = np.arange(8) < np.array([[3], [5], [8]])
    p = np.asarray(normalize("ssmax", z, s=0.5, n=1024, where=mask))
    for r in range(3):
        valid = mask[r]
        np.testing.assert_allclose(p[r, valid], np_softmax(0.5 * np.log(1024) * z[r, valid]), atol=1e-6)
    # n per row, laid out like the logits with the normalised axis as size 1
    n_rows = jnp.asarray([[10.0], [100.0], [1000.0]])
    p = np.asarray(normalize("ssmax", z, s=0.5, n=n_rows))
    for r, n in enumerate([10, 100, 1000]):
        np.testing.assert_allclose(p[r], np_softmax(0.5 * np.log(n) * z[r]), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "mapping", "params"),
    [
        ("logn_sparsemax", np_sparsemax, {}),
        ("logn_entmax15", np_entmax15, {}),
        ("logn_entmax", functools.partial(np_entmax_bisect, alpha=1.7), {"alpha": 1.7}),
        ("logn_entmax", np_softmax, {"alpha": 1.0}),
    ],
)
def test_logn_variants_equal_mapping_of_scaled_logits(normalize, name, mapping, params):
    rng = np.random.default_rng(11)
    z = (rng.normal(size=(4, 9)) * 3).astype(np.float32)
    mask = np.arange(9) < np.array([[2], [4], [7], [9]])
    for s, bias in [(0.43, 0.0), (1.2, 0.3)]:
        p = np.asarray(normalize(name, z, s=s, bias=bias, where=mask, **params))
        for r in range(4):
            n = mask[r].sum()
            expected = mapping((s * np.log(n) + bias) * z[r, mask[r]].astype(np.float64))
            np.testing.assert_allclose(p[r, mask[r]], expected, atol=2e-5)
            np.testing.assert_array_equal(p[r, ~mask[r]], 0)


def test_scaled_softmax_is_softmax_of_z_over_temperature(normalize):
    z = np.random.default_rng(12).normal(size=(3, 6)).astype(np.float32) * 3
    for t in [0.1, 0.5, 1.0, 3.0]:
        np.testing.assert_allclose(
            np.asarray(normalize("scaled_softmax", z, temperature=t)), np_softmax(z / t), atol=1e-6
        )
    np.testing.assert_array_equal(np.asarray(normalize("scaled_softmax", z)), np.asarray(normalize("softmax", z)))
    temps = jnp.asarray([[0.5], [1.0], [2.0]])  # one per row
    p = np.asarray(normalize("scaled_softmax", z, temperature=temps))
    for r, t in enumerate([0.5, 1.0, 2.0]):
        np.testing.assert_allclose(p[r], np_softmax(z[r] / t), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Composition: Normalizer(mapping, scale)


def test_normalizer_composition_equals_named_normalizers():
    z = jnp.asarray(np.random.default_rng(13).normal(size=(3, 8)) * 2, jnp.float32)
    mask = jnp.arange(8) < jnp.array([[3], [6], [8]])
    pairs = [
        (N.Normalizer(N.Softmax()), N.softmax(z, where=mask)),
        (N.Normalizer(N.Softmax(), N.Temperature(2.0)), N.scaled_softmax(z, temperature=2.0, where=mask)),
        (N.Normalizer(N.Softmax(), N.LogN(s=0.6, bias=0.1)), N.ssmax(z, s=0.6, bias=0.1, where=mask)),
        (N.Normalizer(N.Sparsemax()), N.sparsemax(z, where=mask)),
        (N.Normalizer(N.Entmax15(), N.LogN()), N.get("logn_entmax15")(z, where=mask)),
        (N.Normalizer(N.Entmax(1.3)), N.entmax(z, alpha=1.3, where=mask)),
        (N.Normalizer(N.Entmax(1.7), N.Temperature(0.5)), N.entmax(2.0 * z, alpha=1.7, where=mask)),
    ]
    for norm, expected in pairs:
        np.testing.assert_allclose(np.asarray(norm(z, where=mask)), np.asarray(expected), atol=1e-6)
    assert N.Normalizer(N.Sparsemax()).sparse
    assert not N.Normalizer(N.Softmax(), N.LogN()).sparse
    assert N.get("ssmax").name == "ssmax"


def _learnable_normalizer():
    return N.Normalizer(N.Entmax(jnp.float32(1.4)), N.LogN(s=jnp.float32(0.6), bias=jnp.float32(0.0)))


_Z_PYTREE = jnp.asarray([[0.3, -1.0, 1.5, 0.2, 0.9]], jnp.float32)


def test_normalizer_is_a_pytree_that_passes_through_jit():
    norm = _learnable_normalizer()
    leaves = jax.tree_util.tree_leaves(norm)
    assert len(leaves) == 3  # alpha, s, bias (n=None is not a leaf)
    p = jax.jit(lambda nm, z: nm(z))(norm, _Z_PYTREE)
    expected = N.get("logn_entmax", alpha=1.4, s=0.6)(_Z_PYTREE)
    np.testing.assert_allclose(np.asarray(p), np.asarray(expected), atol=1e-6)


def test_gradient_with_respect_to_the_normalizer_pytree():
    # The Normalizer docstring: its leaves are the parameters "so a Normalizer can be passed
    # through jit and its parameters learned". jax.grad w.r.t. it returns a Normalizer of
    # cotangents, which must be constructible whatever their values. (Regression: at 6a65e39
    # unflattening re-ran the parameter checks and raised "'alpha' must be >= 1".)
    norm = _learnable_normalizer()
    grads = jax.grad(lambda nm: nm(_Z_PYTREE)[0, 2])(norm)
    expected = jax.grad(lambda a, s, b: N.get("logn_entmax", alpha=a, s=s, bias=b)(_Z_PYTREE)[0, 2], argnums=(0, 1, 2))(
        jnp.float32(1.4), jnp.float32(0.6), jnp.float32(0.0)
    )
    got = (grads.mapping.alpha, grads.scale.s, grads.scale.bias)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5)


def test_tree_map_zeros_like_over_a_normalizer():
    # what optimizers do to build their state (regression: raised "'temperature' must be > 0")
    norm = N.Normalizer(N.Softmax(), N.Temperature(jnp.float32(2.0)))
    zeros = jax.tree.map(jnp.zeros_like, norm)
    assert float(zeros.scale.temperature) == 0.0


def test_registry_metadata():
    assert set(N.NAMES) >= {"softmax", "scaled_softmax", "ssmax", "sparsemax", "entmax15", "entmax"}
    assert N.parameters("ssmax") == {"s": 0.43, "bias": 0.0, "n": None}
    assert N.parameters("softmax") == {}
    assert set(N.parameters("logn_entmax")) == {"alpha", "s", "bias", "n"}
    for name in N.NAMES:
        assert isinstance(N.summary(name), str) and N.summary(name)
        assert N.get(name).name == name
        assert N.get(name, **N.parameters(name)).name == name


# ---------------------------------------------------------------------------------------------
# stats


def test_stats_uniform_and_one_hot():
    n = 8
    uniform = jnp.full((n,), 1.0 / n)
    one_hot = jnp.zeros((n,)).at[3].set(1.0)
    st_ = N.stats
    np.testing.assert_allclose(float(st_.max_weight(uniform)), 1 / n, rtol=1e-6)
    np.testing.assert_allclose(float(st_.max_weight(one_hot)), 1.0)
    np.testing.assert_allclose(float(st_.entropy(uniform)), np.log(n), rtol=1e-6)
    assert float(st_.entropy(one_hot)) == 0.0  # 0 log 0 = 0, not NaN
    assert int(st_.support_size(uniform)) == n
    assert int(st_.support_size(one_hot)) == 1
    np.testing.assert_allclose(float(st_.effective_support(uniform)), n, rtol=1e-6)
    np.testing.assert_allclose(float(st_.effective_support(one_hot)), 1.0)


def test_stats_with_zeros_batches_and_axis():
    p = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.7, 0.2, 0.1, 0.0]])
    st_ = N.stats
    ent = np.asarray(st_.entropy(p))
    assert np.all(np.isfinite(ent))
    np.testing.assert_allclose(
        ent, [np.log(2), np.log(4), -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))], rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(st_.support_size(p)), [2, 4, 3])
    np.testing.assert_allclose(np.asarray(st_.effective_support(p)), [2, 4, 1 / (0.49 + 0.04 + 0.01)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st_.max_weight(p)), [0.5, 0.25, 0.7])
    np.testing.assert_allclose(np.asarray(st_.entropy(p.T, axis=0)), ent, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(st_.support_size(p.T, axis=0)), [2, 4, 3])
    # gradient of the entropy is finite at exact zeros (0 log 0 handled with a safe where)
    g = jax.grad(lambda q: st_.entropy(q).sum())(p)
    assert np.all(np.isfinite(np.asarray(g)))


def test_stats_on_normalizer_outputs(normalize):
    z = jnp.asarray(np.random.default_rng(14).normal(size=(16, 64)) * 3, jnp.float32)
    soft, sparse = normalize("softmax", z), normalize("sparsemax", z)
    assert np.all(np.asarray(N.stats.support_size(soft)) == 64)
    assert np.all(np.asarray(N.stats.support_size(sparse)) < 64)
    assert np.all(np.asarray(N.stats.entropy(sparse)) < np.asarray(N.stats.entropy(soft)))
    assert np.all(np.asarray(N.stats.effective_support(sparse)) <= np.asarray(N.stats.support_size(sparse)) + 1e-4)


@pytest.mark.parametrize("alpha", [2.5, 3.0, jnp.float32(3.0)])
def test_entmax_above_two_near_the_support_edge(alpha):
    # Regression (found by hypothesis in CI): for alpha > 2 the threshold function has unbounded
    # slope at the support's edge, and Newton steps there used to stop early. Two valid entries
    # [0.00195, 0.5]: p = ((alpha-1)(z - max) - tau)_+^(1/(alpha-1)) solved by bisection in float64.
    z = np.array([0.001953125, 0.5])
    q = 1.0 / (float(alpha) - 1.0)
    u = (float(alpha) - 1.0) * (z - z.max())
    lo, hi = -1.0, 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sum(np.clip(u - mid, 0, None) ** q) > 1 else (lo, mid)
    want = np.clip(u - lo, 0, None) ** q
    logits = jnp.zeros((1, 9)).at[0, :2].set(jnp.asarray(z, jnp.float32))
    where = jnp.zeros((1, 9), bool).at[0, :2].set(True)
    got = N.entmax(logits, alpha=alpha, where=where)
    np.testing.assert_allclose(np.asarray(got)[0, :2], want / want.sum(), atol=1e-5)
    assert np.all(np.asarray(got)[0, 2:] == 0)
