"""Fenchel-Young losses (attnlab.losses): values, closed-form gradients, masking, transforms.

Compilation dominates the cost, so nearly every check goes through `_value_and_grad(name)`:
one jitted (loss, gradient) function per loss, called on [3, 4] logits with an explicit mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import losses
from attnlab import normalizers as N

Z = np.array([[-2.0, 0.0, 0.5, 1.0], [1.0, 2.0, 3.5, -0.5], [0.3, -0.7, 0.1, 0.2]], np.float32)
LABELS = np.array([2, 0, 1])
ALL = np.ones(Z.shape, bool)
SOFT = np.array([[0.2, 0.3, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.6, 0.2, 0.1]], np.float32)

# name -> (loss(z, labels, alpha, **kw), mapping(z, alpha, where), alpha for the reference entropy)
# "entmax" takes alpha as a traced argument: one compilation serves every alpha.
CASES = {
    "softmax": (lambda z, y, a, **kw: losses.softmax_cross_entropy(z, y, **kw), lambda z, a, w: N.softmax(z, where=w)),
    "sparsemax": (
        lambda z, y, a, **kw: losses.multiclass_sparsemax_loss(z, y, **kw),
        lambda z, a, w: N.sparsemax(z, where=w),
    ),
    "entmax15": (lambda z, y, a, **kw: losses.entmax15_loss(z, y, **kw), lambda z, a, w: N.entmax15(z, where=w)),
    "entmax": (
        lambda z, y, a, **kw: losses.entmax_loss(z, y, alpha=a, **kw),
        lambda z, a, w: N.entmax(z, alpha=a, where=w),
    ),
}
ALPHA = {"softmax": 1.0, "sparsemax": 2.0, "entmax15": 1.5, "entmax": 1.3}


@functools.cache
def _jitted(name):
    loss_fn = CASES[name][0]

    def run(z, labels, where, eps, alpha):
        def total(z):
            loss = loss_fn(z, labels, alpha, where=where, label_smoothing=eps)
            return jnp.sum(loss), loss

        (_, loss), grad = jax.value_and_grad(total, has_aux=True)(z)
        return loss, grad

    return jax.jit(run)


def _value_and_grad(name, z=Z, labels=LABELS, where=ALL, eps=0.0, alpha=None, dtype=np.float32):
    """(per-example loss, d sum(loss) / dz) as numpy."""
    alpha = ALPHA[name] if alpha is None else alpha
    loss, grad = _jitted(name)(np.asarray(z, dtype), labels, np.asarray(where), dtype(eps), dtype(alpha))
    return np.asarray(loss), np.asarray(grad)


def _target(labels, where, eps):
    """(1 - eps) one_hot + eps / m on the m valid classes, [rows, n]."""
    where = np.asarray(where, bool)
    y = np.eye(where.shape[-1])[labels] if np.ndim(labels) == 1 else np.asarray(labels, np.float64)
    return (1 - eps) * y + eps * where / where.sum(-1, keepdims=True)


def _tsallis(p, alpha):
    p = np.asarray(p, np.float64)
    if alpha == 1.0:
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
    return np.sum(p - p**alpha, -1) / (alpha * (alpha - 1))


def _reference_loss(name, z, labels, where, eps, alpha):
    """<p* - y, z> + H(p*) - H(y) in float64 over the valid classes, p* from the normalizer."""
    where = np.asarray(where, bool) & np.isfinite(z)
    p = np.asarray(CASES[name][1](jnp.asarray(z), alpha, jnp.asarray(where)), np.float64)
    y = _target(labels, where, eps)
    zv = np.where(where, z, 0.0)
    return np.sum((p - y) * zv, -1) + _tsallis(p, alpha) - _tsallis(y, alpha), p, y


def test_softmax_cross_entropy_matches_optax():
    loss, _ = _value_and_grad("softmax")
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy_with_integer_labels(Z, LABELS), rtol=1e-6)
    eps = 0.1
    smoothed = _target(LABELS, ALL, eps).astype(np.float32)
    loss, _ = _value_and_grad("softmax", eps=eps)
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy(Z, smoothed), rtol=1e-6)
    # the Fenchel-Young loss is the cross-entropy minus the target's entropy H(y) (so 0 at p* = y)
    np.testing.assert_allclose(
        losses.fenchel_young_loss(Z, LABELS, mapping="softmax", label_smoothing=eps),
        optax.softmax_cross_entropy(Z, smoothed) - _tsallis(smoothed, 1.0),
        rtol=1e-5,
    )


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4, -3e38], [0.0, 1e4, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    loss, grad = _value_and_grad("softmax", z=z, labels=np.array([1, 1, 3]))
    np.testing.assert_allclose(loss, [1e4, 0.0, np.log(4.0)], rtol=1e-6)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", list(CASES))
def test_value_and_gradient_is_mapping_minus_target(name):
    alpha = ALPHA[name]
    for labels, eps in ((LABELS, 0.0), (LABELS, 0.2), (SOFT, 0.0)):
        loss, grad = _value_and_grad(name, labels=labels, eps=eps)
        expected, p, y = _reference_loss(name, Z, labels, ALL, eps, alpha)
        np.testing.assert_allclose(grad, p - y, atol=1e-6)
        if name == "softmax":  # the cross-entropy adds H(y) to the Fenchel-Young loss
            expected = expected + _tsallis(y, 1.0)
        np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_matches_finite_differences_float64(name):
    with jax.enable_x64(True):
        z = np.array([[0.4, -0.3, 0.9, 0.1], [1.5, 0.2, -0.8, 1.1], [0.0, 0.5, 0.25, -1.0]])
        where = np.array([[True] * 4, [True] * 4, [True, True, True, False]])
        labels = np.array([1, 3, 0])
        _, grad = _value_and_grad(name, z=z, labels=labels, where=where, eps=0.1, dtype=np.float64)
        h = 1e-6
        fd = np.zeros(z.shape)
        for idx in np.ndindex(*z.shape):
            e = np.zeros(z.shape)
            e[idx] = h
            up, _ = _value_and_grad(name, z=z + e, labels=labels, where=where, eps=0.1, dtype=np.float64)
            down, _ = _value_and_grad(name, z=z - e, labels=labels, where=where, eps=0.1, dtype=np.float64)
            fd[idx] = (up.sum() - down.sum()) / (2 * h)
        np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_alpha_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        z = jnp.array([[-1.0, 0.0, 0.5], [1.0, 2.0, 3.5]], jnp.float64)
        labels = jnp.array([1, 2])

        @jax.jit
        def total(alpha):
            return losses.entmax_loss(z, labels, alpha=alpha, label_smoothing=0.1).sum()

        g = jax.jit(jax.grad(total))(jnp.asarray(1.33, jnp.float64))
        h = 1e-6
        np.testing.assert_allclose(g, (total(1.33 + h) - total(1.33 - h)) / (2 * h), rtol=1e-6)


def test_multiclass_sparsemax_loss_reference_value():
    # z = [-2, 0, 0.5] (a fourth class masked), label 2: sparsemax tau = -0.25, p* = [0, 0.25, 0.75].
    # <p* - y, z> = 0.25 * 0 + (0.75 - 1) * 0.5 = -0.125;
    # H_2(p*) = (1 - (0.25^2 + 0.75^2)) / 2 = (1 - 0.625) / 2 = 0.1875;  H_2(e_2) = 0.
    # L = -0.125 + 0.1875 = 0.0625 (also -z_k + sum_S (z_j^2 - tau^2) / 2 + 1/2 = -0.5 + 0.0625 + 0.5).
    where = ALL.copy()
    where[0, 3] = False
    loss, grad = _value_and_grad("sparsemax", where=where)
    np.testing.assert_allclose(loss[0], 0.0625, rtol=1e-6)
    np.testing.assert_allclose(grad[0], [0.0, 0.25, -0.25, 0.0], atol=1e-7)
    # the public entry point without a mask, on a single row
    np.testing.assert_allclose(
        losses.multiclass_sparsemax_loss(jnp.array([-2.0, 0.0, 0.5]), jnp.array(2)), 0.0625, rtol=1e-6
    )


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "entmax"])
def test_zero_loss_exactly_when_mapping_is_the_label(name):
    # p* is one-hot once the label's logit leads every other by 1 / (alpha - 1): 1 for sparsemax,
    # 2 for 1.5-entmax, 3.33 for alpha = 1.3; these rows lead by 4.
    z = np.array([[5.0, 0.0, 1.0, -3.0], [0.0, 4.0, -8.0, 0.0], [-1.0, 0.0, 2.0, 6.0]])
    loss, grad = _value_and_grad(name, z=z, labels=np.array([0, 1, 3]))
    np.testing.assert_array_equal(loss, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
    loss, _ = _value_and_grad(name, z=z, labels=np.array([1, 0, 2]))
    assert np.all(loss > 0.5)


def test_entmax_loss_limits():
    for alpha, name in ((2.0, "sparsemax"), (1.5, "entmax15")):
        traced, _ = _value_and_grad("entmax", alpha=alpha)
        closed, _ = _value_and_grad(name)
        np.testing.assert_allclose(traced, closed, rtol=1e-5)
    np.testing.assert_allclose(
        losses.entmax_loss(Z, LABELS, alpha=2.0), losses.multiclass_sparsemax_loss(Z, LABELS), rtol=1e-6
    )
    ce, _ = _value_and_grad("softmax")
    at_one, _ = _value_and_grad("entmax", alpha=1.0)  # a traced alpha of exactly 1 is softmax
    np.testing.assert_allclose(at_one, ce, rtol=1e-6)
    # the gap closes linearly in alpha - 1 (about 2.2 (alpha - 1) here)
    gaps = [np.max(np.abs(_value_and_grad("entmax", alpha=1.0 + d)[0] - ce)) for d in (1e-2, 1e-3, 1e-4)]
    assert gaps[1] < 0.2 * gaps[0] and gaps[2] < 0.2 * gaps[1] and gaps[2] < 5e-4
    static, _ = _value_and_grad("entmax")
    np.testing.assert_allclose(losses.entmax_loss(Z, LABELS, alpha=1.3), static, rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_masked_and_minus_inf_logits(name):
    z = Z.copy()
    z[0, 0] = -np.inf
    where = np.array([[True, True, True, False], [False, True, True, True], [True, False, True, True]])
    valid = where & np.isfinite(z)
    labels = np.array([2, 3, 0])
    for eps in (0.0, 0.3):
        loss, grad = _value_and_grad(name, z=z, where=where, labels=labels, eps=eps)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad[~valid], 0.0)
        expected, p, y = _reference_loss(name, z, labels, valid, eps, ALPHA[name])
        if name == "softmax":
            expected = expected + _tsallis(y, 1.0)
        np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, p - y, atol=1e-6)
        # masked logits do not matter, whatever they hold
        other, _ = _value_and_grad(name, z=np.where(where, z, 7.0), where=where, labels=labels, eps=eps)
        np.testing.assert_allclose(other, loss, rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_all_masked_row_and_masked_label(name):
    z = Z.copy()
    z[0] = -np.inf
    z[2, 1] = -np.inf
    where = ALL.copy()
    where[1] = False
    loss, grad = _value_and_grad(name, z=z, labels=np.array([0, 1, 1]), where=where, eps=0.1)
    np.testing.assert_array_equal(loss[:2], 0.0)  # nothing valid: 0 loss, 0 gradient
    assert loss[2] == np.inf  # the label's class is masked: +inf, zero gradient
    np.testing.assert_array_equal(grad, 0.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        losses.multiclass_sparsemax_loss(Z[:, :3], jnp.array([0, 3, 1]))
    with pytest.raises(ValueError, match="shape"):
        losses.multiclass_sparsemax_loss(Z, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="unknown mapping"):
        losses.fenchel_young_loss(Z, LABELS, mapping="sigmoid")
    with pytest.raises(ValueError, match="needs alpha"):
        losses.fenchel_young_loss(Z, LABELS, mapping="entmax")
    with pytest.raises(ValueError, match="alpha"):
        losses.entmax_loss(Z, LABELS, alpha=0.9)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.softmax_cross_entropy(Z, LABELS, label_smoothing=1.5)


def test_jit_vmap_batch_shapes_and_per_row_alpha():
    z = np.stack([Z, Z[::-1]])  # [2, 3, 4]
    labels = np.stack([LABELS, LABELS[::-1]])
    eager = losses.entmax15_loss(z, labels)
    assert eager.shape == (2, 3)
    np.testing.assert_allclose(eager[0], _value_and_grad("entmax15")[0], rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(losses.entmax15_loss)(z, labels), eager, rtol=1e-6)
    # per-row alpha, [rows, 1]
    alpha = np.array([[1.0], [1.5], [2.0]], np.float32)
    per_row = jax.jit(lambda a: losses.entmax_loss(Z, LABELS, alpha=a, where=ALL))(alpha)
    expected = [_value_and_grad("entmax", alpha=float(a[0]))[0][i] for i, a in enumerate(alpha)]
    np.testing.assert_allclose(per_row, expected, rtol=1e-5)
    assert losses.multiclass_sparsemax_loss(Z.astype(jnp.bfloat16), LABELS).dtype == jnp.bfloat16


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(list(CASES)),
    logits=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=Z.size, max_size=Z.size),
    mask=st.lists(st.booleans(), min_size=Z.size, max_size=Z.size),
    labels=st.lists(st.integers(0, Z.shape[1] - 1), min_size=Z.shape[0], max_size=Z.shape[0]),
    eps=st.sampled_from([0.0, 0.1]),
)
def test_property_nonnegative_and_gradient_sums_to_zero(name, logits, mask, labels, eps):
    where = np.array(mask).reshape(Z.shape)
    labels = np.array(labels)
    where[np.arange(Z.shape[0]), labels] = True
    loss, grad = _value_and_grad(name, z=np.reshape(logits, Z.shape), labels=labels, where=where, eps=eps)
    assert np.all(np.isfinite(loss)) and np.all(loss >= 0)
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(grad[~where], 0.0)


# --- OutputNormalizer: a mapping and its loss, as a model's output layer -----------------------


def test_output_normalizer_pairs_each_mapping_with_its_loss():
    z = jnp.array([[-2.0, 0.0, 0.5], [1.0, 2.0, 3.5]])
    y = jnp.array([2, 0])
    softmax = losses.OutputNormalizer("softmax", label_smoothing=0.1)
    np.testing.assert_allclose(
        softmax.loss(z, y), optax.softmax_cross_entropy(z, optax.smooth_labels(jax.nn.one_hot(y, 3), 0.1)), rtol=1e-6
    )
    sparse = losses.OutputNormalizer.parse({"mapping": "entmax", "alpha": 2.0})
    np.testing.assert_allclose(sparse.probabilities(z)[0], [0.0, 0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(sparse.loss(z, y), losses.multiclass_sparsemax_loss(z, y), rtol=1e-6)
    assert sparse.sparse and not softmax.sparse
    assert [losses.OutputNormalizer.parse(v).label for v in ("sparsemax", {"mapping": "entmax", "alpha": 1.3})] == [
        "sparsemax",
        "entmax1.3",
    ]
    assert softmax.label == "softmax ls0.1"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("sparsmax", "mapping='sparsmax'; accepted: softmax, sparsemax, entmax15, entmax"),
        ({"mapping": "entmax"}, "needs alpha, a number >= 1"),
        ({"mapping": "softmax", "alpha": 1.5}, "applies to mapping='entmax' only"),
        ({"mapping": "softmax", "label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\)"),
        ({"mapping": "softmax", "temperature": 2}, "unknown key"),
        (3, "must be a mapping name"),
    ],
)
def test_output_normalizer_errors_name_the_value(value, match):
    with pytest.raises(ValueError, match=match):
        losses.OutputNormalizer.parse(value, "model.output")


def test_unsigned_byte_labels_equal_int32_labels():
    # uint8 labels (bytes) against 256 classes: the class count must not wrap to 0.
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 256))
    labels = np.array([0, 7, 200, 255], np.uint8)
    for name in losses.MAPPINGS[:3]:
        got = losses.fenchel_young_loss(z, labels, mapping=name)
        np.testing.assert_allclose(got, losses.fenchel_young_loss(z, labels.astype(np.int32), mapping=name))
        assert np.all(np.isfinite(got))


# --- output mappings derived from the normalizer registry --------------------------------------


def test_output_mappings_are_the_registry_entmax_family():
    assert tuple(losses.MAPPINGS) == ("softmax", "sparsemax", "entmax15", "entmax")
    assert losses.output_mappings() == {"softmax": 1.0, "sparsemax": 2.0, "entmax15": 1.5, "entmax": None}
    for name, alpha in losses.output_mappings().items():
        assert alpha is None or N.get(name).mapping.alpha == alpha
    # committed results key on these
    assert losses.OutputNormalizer("entmax", alpha=1.25).to_json() == {
        "mapping": "entmax",
        "alpha": 1.25,
        "label_smoothing": 0.0,
    }
    assert losses.OutputNormalizer("entmax", alpha=1.25, label_smoothing=0.1).label == "entmax1.25 ls0.1"


def test_a_registered_entmax_mapping_becomes_an_output_mapping(monkeypatch):
    from attnlab.normalizers import describe, registry
    from attnlab.normalizers.mappings import entmax_rows

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @describe.described(describe.Description("entmax13", "1.3-entmax", "1.3-entmax", family=describe.THRESHOLD))
    class Entmax13:
        alpha = 1.3

        def __call__(self, z, valid, align):
            return entmax_rows(z, valid, 1.3)

    N.register("entmax13", Entmax13)
    N.register("logn_entmax13", Entmax13, N.LogN)  # a scale policy: not an output mapping
    assert list(losses.MAPPINGS) == ["softmax", "sparsemax", "entmax15", "entmax", "entmax13"]
    output = losses.OutputNormalizer.parse("entmax13")
    assert output.entropy_alpha == 1.3 and output.label == "entmax13" and output.to_json()["mapping"] == "entmax13"
    np.testing.assert_allclose(output.loss(Z, LABELS), losses.entmax_loss(Z, LABELS, alpha=1.3), rtol=1e-6)
    np.testing.assert_allclose(output.probabilities(Z), N.get("entmax13")(Z), atol=1e-7)
    with pytest.raises(ValueError, match="only accepted with mapping='entmax'"):
        losses.fenchel_young_loss(Z, LABELS, mapping="entmax13", alpha=1.3)


def test_alpha_at_and_below_one_is_softmax_in_the_losses():
    softmax, softmax_grad = _value_and_grad("entmax", alpha=1.0)
    np.testing.assert_allclose(softmax, losses.fenchel_young_loss(Z, LABELS, mapping="softmax"), rtol=1e-6)
    for alpha in (1.0 + 1e-9, 1.0 + 1e-6, 0.9):  # traced: the band above 1, and clamped below 1
        loss, grad = _value_and_grad("entmax", alpha=alpha)
        np.testing.assert_array_equal(loss, softmax)
        np.testing.assert_array_equal(grad, softmax_grad)
    np.testing.assert_array_equal(losses.entmax_loss(Z, LABELS, alpha=1.0 + 1e-9), softmax)  # static
    d_alpha = jax.grad(lambda a: losses.entmax_loss(Z, LABELS, alpha=a).sum())(jnp.float32(1.0 + 1e-9))
    assert d_alpha == 0.0
