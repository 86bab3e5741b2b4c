"""Temperature scaling and expected calibration error: exact derivatives, recovered temperatures,
hand-computed ECE in both binning schemes, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import calibration
from attnlab.losses import OutputNormalizer

PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.55, 0.45]])
LABELS = np.array([0, 1, 0, 0])  # right, wrong, right, right


def _sample(temperature: float, n: int = 20_000, classes: int = 5, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): T is the calibrating temperature."""
    key_logits, key_labels = jax.random.split(jax.random.PRNGKey(seed))
    logits = 3.0 * jax.random.normal(key_logits, (n, classes))
    labels = jax.random.categorical(key_labels, logits / temperature)
    return logits, labels


def test_hand_computed_ece_equal_width_and_equal_mass():
    # One equal-width bin of two holds everything: confidence 0.7125, accuracy 0.75.
    assert calibration.expected_calibration_error(PROBS, LABELS, bins=2) == pytest.approx(0.0375)
    # Ten bins: (0.5, 0.6] holds 0.6 (wrong) and 0.55 (right): |0.5 - 0.575| * 2/4 = 0.0375;
    # (0.7, 0.8]: |1 - 0.8| / 4 = 0.05; (0.8, 0.9]: |1 - 0.9| / 4 = 0.025.
    assert calibration.expected_calibration_error(PROBS, LABELS, bins=10) == pytest.approx(0.1125)
    # Two equal-mass bins: {0.55, 0.6}: |0.5 - 0.575| / 2; {0.8, 0.9}: |1 - 0.85| / 2.
    bins = calibration.reliability_bins(PROBS, LABELS, bins=2, scheme="mass")
    assert bins.count.tolist() == [2, 2]
    assert bins.confidence == pytest.approx([0.575, 0.85]) and bins.accuracy == pytest.approx([0.5, 1.0])
    assert bins.ece == pytest.approx(0.1125)


def test_empty_bins_are_nan_and_do_not_count():
    bins = calibration.reliability_bins(PROBS, LABELS, bins=10)
    assert bins.count.sum() == 4 and np.isnan(bins.confidence[0]) and np.isnan(bins.accuracy[9])
    assert bins.edges.tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())


def test_labels_drawn_from_the_probabilities_are_calibrated():
    logits, labels = _sample(temperature=1.0)
    probs = jax.nn.softmax(logits)
    for scheme in calibration.SCHEMES:
        assert calibration.expected_calibration_error(probs, labels, scheme=scheme) < 0.02
    # Sharpened probabilities are over-confident: a clearly larger ECE.
    assert calibration.expected_calibration_error(jax.nn.softmax(3 * logits), labels) > 0.05


def test_derivatives_are_exact():
    logits, labels = _sample(temperature=2.0, n=256)

    def nll(beta):
        return jnp.mean(jax.nn.logsumexp(beta * logits, axis=-1) - beta * logits[jnp.arange(256), labels])

    beta = jnp.float32(0.7)
    value, slope, curvature = calibration._nll_and_derivatives(beta, logits, labels)
    assert value == pytest.approx(float(nll(beta)), rel=1e-5)
    assert slope == pytest.approx(float(jax.grad(nll)(beta)), rel=1e-4)
    assert curvature == pytest.approx(float(jax.grad(jax.grad(nll))(beta)), rel=1e-3)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fit_recovers_the_temperature_that_generated_the_labels(temperature):
    # 20,000 examples: the maximum-likelihood T is within a few percent of the true one.
    logits, labels = _sample(temperature)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.05)
    best = calibration.nll(logits, labels, fitted)
    assert best <= calibration.nll(logits, labels, 1.0)
    assert best <= calibration.nll(logits, labels, fitted * 1.02) and best <= calibration.nll(
        logits, labels, fitted / 1.02
    )
    # Scaling by the fitted temperature lowers the ECE of miscalibrated probabilities.
    before = calibration.expected_calibration_error(jax.nn.softmax(logits), labels)
    after = calibration.expected_calibration_error(jax.nn.softmax(logits / fitted), labels)
    assert after < before and after < 0.02


