"""Conformance: attnlab's losses against optax's, on the cases of optax's own tests
(`optax/losses/_classification_test.py`), each checked against optax on the same inputs. They do not
apply to optax's tuple `axis` (attnlab takes one class axis) or its binary `sparsemax_loss` (attnlab
has none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest

from attnlab import losses
from attnlab import normalizers as N

# --- optax: softmax_cross_entropy (optax's SoftmaxCrossEntropyTest and ...WithIntegerLabelsTest) ------

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
EXPECTED = np.array([9.00013, 3.0696733], np.float32)  # optax's test values
INT_TS = np.array([1, 0])
PER_EXAMPLE = np.array([True, False])
PER_LOGIT = np.array([[1, 0, 0], [0, 0, 0]], bool)


def test_softmax_cross_entropy_optax_values_jit_and_scalar():
    np.testing.assert_allclose(jax.jit(losses.softmax_cross_entropy)(YS, TS), EXPECTED, atol=1e-4)
    np.testing.assert_allclose(jax.jit(losses.softmax_cross_entropy)(YS[0], TS[0]), EXPECTED[0], atol=1e-4)
    np.testing.assert_allclose(losses.softmax_cross_entropy(YS, INT_TS), EXPECTED, atol=1e-4)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(YS, INT_TS), optax.softmax_cross_entropy_with_integer_labels(YS, INT_TS), rtol=1e-6
    )


def _optax_cross_entropy(z, labels, where):
    """optax's softmax_cross_entropy, integer labels as their one-hot."""
    labels = jax.nn.one_hot(labels, z.shape[-1]) if labels.ndim < z.ndim else labels
    return optax.softmax_cross_entropy(z, labels, where=where)


@pytest.mark.parametrize("labels", [TS, INT_TS], ids=["distributions", "integers"])
@pytest.mark.parametrize("where", [PER_EXAMPLE, PER_LOGIT], ids=["per_example", "per_logit"])
def test_softmax_cross_entropy_where_matches_optax(labels, where):
    # optax's test_per_logit_mask and test_gradient (finite gradients under a mask), against optax's values
    loss, grad = jax.value_and_grad(lambda z: losses.softmax_cross_entropy(z, labels, where=where).sum())(YS)
    want, want_grad = jax.value_and_grad(lambda z: _optax_cross_entropy(z, labels, where).sum())(YS)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    assert np.all(np.isfinite(grad))
    per_example = losses.softmax_cross_entropy(YS, labels, where=where)
    np.testing.assert_array_equal(per_example[1], 0.0)  # every class of example 1 is masked
    np.testing.assert_allclose(per_example, _optax_cross_entropy(YS, labels, where), rtol=1e-6)


def test_integer_label_on_a_masked_class_is_its_one_hot():
    # optax's two forms disagree here: with the one-hot, the masked class's target mass leaves the sum
    # (loss 0); with the integer, optax takes lse over the valid classes minus the masked logit (9).
    # attnlab takes an integer label as its one-hot.
    np.testing.assert_array_equal(losses.softmax_cross_entropy(YS, INT_TS, where=PER_LOGIT), [0.0, 0.0])
    np.testing.assert_array_equal(optax.softmax_cross_entropy(YS, TS, where=PER_LOGIT), [0.0, 0.0])
    np.testing.assert_allclose(
        optax.softmax_cross_entropy_with_integer_labels(YS, INT_TS, where=PER_LOGIT), [9.0, 0.0], rtol=1e-6
    )


def test_softmax_cross_entropy_gradient_check():
    with jax.enable_x64(True):
        z = YS.astype(np.float64)
        jax.test_util.check_grads(lambda z: losses.softmax_cross_entropy(z, TS.astype(np.float64)), (z,), order=1)
        jax.test_util.check_grads(lambda z: losses.softmax_cross_entropy(z, INT_TS), (z,), order=1)


@pytest.mark.parametrize("size", [5, 10])
def test_softmax_cross_entropy_class_mask_drops_the_masked_targets_as_optax(size):
    # optax's test_mask: target mass on masked classes leaves the sum, as if those classes were absent.
    rng = np.random.default_rng(size)
    preds = rng.normal(size=size)
    targets = rng.dirichlet(np.ones(size))
    mask = rng.integers(2, size=size).astype(bool)
    mask[0] = True
    got = losses.softmax_cross_entropy(preds, targets, where=mask)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy(preds[mask], targets[mask]), rtol=1e-5)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy(preds, targets, where=mask), rtol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis_matches_optax(axis):
    # optax's test_axis (both forms)
    rng = np.random.default_rng(axis)
    shape = [4, 5, 6]
    preds = rng.normal(size=shape).astype(np.float32)
    targets = np.moveaxis(rng.dirichlet(np.ones(shape[axis]), size=np.delete(shape, axis)), -1, axis).astype(np.float32)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(preds, targets, axis=axis),
        optax.softmax_cross_entropy(preds, targets, axis=axis),
        rtol=1e-5,
    )
    labels = rng.integers(shape[axis], size=np.delete(shape, axis))
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(preds, labels, axis=axis),
        optax.softmax_cross_entropy_with_integer_labels(preds, labels, axis=axis),
        rtol=1e-5,
    )


