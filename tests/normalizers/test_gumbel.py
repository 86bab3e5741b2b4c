"""gumbel_softmax: sampling law, straight-through gradients, one-hot/simplex, masking, keys, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import normalizers as N

# Compilation dominates, so everything about a batch of keys comes from one jitted function: the relaxed
# and the hard sample, their gradients and the noise drawn. Temperature and mask are traced, so each
# (number of keys, logits shape) compiles once for the whole file.


@jax.jit
def _draws(keys, logits, temperature, where):
    w = jnp.cos(1.0 + jnp.arange(logits.shape[-1], dtype=logits.dtype))  # loss = sum(w * y)

    def one(key):
        def loss(x, t, hard):
            return jnp.sum(w * N.gumbel_softmax(key, x, t, hard, where=where))

        out = {"g": jax.random.gumbel(key, logits.shape, jnp.float32)}
        for mode, hard in (("soft", False), ("hard", True)):
            out[mode] = N.gumbel_softmax(key, logits, temperature, hard, where=where)
            out[f"dx_{mode}"], out[f"dt_{mode}"] = jax.grad(loss, argnums=(0, 1))(logits, temperature, hard)
        return out

    return jax.vmap(one)(keys)


def draws(keys, logits, temperature, where=None):
    """For each key: soft, hard (the samples), g (the documented noise, jax.random.gumbel(key, shape)),
    dx_soft, dx_hard (d sum(w * y) / d logits) and dt_soft, dt_hard (... / d temperature), as numpy.

    `temperature` is passed one per row ([..., 1]) so that scalars and per-row values share a compilation.
    """
    logits = np.asarray(logits, np.float32)
    temperature = np.broadcast_to(np.asarray(temperature, np.float32), (*logits.shape[:-1], 1))
    where = np.ones(logits.shape, bool) if where is None else where
    return {k: np.asarray(v) for k, v in _draws(keys, logits, temperature, where).items()}


def softmax_reference(z, valid=True):
    """softmax over the valid entries of the last axis in float64 numpy; 0 elsewhere and on empty rows."""
    valid = np.broadcast_to(valid, z.shape)
    z = np.where(valid, np.asarray(z, np.float64), -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    e = np.where(valid, np.exp(z - np.where(np.isfinite(m), m, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total)


X = np.array(
    [
        [0.5, -1.0, 2.0, 0.3, 1.1, -0.4],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [-2.0, 0.7, 0.2, 1.9, -0.1, 0.8],
    ],
    np.float32,
)
KEYS = jax.random.split(jax.random.key(0), 256)


# ---------------------------------------------------------------------------------------------
# (1) The sampling law


def test_hard_sample_frequencies_match_softmax():
    logits = np.array([1.0, 0.0, -1.0, 2.0], np.float32)
    n = 20_000
    d = draws(jax.random.split(jax.random.key(1), n), logits, 1.0)
    p = softmax_reference(logits)
    freq = d["hard"].mean(axis=0, dtype=np.float64)
    # 4 binomial standard deviations per category (a fixed seed; a false alarm about once in 16000 seeds)
    tolerance = 4.0 * np.sqrt(p * (1.0 - p) / n)
    assert np.all(np.abs(freq - p) <= tolerance), (freq, p, tolerance)
    # Gumbel-max: each sample is the one-hot of argmax(logits + g), g the documented draw from its key
    np.testing.assert_array_equal(d["hard"].argmax(-1), (logits + d["g"]).argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.3, [[1.0], [0.5], [2.0]]], ids=["1", "0.3", "per_row"])
def test_relaxed_sample_is_softmax_of_perturbed_logits(temperature):
    d = draws(KEYS, X, temperature)
    t = np.asarray(temperature, np.float32)
    np.testing.assert_allclose(d["soft"], softmax_reference((X + d["g"]) / t), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# (2) Gradients, (3) one-hot and simplex, (4) the low-temperature limit


def test_gradients_flow_and_straight_through_equals_relaxed():
    d = draws(KEYS, X, 0.7)
    for mode in ("soft", "hard"):
        assert np.all(np.isfinite(d[f"dx_{mode}"])) and np.all(np.isfinite(d[f"dt_{mode}"]))
        # every row gets gradient (on average over keys: a saturated sample's gradient is vanishingly small)
        assert np.all(np.abs(d[f"dx_{mode}"]).sum(-1).mean(0) > 1e-2)
    np.testing.assert_allclose(d["dx_soft"].sum(-1), 0.0, atol=1e-5)  # softmax is shift invariant
    assert np.any(d["dt_soft"] != 0.0)
    np.testing.assert_array_equal(d["dx_hard"], d["dx_soft"])
    np.testing.assert_array_equal(d["dt_hard"], d["dt_soft"])


def test_hard_is_exactly_one_hot_and_relaxed_lies_in_the_simplex():
    d = draws(KEYS, X, 0.5)
    assert set(np.unique(d["hard"])) == {0.0, 1.0}
    np.testing.assert_array_equal(d["hard"].sum(-1), 1.0)
    assert np.all(d["soft"] >= 0.0) and np.all(d["soft"] <= 1.0)
    np.testing.assert_allclose(d["soft"].sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(d["hard"].argmax(-1), d["soft"].argmax(-1))


def test_another_axis_and_half_precision():
    sample = jax.jit(N.gumbel_softmax, static_argnames=("hard", "axis"))
    y = sample(KEYS[0], X.T.astype(jnp.bfloat16), 0.5, True, axis=0)
    assert y.dtype == jnp.bfloat16
    y = np.asarray(y, np.float32)
    assert set(np.unique(y)) == {0.0, 1.0}
    np.testing.assert_array_equal(y.sum(0), 1.0)


def test_relaxed_sample_approaches_hard_as_temperature_falls():
    hard = draws(KEYS, X, 1.0)
    top2 = np.sort(X + hard["g"], axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    previous = np.full(gap.shape, np.inf)
    for temperature in (1.0, 0.3, 0.1, 0.03, 0.01):
        distance = np.abs(draws(KEYS, X, temperature)["soft"] - hard["hard"]).sum(-1)
        # ||y - one_hot||_1 = 2 (1 - y_top) <= 2 (n - 1) exp(-gap / T), which falls with T
        bound = 2.0 * (X.shape[-1] - 1) * np.exp(-gap / temperature)
        assert np.all(distance <= bound + 1e-6), temperature
        assert np.all(distance <= previous + 1e-6), temperature
        previous = distance
    assert np.mean(distance < 1e-4) > 0.8, np.quantile(distance, [0.5, 0.8, 0.9])


# ---------------------------------------------------------------------------------------------
# (5) Masking


MASK = np.array([[1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1]], bool)


@pytest.mark.parametrize("how", ["where", "neg_inf"])
def test_masked_entries_are_zero_never_chosen_and_get_zero_gradient(how):
    if how == "where":  # the masked entries hold the row's largest logits, so a leak would show
        d = draws(KEYS, np.where(MASK, X, 50.0), 0.5, where=MASK)
    else:
        d = draws(KEYS, np.where(MASK, X, -np.inf), 0.5)
    for mode in ("soft", "hard"):
        y, dx = d[mode], d[f"dx_{mode}"]
        np.testing.assert_array_equal(y[:, ~MASK], 0.0)
        np.testing.assert_array_equal(y[:, 1], 0.0)  # the all-masked row
        np.testing.assert_allclose(y[:, [0, 2]].sum(-1), 1.0, atol=1e-6)
        assert np.all(np.isfinite(dx)) and np.all(np.isfinite(d[f"dt_{mode}"]))
        np.testing.assert_array_equal(dx[:, ~MASK], 0.0)
        np.testing.assert_array_equal(d[f"dt_{mode}"][:, 1], 0.0)
        assert np.all(np.abs(dx[:, [0, 2]]).sum(-1).mean(0) > 1e-2)
    # every valid entry of row 0 is drawn at some point: masking removes entries, not whole rows
    assert np.all(d["hard"][:, 0, MASK[0]].sum(0) > 0)
    # relaxed: the softmax over the valid entries of the same perturbed logits
    np.testing.assert_allclose(d["soft"], softmax_reference((X + d["g"]) / 0.5, MASK), rtol=1e-5, atol=1e-7)


def test_positive_infinity_ties_go_to_the_first_index():
    x = X.copy()
    x[0, [1, 4]] = np.inf
    d = draws(KEYS, x, 1.0)
    np.testing.assert_array_equal(d["hard"][:, 0], np.broadcast_to(np.eye(6)[1], (len(KEYS), 6)))
    np.testing.assert_array_equal(d["soft"][:, 0], np.broadcast_to([0, 0.5, 0, 0, 0.5, 0], (len(KEYS), 6)))
    assert np.all(np.isfinite(d["dx_hard"])) and np.all(np.isfinite(d["dt_hard"]))
    np.testing.assert_array_equal(d["hard"][:, 1:], draws(KEYS, X, 1.0)["hard"][:, 1:])  # other rows untouched


# ---------------------------------------------------------------------------------------------
# (6) Keys, (7) validation


def test_same_key_same_sample_different_keys_different_samples():
    first, again = draws(KEYS, X, 1.0)["soft"], draws(KEYS, X, 1.0)["soft"]
    np.testing.assert_array_equal(first, again)
    assert len(np.unique(first.reshape(len(KEYS), -1), axis=0)) == len(KEYS)


@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.25])
def test_non_positive_temperature_raises_naming_the_value(temperature):
    with pytest.raises(ValueError, match=r"gumbel_softmax: .*'temperature' must be > 0; got \[" + repr(temperature)):
        N.gumbel_softmax(KEYS[0], X, temperature)


def test_temperature_array_is_checked_for_sign_and_layout():
    with pytest.raises(ValueError, match=r"'temperature' must be > 0; got \[-1.0\]"):
        N.gumbel_softmax(KEYS[0], X, np.array([[1.0], [-1.0], [2.0]], np.float32))
    with pytest.raises(ValueError, match=r"'temperature' has shape \(3, 6\)"):
        N.gumbel_softmax(KEYS[0], X, np.ones((3, 6), np.float32))


def test_gumbel_softmax_is_exported_but_not_a_registered_normalizer():
    assert "gumbel_softmax" in N.__all__
    assert "gumbel_softmax" not in N.NAMES
