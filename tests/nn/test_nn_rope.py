"""apply_rope: known values, the relative-position property, norms, theta, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.nn import apply_rope

SETTINGS = settings(max_examples=25, deadline=None)
# One compiled call per shape instead of one dispatch per primitive keeps the file fast.
rope = jax.jit(apply_rope)
SHAPE = (2, 4, 2, 8)  # [B, T, N, H]


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _complex_reference(x, positions, theta):
    """RoPE as a complex multiplication: (x1 + i x2) * exp(i p omega), in float64 numpy."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    omega = theta ** (-np.arange(0, x.shape[-1], 2) / x.shape[-1])
    angles = np.asarray(positions, np.float64)[..., None] * omega
    angles = angles.reshape(-1, x.shape[1], 1, half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_known_value_first_pair_rotates_by_the_position():
    # omega_0 = 1 for any theta: [1, 0] at position p becomes [cos p, sin p].
    x = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    for p in (0, 1, 3, 100):
        out = rope(x, jnp.array([p]), theta=123.0)
        np.testing.assert_allclose(np.asarray(out).ravel(), [np.cos(p), np.sin(p)], atol=1e-5)


def test_matches_complex_multiplication_reference():
    x = _normal(0, SHAPE)
    positions = jnp.array([[0, 1, 7, 40], [3, 3, 11, 1000]])
    out = rope(x, positions, theta=500.0)
    np.testing.assert_allclose(out, _complex_reference(x, positions, 500.0), rtol=1e-5, atol=1e-5)


def _dots(q, k, m, n):
    """q . k over head_dim after RoPE with every query at position m and every key at n."""
    full = lambda p: jnp.full((SHAPE[1],), p)  # noqa: E731
    return jnp.sum(rope(q, full(m)) * rope(k, full(n)), axis=-1)


@SETTINGS
@given(
    m=st.integers(0, 2000),
    n=st.integers(0, 2000),
    shift=st.integers(-500, 500),
    seed=st.integers(0, 2**16),
)
def test_dot_product_depends_only_on_position_difference(m, n, shift, seed):
    q, k = _normal(seed, SHAPE), _normal(seed + 1, SHAPE)
    m2, n2 = m + shift + 500, n + shift + 500
    np.testing.assert_allclose(_dots(q, k, m, n), _dots(q, k, m2, n2), rtol=2e-3, atol=2e-3)


def test_dot_product_changes_with_position_difference():
    q, k = _normal(0, SHAPE), _normal(1, SHAPE)
    dots = [float(_dots(q, k, 0, d)[0, 0, 0]) for d in range(4)]
    assert len({round(d, 4) for d in dots}) == 4


@SETTINGS
@given(seed=st.integers(0, 2**16), position=st.integers(0, 10**5))
def test_norm_is_preserved(seed, position):
    x = _normal(seed, SHAPE)
    out = rope(x, jnp.full((SHAPE[1],), position))
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_identity_at_position_zero():
    x = _normal(0, SHAPE)
    out = rope(x, jnp.zeros((SHAPE[1],), jnp.int32), theta=7.0)
    np.testing.assert_array_equal(out, x)


def test_theta_changes_the_result():
    x = _normal(0, SHAPE)
    positions = jnp.arange(SHAPE[1])
    base = rope(x, positions, theta=10_000.0)
    raised = rope(x, positions, theta=500_000.0)
    # Position 0 is untouched by any theta; later positions rotate less with a larger base.
    np.testing.assert_array_equal(base[:, 0], raised[:, 0])
    assert float(jnp.max(jnp.abs(base[:, 1:] - raised[:, 1:]))) > 1e-3


def test_theta_may_be_traced():
    x = _normal(0, SHAPE)
    jitted = jax.jit(lambda x, theta: apply_rope(x, jnp.arange(SHAPE[1]), theta=theta))
    np.testing.assert_allclose(jitted(x, 50.0), _complex_reference(x, np.arange(SHAPE[1]), 50.0), rtol=1e-5, atol=1e-5)


def test_batched_positions_apply_per_example():
    x = _normal(0, SHAPE)
    positions = jnp.array([[0, 1, 2, 3], [5, 6, 7, 9]])
    out = rope(x, positions)
    for b in range(2):
        np.testing.assert_allclose(out[b], rope(x, positions[b])[b], rtol=1e-6)


def test_half_precision_is_computed_in_float32_and_returned_as_given():
    x = _normal(0, SHAPE).astype(jnp.bfloat16)
    positions = jnp.array([0, 100, 1000, 10000])
    out = rope(x, positions)
    assert out.dtype == jnp.bfloat16
    expected = rope(x.astype(jnp.float32), positions).astype(jnp.bfloat16)
    np.testing.assert_array_equal(out.astype(jnp.float32), expected.astype(jnp.float32))


@pytest.mark.parametrize(
    ("shape", "positions", "match"),
    [
        ((1, 2, 1, 5), jnp.arange(2), "even"),
        ((1, 2, 1, 4), jnp.arange(2.0), "integers"),
        ((1, 2, 1, 4), jnp.arange(3), "shape"),
        ((2, 4), jnp.arange(2), r"\[batch, seq, heads, head_dim\]"),
    ],
)
def test_errors_name_the_problem(shape, positions, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(jnp.ones(shape), positions)
