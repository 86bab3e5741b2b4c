"""Knowledge distillation: the per-token loss, its gradient, the T^2 scaling, and the objective in
the training step (masking, a frozen teacher)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab.data.batch import Batch
from attnlab.nn import ModelConfig, TransformerLM
from attnlab.train import OptimizerConfig, TrainConfig, distillation_loss, distillation_objective, split_model, train
from attnlab.train.distill import soft_target_kl

V = 11


def _logits(seed, shape=(3, 5, V), scale=2.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _labels(seed, shape=(3, 5)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


def test_weight_zero_is_cross_entropy():
    s, t, y = _logits(0), _logits(1), _labels(2)
    got = distillation_loss(s, t, y, temperature=3.0, weight=0.0)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(s, y), rtol=1e-6)
    assert got.shape == y.shape and got.dtype == jnp.float32


def test_weight_one_is_the_scaled_kl_alone():
    s, t, y = _logits(0), _logits(1), _labels(2)
    q, log_p = jax.nn.softmax(t / 2.0), jax.nn.log_softmax(s / 2.0)
    want = 4.0 * jnp.sum(q * (jnp.log(q) - log_p), axis=-1)
    np.testing.assert_allclose(distillation_loss(s, t, y, temperature=2.0, weight=1.0), want, rtol=1e-5)


def test_kl_is_zero_for_the_teachers_own_logits_and_positive_otherwise():
    s, t = _logits(0), _logits(1)
    for temperature in (0.5, 1.0, 4.0):
        np.testing.assert_allclose(soft_target_kl(t, t, temperature=temperature), 0.0, atol=1e-6)
        # A constant shift of the logits is the same distribution.
        np.testing.assert_allclose(soft_target_kl(t + 3.0, t, temperature=temperature), 0.0, atol=1e-5)
        assert np.all(np.asarray(soft_target_kl(s, t, temperature=temperature)) > 1e-4)
    y = _labels(2)
    hard = optax.softmax_cross_entropy_with_integer_labels(t, y)
    np.testing.assert_allclose(distillation_loss(t, t, y, temperature=2.0, weight=0.3), 0.7 * hard, rtol=1e-5)


def test_a_teacher_that_rules_out_a_class_gives_a_finite_kl():
    t = jnp.array([[0.0, 1.0, -jnp.inf, 2.0]])
    s = jnp.array([[0.5, 0.0, 1.0, -1.0]])
    kl = soft_target_kl(s, t, temperature=2.0)
    q, log_p = jax.nn.softmax(t / 2.0), jax.nn.log_softmax(s / 2.0)
    want = sum(float(q[0, v] * (jnp.log(q[0, v]) - log_p[0, v])) for v in (0, 1, 3))
    assert np.isfinite(kl).all() and float(kl[0]) == pytest.approx(want, rel=1e-5)


class GradientTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_is_hard_plus_t_times_soft_residual(self):
        # d/ds [(1 - w) CE + w T^2 KL] = (1 - w) (p - e_y) + w T (p_T - q_T), per position.
        s, t, y = _logits(3), _logits(4), _labels(5)
        for temperature, weight in ((1.0, 0.5), (2.0, 0.3), (4.0, 0.9), (0.5, 1.0)):

            def total(s, temperature=temperature, weight=weight):
                return jnp.sum(distillation_loss(s, t, y, temperature=temperature, weight=weight))

            got = self.variant(jax.grad(total))(s)
            p, one_hot = jax.nn.softmax(s), jax.nn.one_hot(y, V)
            soft = jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)
            want = (1 - weight) * (p - one_hot) + weight * temperature * soft
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"T={temperature}, w={weight}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_gradient_reaches_the_teacher_logits(self):
        s, t, y = _logits(3), _logits(4), _labels(5)
        grad = self.variant(jax.grad(lambda t: jnp.sum(distillation_loss(s, t, y, temperature=2.0, weight=1.0))))(t)
        np.testing.assert_array_equal(grad, 0.0)


def _soft_gradient(s, t, temperature, *, squared=True):
    """The gradient of the soft term alone (w = 1), with or without the T^2 factor."""

    def soft(s):
        kl = jnp.sum(soft_target_kl(s, t, temperature=temperature))
        return kl * temperature**2 if squared else kl

    return jax.grad(soft)(s)


def test_t_squared_keeps_the_soft_gradient_scale_independent_of_t():
    # Small logit differences d = s - t: T (p_T - q_T) ~ J_T d, whose norm hardly depends on T, and
    # which tends to (d - mean(d)) / V as T grows (matching logits), the error falling as 1 / T.
    # Without the T^2 the gradient would fall as 1 / T^2.
    t = _logits(6, scale=0.5)
    d = _logits(7, scale=0.05)
    limit = (d - d.mean(axis=-1, keepdims=True)) / V
    norms, errors = {}, {}
    for temperature in (1.0, 2.0, 4.0, 8.0, 16.0, 64.0):
        grad = _soft_gradient(t + d, t, temperature)
        norms[temperature] = float(jnp.linalg.norm(grad))
        errors[temperature] = float(jnp.abs(grad - limit).max() / jnp.abs(limit).max())
        bare = float(jnp.linalg.norm(_soft_gradient(t + d, t, temperature, squared=False)))
        assert bare == pytest.approx(norms[temperature] / temperature**2, rel=1e-4)
    assert max(norms.values()) / min(norms.values()) < 1.05
    assert errors[64.0] < 0.02 and errors[64.0] < errors[16.0] / 3 < errors[4.0] / 9


@pytest.mark.parametrize(
    ("temperature", "weight", "match"),
    [
        (0.0, 0.5, r"temperature=0.0; accepted: a finite number > 0"),
        (-1.0, 0.5, r"temperature=-1.0"),
        (float("nan"), 0.5, r"temperature=nan"),
        (True, 0.5, r"temperature=True"),
        (2.0, -0.1, r"weight=-0.1; accepted: a number in \[0, 1\]"),
        (2.0, 1.5, r"weight=1.5"),
    ],
)
def test_bad_temperature_or_weight_is_named(temperature, weight, match):
    s, t, y = _logits(0), _logits(1), _labels(2)
    with pytest.raises(ValueError, match=f"distillation_loss: {match}"):
        distillation_loss(s, t, y, temperature=temperature, weight=weight)
    with pytest.raises(ValueError, match=f"distillation_objective: {match}"):
        distillation_objective(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), temperature=temperature, weight=weight)


def test_mismatched_logit_shapes_are_named():
    with pytest.raises(ValueError, match=r"student_logits \(3, 5, 11\) and teacher_logits \(3, 5, 12\)"):
        distillation_loss(_logits(0), _logits(1, (3, 5, 12)), _labels(2), temperature=1.0, weight=0.5)


# --- the objective inside the training step --------------------------------------------------

VOCAB = 32


def test_the_step_masks_and_averages_the_loss_and_leaves_the_teacher_alone():
    teacher = TransformerLM(ModelConfig(num_layers=1, width=32, num_heads=2, vocab_size=VOCAB), rngs=nnx.Rngs(1))
    student = TransformerLM(ModelConfig(num_layers=1, width=16, num_heads=2, vocab_size=VOCAB), rngs=nnx.Rngs(2))
    data = np.random.default_rng(0).integers(0, VOCAB, size=(4, 17)).astype(np.int32)
    mask = np.zeros((4, 16), bool)
    mask[:, 5:] = True
    mask[2] = False  # a row with nothing scored
    batch = Batch(data[:, :-1], data[:, 1:], mask)
    reference = jax.jit(lambda x, y: distillation_loss(student(x), teacher(x), y, temperature=2.0, weight=0.5))
    per_token = reference(batch.inputs, batch.targets)
    want = float(np.sum(np.where(mask, per_token, 0.0)) / mask.sum())
    assert want != pytest.approx(float(np.mean(per_token)), rel=1e-3)  # the mask matters here

    _, teacher_before = split_model(teacher)
    teacher_before = jax.tree.map(np.array, teacher_before)
    _, student_before = split_model(student)
    student_before = jax.tree.map(np.array, student_before)
    objective = distillation_objective(teacher, temperature=2.0, weight=0.5)
    optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    config = TrainConfig(steps=1, optimizer=optimizer)
    result = train(student, iter(lambda: batch, None), config, progress=False, objective=objective)
    assert result.history[0]["loss"] == pytest.approx(want, rel=1e-5)

    _, teacher_after = split_model(teacher)
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.array, teacher_after))
    _, student_after = split_model(student)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), student_before, student_after)
    assert all(jax.tree.leaves(moved))  # every student parameter got an update