def test_separable_data_has_no_finite_temperature():
    logits = jnp.array([[5.0, 0.0], [0.0, 5.0]])
    with pytest.raises(ValueError, match="T -> 0"):
        calibration.fit_temperature(logits, jnp.array([0, 1]))


def test_bad_inputs_name_what_is_accepted():
    with pytest.raises(ValueError, match="scheme='quantile'; accepted: width, mass"):
        calibration.reliability_bins(PROBS, LABELS, scheme="quantile")
    with pytest.raises(ValueError, match="bins must be an integer >= 1; got 0"):
        calibration.expected_calibration_error(PROBS, LABELS, bins=0)
    with pytest.raises(ValueError, match=r"labels must be integers of shape \[4\]"):
        calibration.expected_calibration_error(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match=r"logits must be \[examples, classes\]"):
        calibration.fit_temperature(jnp.zeros(3), jnp.zeros(3, int))
    with pytest.raises(ValueError, match="temperature must be > 0; got -1"):
        calibration.nll(PROBS, LABELS, -1.0)


# --- sparse outputs ---------------------------------------------------------------------------

SPARSE_OUTPUTS = ["sparsemax", "entmax15", {"mapping": "entmax", "alpha": 1.3}]


def _sparse_sample(output, temperature: float, n: int = 20_000, classes: int = 5, seed: int = 1):
    """Logits, and labels drawn from the output's own mapping at logits / temperature."""
    key_logits, key_labels = jax.random.split(jax.random.PRNGKey(seed))
    logits = 3.0 * jax.random.normal(key_logits, (n, classes))
    probs = OutputNormalizer.parse(output).probabilities(logits / temperature)
    labels = jax.random.categorical(key_labels, jnp.log(probs))  # log 0 = -inf: never drawn
    return logits, labels


# 1.5-entmax takes the general-alpha code of entmax 1.3 here; it runs with -m slow.
@pytest.mark.parametrize(
    "output",
    [pytest.param(o, marks=pytest.mark.slow) if o == "entmax15" else o for o in SPARSE_OUTPUTS],
    ids=lambda o: OutputNormalizer.parse(o).label,
)
def test_sparse_loss_derivatives_in_beta_are_exact(output):
    out = OutputNormalizer.parse(output)
    logits, labels = _sparse_sample(output, temperature=1.5, n=256)

    def loss(beta):
        return jnp.mean(out.loss(beta * logits, labels))

    beta = jnp.float32(0.8)
    value, slope, curvature = calibration._objective(out)(beta, logits, labels)
    assert float(value) == pytest.approx(float(loss(beta)), rel=1e-5)
    assert float(slope) == pytest.approx(float(jax.grad(loss)(beta)), rel=1e-4, abs=1e-6)
    assert float(curvature) == pytest.approx(float(jax.grad(jax.grad(loss))(beta)), rel=1e-3)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("output", SPARSE_OUTPUTS, ids=lambda o: OutputNormalizer.parse(o).label)
def test_fenchel_young_fit_recovers_the_temperature_of_a_sparse_output(output, temperature):
    # The Fenchel-Young loss is proper: labels drawn from mapping(z / T) make beta = 1 / T its minimiser.
    logits, labels = _sparse_sample(output, temperature)
    fitted = calibration.fit_temperature(logits, labels, output=output)
    assert fitted == pytest.approx(temperature, rel=0.05)


def test_scores_with_exact_zeros():
    probs = np.array([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.4, 0.6]])
    labels = np.array([0, 2, 0, 2])  # right, a zero-probability target, right, right
    got = calibration.scores(probs, labels, bins=2)
    assert got["accuracy"] == 0.75 and got["zero_target_fraction"] == 0.25
    assert got["nll"] == np.inf
    assert got["nll_nonzero"] == pytest.approx(-(np.log(0.75) + np.log(1.0) + np.log(0.6)) / 3)
    # Brier: (0.0625 + 0.0625) + (0.25 + 0.25 + 1) + 0 + (0.16 + 0.16) = 1.945 over 4.
    assert got["brier"] == pytest.approx(1.945 / 4)
    assert got["support"] == pytest.approx(1.75) and got["confidence"] == pytest.approx(0.7125)
    assert got["ece_width"] == calibration.expected_calibration_error(probs, labels, bins=2)