def test_every_loss_takes_axis_with_where_and_alpha_following_it():
    # the same as with the classes moved last; a per-example where and a per-example alpha follow axis
    rng = np.random.default_rng(0)
    preds = rng.normal(size=(4, 5, 6)).astype(np.float32)
    moved = np.moveaxis(preds, 1, -1)
    labels = rng.integers(5, size=(4, 6))
    where = rng.random(labels.shape) < 0.7
    alpha = 1.0 + rng.random((4, 1, 6)).astype(np.float32)
    for loss, kw in (
        (losses.multiclass_sparsemax_loss, {}),
        (losses.entmax_loss, {"alpha": alpha}),
    ):
        moved_kw = {k: np.moveaxis(v, 1, -1) for k, v in kw.items()}
        got = loss(preds, labels, axis=1, where=where, **kw)
        np.testing.assert_allclose(got, loss(moved, labels, where=where, **moved_kw), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(got)[~where], 0.0)
    probs = losses.OutputNormalizer("sparsemax").probabilities(preds, axis=1)
    np.testing.assert_allclose(np.moveaxis(probs, 1, -1), N.sparsemax(moved), atol=1e-7)


def test_bad_axis_and_where_shapes_raise():
    with pytest.raises(TypeError, match="one int"):
        losses.softmax_cross_entropy(YS, INT_TS, axis=(0, 1))
    with pytest.raises(ValueError, match="out of range"):
        losses.multiclass_sparsemax_loss(YS, INT_TS, axis=2)
    with pytest.raises(ValueError, match="per example"):
        losses.entmax15_loss(YS, INT_TS, where=np.ones((1, 2, 3), bool))
    with pytest.raises(ValueError, match=r"without the class axis 0, \(3,\)"):
        losses.softmax_cross_entropy(YS, INT_TS, axis=0)


def test_labels_of_masked_examples_are_not_checked():
    # PyTorch's ignore_index convention: padding labels (-100) on examples that where masks out.
    labels = np.array([1, -100])
    for loss in (losses.softmax_cross_entropy, losses.multiclass_sparsemax_loss):
        np.testing.assert_allclose(loss(YS, labels, where=labels >= 0), [loss(YS[:1], labels[:1])[0], 0.0])
        with pytest.raises(ValueError, match=r"\[0, 3\).*-100"):
            loss(YS, labels)


# --- optax: multiclass_sparsemax_loss (optax's SparsemaxTest) ------------------------------------


def test_sparsemax_loss_is_optax_multiclass_sparsemax_loss():
    theirs = jax.jit(optax.losses.multiclass_sparsemax_loss)  # jitted: optax's op-by-op dispatch is slow
    labels = jnp.array([1, 0, 2])
    scores = jnp.array([[0.0, 1e5, 0.0], [1e5, 0.0, 0.0], [0.0, 0.0, 1e5]])
    np.testing.assert_allclose(losses.multiclass_sparsemax_loss(scores, labels), 0.0, atol=1e-4)
    grad = jax.grad(lambda s: jnp.mean(losses.multiclass_sparsemax_loss(s, labels)))(scores)
    np.testing.assert_allclose(grad, 0.0, atol=1e-4)  # optax's case: projection_simplex(scores) - one_hot = 0
    # random rows, sparse and dense supports: values and gradients equal optax's
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(32, 7)) * rng.choice([0.1, 1.0, 5.0], size=(32, 1))).astype(np.float32)
    y = rng.integers(0, 7, 32)
    np.testing.assert_allclose(losses.multiclass_sparsemax_loss(z, y), theirs(z, y), atol=2e-6)
    our_grad = jax.grad(lambda z: losses.multiclass_sparsemax_loss(z, y).sum())(z)
    their_grad = jax.jit(jax.grad(lambda z: theirs(z, y).sum()))(z)
    np.testing.assert_allclose(our_grad, their_grad, atol=1e-6)


def test_optax_binary_sparsemax_loss_name_is_not_ours():
    with pytest.raises(AttributeError, match="renamed multiclass_sparsemax_loss"):
        losses.sparsemax_loss  # noqa: B018
    assert "sparsemax_loss" not in losses.__all__
