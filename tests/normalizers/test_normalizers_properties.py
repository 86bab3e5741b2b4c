"""Structural properties every normalizer must have, on hypothesis-generated inputs.

Each normalizer is jitted once per configuration (and traced once per shape): the inputs use a
few fixed shapes, always with a mask, so that hypothesis examples never trigger a recompilation.
The `value_and_grad` fixture (tests/conftest.py) is shared with test_normalizers_edge_cases.py,
which uses the same (4, 6) shape.
"""

from __future__ import annotations

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from normalizer_configs import CONFIG_IDS, CONFIGS, EVERY_NAME, all_configs

from attnlab import normalizers as N


def test_configs_cover_every_name():
    assert set(N.NAMES) == EVERY_NAME


# A subset for the mechanics tests (axis, where broadcasting, jit / eager, vmap) that compile a
# fresh variant per configuration: log-n scaling (n per row), a closed form, the general threshold.
FEW = [2, 3, 5]
FEW_CONFIGS = [CONFIGS[i] for i in FEW]
FEW_IDS = [CONFIG_IDS[i] for i in FEW]

ROWS, COLS = 4, 6
HYPOTHESIS = settings(max_examples=30, deadline=None)

finite_logits = hnp.arrays(np.float32, (ROWS, COLS), elements=st.floats(-20, 20, width=32))
masks = hnp.arrays(np.bool_, (ROWS, COLS))
# Logits on a dyadic grid (multiples of 1/8): adding a grid shift is exact in float32, so shift
# invariance can be checked without rounding noise.
grid_logits = hnp.arrays(np.float32, (ROWS, COLS), elements=st.integers(-160, 160).map(lambda i: i / 8))


@functools.cache
def _jitted(config, axis):
    name, params = config
    norm = N.get(name, **dict(params))
    return jax.jit(lambda x, where: norm(x, axis=axis, where=where))


def jitted(config, axis=-1):
    """normalizer(x, where) for a config, jitted once (jit re-traces per shape and dtype).

    where=None is passed as an all-True mask, which keeps one trace per shape (the where=None
    code path is exercised by the other test files). Used for the axis and vmap variants; the
    hypothesis tests use `value_and_grad`.
    """

    def call(x, where=None):
        return _jitted(config, axis)(x, np.ones(np.shape(x), bool) if where is None else where)

    return call


def forward(value_and_grad, config):
    """x, where -> p for a config, through the shared jit-cached value_and_grad fixture."""
    return lambda x, where=None: value_and_grad(config, x, where)[0]


# ---------------------------------------------------------------------------------------------
# Simplex, shape and dtype


@all_configs
@HYPOTHESIS
@given(x=finite_logits, mask=masks)
def test_output_is_a_distribution_over_valid_entries(value_and_grad, config, x, mask):
    p, _ = value_and_grad(config, x, mask)
    assert p.shape == x.shape
    assert p.dtype == jnp.float32
    p = np.asarray(p)
    assert np.all(p >= 0)
    assert np.all(p[~mask] == 0), "masked entries must be exactly 0"
    expected_sums = np.where(mask.any(-1), 1.0, 0.0)
    np.testing.assert_allclose(p.sum(-1), expected_sums, atol=1e-5)


@all_configs
@HYPOTHESIS
@given(x=finite_logits)
def test_unmasked_rows_sum_to_one(value_and_grad, config, x):
    p, _ = value_and_grad(config, x)
    assert p.shape == x.shape
    assert np.all(np.isfinite(p))
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Invariance and equivariance


@all_configs
@HYPOTHESIS
@given(x=grid_logits, mask=masks, shift=st.integers(-400, 400).map(lambda i: i / 8))
def test_shift_invariance(value_and_grad, config, x, mask, shift):
    # log-n scaled names are shift invariant too: a constant shift does not change n.
    norm = forward(value_and_grad, config)
    p = np.asarray(norm(x, mask))
    p_shifted = np.asarray(norm(x + np.float32(shift), mask))
    np.testing.assert_allclose(p_shifted, p, atol=1e-6)


@all_configs
@HYPOTHESIS
@given(x=finite_logits, shift=st.floats(-1000, 1000))
def test_shift_invariance_off_grid(value_and_grad, config, x, shift):
    # Shifting by an arbitrary float rounds the logits (spacing ~6e-5 near 1000), so compare
    # with a tolerance of that order.
    norm = forward(value_and_grad, config)
    shifted = (x.astype(np.float64) + shift).astype(np.float32)
    reference = np.asarray(norm(shifted - np.float32(shift)))
    np.testing.assert_allclose(np.asarray(norm(shifted)), reference, atol=1e-5)


