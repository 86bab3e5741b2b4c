"""Training: optimizer, overfitting every normalizer, determinism, checkpoints and resumption (from
the saved data position, refusing other settings), divergence and evaluation. Several devices:
tests/train/test_sharding.py; the checkpoint folder itself: tests/train/test_checkpoint.py."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import normalizers
from attnlab.data.batch import Batch
from attnlab.nn import ModelConfig, NormalizerSpec, TransformerLM
from attnlab.train import (
    CheckpointError,
    OptimizerConfig,
    TrainConfig,
    TrainingDiverged,
    TrainState,
    checkpoint,
    decay_mask,
    evaluate,
    learning_rate_schedule,
    make_optimizer,
    split_model,
    train,
)

TINY = {"num_layers": 1, "width": 32, "num_heads": 2, "vocab_size": 32}
FAST = OptimizerConfig(learning_rate=1e-2, warmup_steps=5, schedule="constant", weight_decay=0.0)


def _batch(seed=0, batch=4, length=32, vocab=16):
    data = np.random.default_rng(seed).integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
    return Batch(data[:, :-1], data[:, 1:], np.ones((batch, length), bool))


def _stream(seed=0, **kwargs):
    step = 0
    while True:
        yield _batch(seed * 1000 + step, **kwargs)
        step += 1


def _model(normalizer="softmax", seed=0):
    return TransformerLM(ModelConfig(**TINY, normalizer=normalizer), rngs=nnx.Rngs(seed))


def _losses(result):
    return [record["loss"] for record in result.history]


def _fresh_state(model, config):
    """The state `train` starts from (step 0), to write checkpoints without training."""
    _, params = split_model(model)
    return TrainState(
        jnp.zeros((), jnp.int32), params, make_optimizer(config.optimizer, config.steps, params).init(params)
    )


# --- optimizer -------------------------------------------------------------------------------


def test_weight_decay_applies_to_kernels_and_embeddings_only():
    _, params = split_model(_model(NormalizerSpec("ssmax", learn=("s", "bias"))))
    decayed = {
        jax.tree_util.keystr(path): flag for path, flag in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    }
    assert any("embedding" in name for name, flag in decayed.items() if flag)
    for name, flag in decayed.items():
        assert flag == ("kernel" in name or "embedding" in name), name
    assert not decayed["['blocks'][0]['attention']['normalizer']['s'].value"]


def test_decay_leaves_unmasked_parameters_alone():
    _, params = split_model(_model("ssmax"))
    optimizer = make_optimizer(
        OptimizerConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5), 10, params
    )
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero, optimizer.init(params), params)
    s_update = updates["blocks"][0]["attention"]["normalizer"]["s"][...]
    kernel_update = updates["blocks"][0]["attention"]["query"]["kernel"][...]
    kernel = params["blocks"][0]["attention"]["query"]["kernel"][...]
    np.testing.assert_array_equal(s_update, 0.0)
    np.testing.assert_allclose(kernel_update, -0.1 * 0.5 * kernel, rtol=1e-6)


def test_schedule_warms_up_then_decays_to_the_final_fraction():
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule="cosine", final_fraction=0.1)
    lr = learning_rate_schedule(config, 110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-5)
    constant = learning_rate_schedule(OptimizerConfig(warmup_steps=0, schedule="constant"), 50)
    assert float(constant(0)) == float(constant(49)) == 1e-3


def test_ssmax_paper_preset_is_the_papers_recipe_with_scaled_warmup():
    preset = OptimizerConfig.ssmax_paper(500)
    assert (preset.learning_rate, preset.b1, preset.b2, preset.weight_decay, preset.clip_norm) == (
        6e-4,
        0.9,
        0.95,
        0.1,
        1.0,
    )
    assert preset.warmup_steps == 50 and OptimizerConfig.ssmax_paper(100_000).warmup_steps == 1000


def test_clipping_makes_a_huge_gradient_act_like_its_unit_norm_direction():
    params = {"w": {"kernel": np.ones((3, 3), np.float32)}}
    huge = {"w": {"kernel": np.full((3, 3), 1e6, np.float32)}}
    unit = {"w": {"kernel": np.full((3, 3), 1.0 / 3.0, np.float32)}}  # same direction, norm 1

    def first_update(grads, clip_norm):
        # eps = 1 makes Adam's step depend on the gradient's scale, so clipping shows in the update
        config = OptimizerConfig(
            learning_rate=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, eps=1.0, clip_norm=clip_norm
        )
        optimizer = make_optimizer(config, 1, params)
        return optimizer.update(grads, optimizer.init(params), params)[0]["w"]["kernel"]

    np.testing.assert_allclose(first_update(huge, 1.0), first_update(unit, 1.0), rtol=1e-6)
    assert not np.allclose(first_update(huge, None), first_update(unit, None), rtol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": 0.0}, r"learning_rate must be a number > 0.0; got 0.0"),
        ({"schedule": "linear"}, r"schedule='linear'; accepted: constant, cosine"),
        ({"warmup_steps": -1}, r"warmup_steps must be an int >= 0; got -1"),
        ({"b2": 1.5}, r"b2 must be a number >= 0.0 and <= 1.0; got 1.5"),
    ],
)
def test_optimizer_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"TrainConfig.steps must be an int >= 1; got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"TrainConfig.keep_checkpoints must be an int >= 1; got 0"):
        TrainConfig(keep_checkpoints=0)


# --- training --------------------------------------------------------------------------------


# Every normalizer; those whose code the default set already trains (the same mapping or scale
# policy) run with -m slow, to keep the default suite under 10 minutes.
OVERFIT_DEFAULT = ("softmax", "sparsemax", "logn_entmax15")  # + learned alpha: entmax, the log n policy
OVERFIT_CASES = [
    pytest.param(name, marks=() if name in OVERFIT_DEFAULT else pytest.mark.slow, id=name) for name in normalizers.NAMES
] + [pytest.param(NormalizerSpec("entmax", learn=("alpha",)), id="entmax_learned_alpha")]


@pytest.mark.parametrize("normalizer", OVERFIT_CASES)
def test_overfitting_one_batch_drives_the_loss_down(normalizer):
    batch = _batch()
    result = train(
        _model(normalizer),
        iter(lambda: batch, None),
        TrainConfig(steps=80, optimizer=FAST, log_every=1),
        progress=False,
    )
    before, after = result.history[0]["loss"], result.history[-1]["loss"]  # at the initial and the 80th parameters
    assert np.isfinite(after)
    assert before > 3.0 and after < 0.4 * before, (before, after)


def test_the_same_seed_gives_the_same_losses():
    config = TrainConfig(steps=6, optimizer=FAST, log_every=1)
    first = train(_model(seed=1), _stream(0), config, progress=False)
    second = train(_model(seed=1), _stream(0), config, progress=False)
    assert _losses(first) == _losses(second)
    assert all(np.isfinite(_losses(first))) and len(set(_losses(first))) == 6
    assert [r["step"] for r in first.history] == [1, 2, 3, 4, 5, 6]
    assert first.tokens == 6 * 4 * 32 and first.tokens_per_second > 0 and first.compile_seconds > 0
    _, one = split_model(_model(seed=1))
    _, two = split_model(_model(seed=2))  # another seed is another model
    assert not np.allclose(one["embed"]["embedding"][...], two["embed"]["embedding"][...])


@contextlib.contextmanager
def _backend_compiles():
    """Yields a list that collects the duration of each XLA compilation while the block runs."""
    compiles: list[float] = []

    def listen(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_a_second_seed_reuses_the_compiled_steps_and_trains_as_it_would_alone():
    from attnlab.train import loop

    config = TrainConfig(steps=4, optimizer=FAST, log_every=1, eval_every=2)
    held_out = [_batch(7)]

    def fresh(seed, stream):
        for cache in (loop._optimizer, loop._compiled_steps):
            cache.cache_clear()
        return train(_model(seed=seed), _stream(stream), config, eval_batches=lambda: held_out, progress=False)

    alone = fresh(2, 3)
    fresh(1, 0)
    with _backend_compiles() as compiles:
        again = train(_model(seed=2), _stream(3), config, eval_batches=lambda: held_out, progress=False)
    assert compiles == []  # neither the train step nor the eval step (nor anything else) compiled again
    assert again.history == [{**r, **{k: a[k] for k in ("tokens_per_second", "elapsed_seconds")}}
                             for r, a in zip(alone.history, again.history, strict=True)]  # fmt: skip
    assert again.evaluations == alone.evaluations
    # Another structure (a wider model) or other optimizer settings compile their own.
    wider = TransformerLM(ModelConfig(**{**TINY, "width": 48}), rngs=nnx.Rngs(2))
    other = TrainConfig(steps=4, optimizer=OptimizerConfig(learning_rate=3e-3), log_every=2)
    for model, settings in ((wider, config), (_model(seed=2), other)):
        with _backend_compiles() as compiles:
            train(model, _stream(3), settings, progress=False)
        assert compiles, settings


def _interrupting(stream, after):
    for i, batch in enumerate(stream):
        if i == after:
            raise KeyboardInterrupt
        yield batch


def test_a_run_interrupted_and_resumed_from_its_checkpoint_gives_identical_losses(tmp_path):
    config = TrainConfig(steps=8, optimizer=FAST, log_every=1, checkpoint_every=3)
    straight = train(_model("ssmax"), _stream(3), config, progress=False)
    path = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_model("ssmax"), _interrupting(_stream(3), 4), config, checkpoint=path, progress=False)
    saved = checkpoint.read_metadata(path)
    assert saved["history"][-1]["step"] == 3 and saved["data_position"] == 3
    resumed_model = _model("ssmax", seed=7)  # a different init: everything must come from the checkpoint
    resumed = train(resumed_model, _stream(3), config, checkpoint=path, metadata={"note": "x"}, progress=False)
    assert [r["step"] for r in resumed.history] == list(range(1, 9))
    assert _losses(resumed) == _losses(straight)
    assert int(resumed.state.step) == 8 and checkpoint.read_metadata(path)["note"] == "x"
    assert sorted(int(p.name) for p in path.iterdir()) == [6, 8]  # saved at 3, 6, 8; keep_checkpoints=2
    assert checkpoint.read_metadata(path)["data_position"] == 8
    restored, _ = checkpoint.restore(path, resumed.state)  # the final save holds the final state
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, in_module = split_model(resumed_model)  # train() leaves the trained parameters in the module
    for a, b in zip(jax.tree.leaves(in_module), jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_skips_the_batches_the_checkpoint_consumed_not_its_step_count(tmp_path):
    config = TrainConfig(steps=1, optimizer=FAST, log_every=1)
    model, folder = _model(), tmp_path / "run"
    checkpoint.save(folder, _fresh_state(model, config), {"data_position": 5})  # step 0, 5 batches consumed
    pulled = []

    def counted():
        for index, batch in enumerate(_stream(2)):
            pulled.append(index)
            yield batch

    train(model, counted(), config, checkpoint=folder, progress=False)
    assert pulled == [0, 1, 2, 3, 4, 5]  # five skipped, the sixth trained on
    assert checkpoint.latest_step(folder) == 1 and checkpoint.read_metadata(folder)["data_position"] == 6


def test_train_refuses_a_checkpoint_of_other_settings_or_another_model(tmp_path):
    config = TrainConfig(steps=1, optimizer=FAST)
    folder = tmp_path / "run"
    checkpoint.save(folder, _fresh_state(_model(), config), {"data_position": 0, "settings": {"seed": 0}})
    with pytest.raises(CheckpointError, match=r"was saved with other settings \(seed: saved 0, given 1\)"):
        train(_model(), _stream(), config, checkpoint=folder, metadata={"settings": {"seed": 1}}, progress=False)
    with pytest.raises(CheckpointError, match=r"does not match the model: missing 3 arrays"):
        train(_model("ssmax"), _stream(), config, checkpoint=folder, progress=False)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"'.*file' is a file, not a folder"):
        train(_model(), _stream(), config, checkpoint=tmp_path / "file", progress=False)


def test_restoring_into_another_model_names_the_differences(tmp_path):
    model = _model("softmax")
    _, params = split_model(model)
    path = checkpoint.save(tmp_path / "p", params, {"step": 0}, step=0)
    _, other = split_model(_model("ssmax"))
    with pytest.raises(
        CheckpointError, match=r"missing 1 arrays, e.g. \['blocks'\]\[0\]\['attention'\]\['normalizer'\]"
    ):
        checkpoint.restore(path, other)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        checkpoint.restore(tmp_path / "none", params)


# --- divergence ------------------------------------------------------------------------------

HUGE = OptimizerConfig(learning_rate=1e6, warmup_steps=0, schedule="constant", weight_decay=0.0)


def test_divergence_names_the_first_bad_step_and_no_diverged_state_is_saved(tmp_path):
    # (The CLI test in test_experiment_trust.py diverges with learning rate 1e6 end to end.)
    from attnlab.train.step import token_losses

    poisoned_step = 6  # its batch starts with token 31, which the objective turns into a NaN loss

    def stream():
        for index, batch in enumerate(_stream(5)):
            if index + 1 == poisoned_step:
                batch.inputs[0, 0] = 31
            yield batch

    def objective(logits, batch):
        return token_losses(logits, batch.targets) * jnp.where(batch.inputs[0, 0] == 31, jnp.nan, 1.0)

    records = []
    folder = tmp_path / "run"
    config = TrainConfig(steps=8, optimizer=FAST, log_every=4, checkpoint_every=4)
    with pytest.raises(TrainingDiverged) as caught:
        train(
            _model(), stream(), config, objective=objective, on_record=records.append, checkpoint=folder, progress=False
        )
    error = caught.value
    message = str(error)
    assert message.startswith("training 'model' diverged at step 6: loss = nan, grad_norm = nan"), message
    assert "lower the learning rate (0.01)" in message and "\n" not in message
    assert error.step == poisoned_step and np.isnan(error.loss)
    assert [r["step"] for r in records] == [4]  # found at the record of step 8, named as step 6
    # The check comes before the save due at step 8: the last checkpoint is step 4's, finite
    # (restore refuses NaN or inf).
    assert checkpoint.latest_step(folder) == 4
    restored, metadata = checkpoint.restore(folder, _fresh_state(_model(), config))
    assert int(restored.step) == 4 and metadata["history"][-1]["step"] == 4


def test_evaluation_metrics_and_validation_during_training():
    batch = _batch(5)
    result = train(
        _model(),
        _stream(1),
        TrainConfig(steps=4, optimizer=FAST, log_every=2, eval_every=2),
        eval_batches=lambda: [batch, batch],
        progress=False,
    )
    assert [e["step"] for e in result.evaluations] == [2, 4]
    final = result.evaluations[-1]
    assert final["scored_tokens"] == 2 * 4 * 32 and final["batches"] == 2
    assert 0.0 <= final["token_accuracy"] <= 1.0


def test_a_finished_checkpoint_trained_without_evaluation_is_evaluated_when_restored(tmp_path):
    # A tuning model may restore a model another run finished without eval_batches: it still needs
    # its validation loss (length_generalization stopped on exactly this).
    config, batch, path = TrainConfig(steps=3, optimizer=FAST, log_every=1), _batch(5), tmp_path / "run"
    first = train(_model(), _stream(1), config, checkpoint=path, progress=False)
    assert first.evaluations == []
    restored_model = _model(seed=7)
    again = train(restored_model, _stream(1), config, eval_batches=lambda: [batch], checkpoint=path, progress=False)
    assert _losses(again) == _losses(first)  # restored, not trained again
    (final,) = again.evaluations
    assert final["step"] == 3 and final["loss"] == pytest.approx(evaluate(restored_model, [batch]).loss, rel=1e-6)


def test_a_checkpoint_restored_with_other_validation_data_is_evaluated_again(tmp_path, capsys):
    # Saved evaluations hold only for the batches they were measured on: the same model restored
    # with other eval_batches must report its loss on those, not the saved one.
    config, path = TrainConfig(steps=3, optimizer=FAST, log_every=1), tmp_path / "run"
    first_data, other_data = _batch(5), _batch(6)
    first = train(_model(), _stream(1), config, eval_batches=lambda: [first_data], checkpoint=path, progress=False)
    same = train(_model(seed=7), _stream(1), config, eval_batches=lambda: [first_data], checkpoint=path, progress=False)
    assert same.evaluations == first.evaluations
    assert "other validation data" not in capsys.readouterr().err
    restored_model = _model(seed=7)
    other = train(
        restored_model, _stream(1), config, eval_batches=lambda: [other_data], checkpoint=path, progress=False
    )
    assert "measured on other validation data" in capsys.readouterr().err
    assert _losses(other) == _losses(first)  # restored, not trained again
    (final,) = other.evaluations
    assert final["step"] == 3
    assert final["loss"] == pytest.approx(evaluate(restored_model, [other_data]).loss, rel=1e-6)
    assert final["loss"] != pytest.approx(first.evaluations[-1]["loss"], rel=1e-6)


def test_per_position_loss_averages_to_the_loss_and_scores_only_masked_positions():
    model = _model()
    batch = _batch(6)
    mask = np.zeros_like(batch.loss_mask)
    mask[:, 20:] = True
    result = evaluate(model, [batch._replace(loss_mask=mask)])
    assert np.all(np.isnan(result.per_position_loss[:20])) and np.all(np.isfinite(result.per_position_loss[20:]))
    np.testing.assert_allclose(np.mean(result.per_position_loss[20:]), result.loss, rtol=1e-6)
    logits = model(batch.inputs)
    right = np.asarray(logits.argmax(-1) == batch.targets)[:, 20:]
    np.testing.assert_allclose(result.token_accuracy, right.mean(), rtol=1e-6)
    assert result.sequence_accuracy == float(np.mean(right.all(axis=1)))


def test_a_raised_rope_theta_changes_the_loss_after_position_zero_only():
    model = _model()
    batch = _batch(7)
    base, raised = evaluate(model, [batch]), evaluate(model, [batch], rope_theta=5e5)
    np.testing.assert_allclose(raised.per_position_loss[0], base.per_position_loss[0], rtol=1e-5)
    assert not np.allclose(raised.per_position_loss[1:], base.per_position_loss[1:], rtol=1e-5)


def test_running_out_of_batches_is_a_clear_error():
    with pytest.raises(ValueError, match=r"the batches ran out after 2 of 5 steps"):
        train(_model(), [_batch(), _batch()], TrainConfig(steps=5, optimizer=FAST), progress=False)


# --- the loss: the model's output normalizer, or a caller's objective -------------------------


def test_a_sparse_output_trains_and_evaluates_with_its_own_loss():
    from attnlab import losses

    batch = _batch(3)
    model = TransformerLM(ModelConfig(**TINY, output="sparsemax"), rngs=nnx.Rngs(0))
    logits = model(batch.inputs)
    want = float(np.mean(losses.multiclass_sparsemax_loss(logits, batch.targets)))
    assert evaluate(model, [batch]).loss == pytest.approx(want, rel=1e-5)
    probs = np.asarray(model.probabilities(logits))
    np.testing.assert_allclose(probs, np.asarray(normalizers.sparsemax(logits)), atol=1e-6)
    result = train(model, iter(lambda: batch, None), TrainConfig(steps=30, optimizer=FAST, log_every=1), progress=False)
    # The step minimises the sparsemax loss: on one batch it reaches exact zeros on most targets' rivals.
    assert _losses(result)[0] == pytest.approx(want, rel=1e-4)
    assert _losses(result)[-1] < 0.3 * _losses(result)[0]
    assert float(np.mean(np.asarray(model.probabilities(model(batch.inputs))) == 0)) > 0.5


def test_an_objective_replaces_the_loss_of_the_step():
    from attnlab.train.step import token_losses

    batch = _batch(4)
    model = _model()
    initial = float(np.mean(token_losses(model(batch.inputs), batch.targets)))

    def doubled(logits, b):
        return 2.0 * token_losses(logits, b.targets)

    config = TrainConfig(steps=1, optimizer=FAST, log_every=1)
    result = train(model, iter(lambda: batch, None), config, objective=doubled, progress=False)
    assert _losses(result)[0] == pytest.approx(2 * initial, rel=1e-5)