@all_configs
@HYPOTHESIS
@given(x=finite_logits, mask=masks, perm=st.permutations(range(COLS)))
def test_permutation_equivariance(value_and_grad, config, x, mask, perm):
    norm = forward(value_and_grad, config)
    perm = np.asarray(perm)
    p = np.asarray(norm(x, mask))
    p_perm = np.asarray(norm(x[:, perm], mask[:, perm]))
    np.testing.assert_allclose(p_perm, p[:, perm], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Masking


KEEP = 4  # valid entries per row in the masked-vs-removed test (a fixed count: one compact shape)


@all_configs
@HYPOTHESIS
@given(
    x=finite_logits,
    junk=finite_logits,
    orders=st.lists(st.permutations(range(COLS)), min_size=ROWS, max_size=ROWS),
)
def test_masked_row_equals_row_with_masked_entries_removed(value_and_grad, config, x, junk, orders):
    # For ssmax / logn_* this holds because n is the number of valid entries, not COLS.
    mask = np.zeros((ROWS, COLS), bool)
    for r, order in enumerate(orders):
        mask[r, list(order[:KEEP])] = True
    norm = forward(value_and_grad, config)
    x_junk = np.where(mask, x, junk)  # masked entries hold arbitrary other values
    p_masked = np.asarray(norm(x_junk, mask))
    p_compact = np.asarray(norm(x[mask].reshape(ROWS, KEEP)))
    np.testing.assert_allclose(p_masked[mask].reshape(ROWS, KEEP), p_compact, atol=1e-6)
    assert np.all(p_masked[~mask] == 0)


@all_configs
@HYPOTHESIS
@given(x=finite_logits, mask=masks)
def test_neg_inf_logits_behave_exactly_like_where_false(value_and_grad, config, x, mask):
    norm = forward(value_and_grad, config)
    x_neg_inf = np.where(mask, x, -np.inf).astype(np.float32)
    p_where = np.asarray(norm(x, mask))
    p_inf = np.asarray(norm(x_neg_inf))
    p_both = np.asarray(norm(x_neg_inf, mask))
    np.testing.assert_array_equal(p_inf, p_where)
    np.testing.assert_array_equal(p_both, p_where)


@all_configs
@HYPOTHESIS
@given(x=finite_logits, mask=masks)
def test_gradients_of_neg_inf_and_where_false_agree_and_vanish_on_masked_entries(value_and_grad, config, x, mask):
    _, g_where = value_and_grad(config, x, mask)
    assert np.all(np.isfinite(g_where))
    assert np.all(g_where[~mask] == 0)
    # With -inf logits the gradient on the -inf entries is 0 too (not NaN).
    _, g_inf = value_and_grad(config, np.where(mask, x, -np.inf))
    np.testing.assert_array_equal(g_inf, g_where)


@pytest.mark.parametrize("config", FEW_CONFIGS, ids=FEW_IDS)
def test_where_broadcasts_against_logits(config):
    norm = jitted(config)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(ROWS, COLS)), jnp.float32)
    row_mask = np.array([True, False, True, True, False, True])
    p_broadcast = np.asarray(norm(x, row_mask))
    p_full = np.asarray(norm(x, np.broadcast_to(row_mask, (ROWS, COLS))))
    np.testing.assert_array_equal(p_broadcast, p_full)
    assert np.all(p_broadcast[:, ~row_mask] == 0)


# ---------------------------------------------------------------------------------------------
# axis


@pytest.mark.parametrize("config", FEW_CONFIGS, ids=FEW_IDS)
@HYPOTHESIS
@given(x=finite_logits, mask=masks)
def test_axis_zero_equals_moving_the_axis(config, x, mask):
    p_axis0 = np.asarray(jitted(config, axis=0)(x, mask))
    p_moved = np.asarray(jitted(config)(x.T, mask.T)).T
    np.testing.assert_allclose(p_axis0, p_moved, atol=1e-6)
    np.testing.assert_allclose(p_axis0.sum(0), np.where(mask.any(0), 1.0, 0.0), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "param"),
    [("ssmax", "s"), ("entmax", "alpha")],
)
def test_axis_with_per_row_parameter_layout(normalize, name, param):
    # logits [B, S, T] normalised over axis 1: a per-row parameter has shape [B, 1, T]; it must
    # give the same result as moving S last with the parameter moved to [B, T, 1].
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 3)) * 2, jnp.float32)
    value = jnp.asarray(rng.uniform(1.2, 2.4, size=(2, 1, 3)), jnp.float32)
    p_axis1 = np.asarray(normalize(name, x, axis=1, **{param: value}))
    p_last = np.asarray(normalize(name, jnp.moveaxis(x, 1, -1), **{param: jnp.moveaxis(value, 1, -1)}))
    np.testing.assert_allclose(p_axis1, np.moveaxis(p_last, -1, 1), atol=1e-6)
    # and the parameter really is per row: a row equals the call with that row's scalar value
    for b, t in [(0, 2), (1, 0)]:
        scalar = normalize(name, x[b, :, t], **{param: float(value[b, 0, t])})
        np.testing.assert_allclose(p_axis1[b, :, t], np.asarray(scalar), atol=1e-6)


@pytest.mark.parametrize("name", ["sparsemax", "ssmax"])
def test_middle_axis_of_3d_logits(normalize, name):
    axis = -2
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 5)), jnp.float32)
    p = np.asarray(normalize(name, x, axis=axis))
    np.testing.assert_allclose(p.sum(axis), 1.0, atol=1e-5)
    expected = np.moveaxis(np.asarray(normalize(name, jnp.moveaxis(x, axis, -1))), -1, axis)
    np.testing.assert_allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize("axis", [3, -4])
def test_axis_out_of_range_raises(axis):
    with pytest.raises(ValueError, match="axis"):
        N.softmax(jnp.zeros((2, 3, 4)), axis=axis)


# ---------------------------------------------------------------------------------------------
# jit / no-jit variants (chex) and vmap


_VARIANT_X = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32) * 3
_VARIANT_MASK = np.array([[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1]], bool)


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((cid, config) for cid, config in zip(FEW_IDS, FEW_CONFIGS, strict=True))
    def test_jit_and_eager_agree(self, config):
        name, params = config
        norm = N.get(name, **dict(params))
        reference = np.asarray(jitted(config)(_VARIANT_X, _VARIANT_MASK))
        got = np.asarray(self.variant(lambda x, m: norm(x, where=m))(_VARIANT_X, _VARIANT_MASK))
        np.testing.assert_allclose(got, reference, atol=1e-6)
        np.testing.assert_array_equal(got[~_VARIANT_MASK], 0)
        np.testing.assert_allclose(got.sum(-1), [1, 0, 1], atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_traced_parameters_match_concrete_ones(self):
        x = jnp.asarray(_VARIANT_X)

        def fn(x, alpha, s, temperature):
            return (
                N.entmax(x, alpha=alpha),
                N.ssmax(x, s=s, bias=0.1),
                N.scaled_softmax(x, temperature=temperature),
            )

        got = self.variant(fn)(x, jnp.float32(1.4), jnp.float32(0.7), jnp.float32(1.7))
        expected = (
            N.entmax(x, alpha=1.4),
            N.ssmax(x, s=0.7, bias=0.1),
            N.scaled_softmax(x, temperature=1.7),
        )
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6)


@pytest.mark.parametrize("config", FEW_CONFIGS, ids=FEW_IDS)
def test_vmap_over_batch_axis_equals_batched_call(config):
    name, params = config
    norm = N.get(name, **dict(params))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(4, 3, 6)) * 3, jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(4, 3, 6)) > 0.3)
    batched = np.asarray(jitted(config)(x, mask))
    mapped = np.asarray(jax.jit(jax.vmap(lambda x, m: norm(x, where=m)))(x, mask))
    np.testing.assert_allclose(mapped, batched, atol=1e-6)
    # vmap over a non-leading axis
    mapped_axis1 = jax.jit(jax.vmap(lambda x, m: norm(x, where=m), in_axes=1, out_axes=1))(x, mask)
    np.testing.assert_allclose(np.asarray(mapped_axis1), batched, atol=1e-6)


@pytest.mark.parametrize(("name", "param"), [("entmax", "alpha"), ("ssmax", "s"), ("scaled_softmax", "temperature")])
def test_vmap_over_parameter_values(normalize, name, param):
    x = jnp.asarray(_VARIANT_X)
    values = jnp.asarray([1.1, 1.5, 2.0, 2.7], jnp.float32)
    mapped = jax.jit(jax.vmap(lambda v: N.get(name, **{param: v})(x)))(values)
    for i, v in enumerate([1.1, 1.5, 2.0, 2.7]):
        expected = normalize(name, x, **{param: v})
        np.testing.assert_allclose(np.asarray(mapped[i]), np.asarray(expected), atol=2e-6)
