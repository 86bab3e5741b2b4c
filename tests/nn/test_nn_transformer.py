"""TransformerLM: shapes, causality, per-layer normalizers, statistics, RoPE override, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import ModelConfig, NormalizerSpec, TransformerLM

TINY = {"num_layers": 2, "width": 32, "num_heads": 2, "vocab_size": 64}


def _model(seed=0, **overrides):
    return TransformerLM(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


def _tokens(seed=0, shape=(2, 12), vocab=64):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_logits_are_float32_batch_seq_vocab_and_causal():
    model = _model()
    tokens = _tokens()
    logits = model(tokens)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 64)
    after = model(changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(after[:, :7]))
    assert not np.allclose(logits[:, 7:], after[:, 7:])


def test_each_layer_gets_its_own_normalizer_and_learned_parameters():
    model = _model(normalizer=("ssmax", NormalizerSpec("entmax", {"alpha": 1.3}, learn=("alpha",))))
    first, second = model.blocks[0].attention.normalizer, model.blocks[1].attention.normalizer
    assert first.names == ("s",) and first.s[...].shape == (2, 1, 1)
    assert second.names == ("alpha_logit",)
    assert model.config.normalizer[0].name == "ssmax" and model.config.normalizer[1].learn == ("alpha",)
    assert model.config.to_json()["normalizer"][1] == {"name": "entmax", "alpha": 1.3, "learn": ["alpha"]}


def test_a_single_normalizer_applies_to_every_layer():
    config = ModelConfig(**TINY, normalizer="sparsemax")
    assert [spec.name for spec in config.normalizer] == ["sparsemax", "sparsemax"]


def test_tied_embedding_has_no_output_head_and_untied_has_one():
    tied, untied = _model(), _model(tie_embeddings=False)
    n_tied, n_untied = tied.num_params(), untied.num_params()
    assert n_untied - n_tied == 32 * 64


def test_statistics_are_per_layer_head_and_position_and_match_the_normalizer():
    model = _model(normalizer=("softmax", "sparsemax"))
    tokens = _tokens(1)
    logits, stats = model(tokens, statistics=True)
    np.testing.assert_allclose(logits, model(tokens), rtol=1e-6, atol=1e-6)
    assert set(stats) == {"max_weight", "entropy", "support_size"}
    for value in stats.values():
        assert value.shape == (2, 2, 2, 12)  # [L, B, N, T]
    positions = np.arange(12)
    # softmax sees every earlier key (t + 1 non-zeros); sparsemax never more, and somewhere fewer
    np.testing.assert_array_equal(stats["support_size"][0], np.broadcast_to(positions + 1, (2, 2, 12)))
    assert np.all(stats["support_size"][1] <= positions + 1)
    assert np.all((stats["max_weight"] >= 1 / (positions + 1) - 1e-6) & (stats["max_weight"] <= 1 + 1e-6))


def test_mass_keys_gives_the_weight_on_chosen_positions():
    model = _model()
    tokens = _tokens(2)
    everything = np.ones((2, 12), bool)
    _, stats = model(tokens, mass_keys=everything)
    np.testing.assert_allclose(stats["key_mass"], 1.0, rtol=1e-5)
    first_only = np.zeros((2, 12), bool)
    first_only[:, 0] = True
    _, stats = model(tokens, mass_keys=first_only)
    np.testing.assert_allclose(stats["key_mass"][..., 0], 1.0, rtol=1e-5)  # query 0 sees only key 0
    assert np.all(stats["key_mass"][..., 1:] < 1.0)


def test_rope_theta_at_call_time_changes_later_positions_only():
    model = _model()
    tokens = _tokens(3)
    base, raised = model(tokens), model(tokens, rope_theta=50 * 10_000.0)
    np.testing.assert_allclose(model(tokens, rope_theta=10_000.0), base, rtol=1e-6, atol=1e-6)
    # position 0 attends only to itself, where the rotation cancels
    np.testing.assert_allclose(raised[:, 0], base[:, 0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(raised[:, 1:], base[:, 1:], atol=1e-4)


def test_chunked_attention_gives_the_dense_logits():
    normalizer = ("ssmax", "entmax15")
    dense = _model(normalizer=normalizer, implementation="dense")
    chunked = _model(normalizer=normalizer, implementation="chunked", key_block=8)
    tokens = _tokens(4, shape=(1, 20))
    np.testing.assert_allclose(chunked(tokens), dense(tokens), rtol=2e-5, atol=2e-5)


def test_bfloat16_computation_returns_float32_logits_close_to_float32():
    tokens = _tokens(5)
    full, half = _model(), _model(dtype="bfloat16")
    out = half(tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, full(tokens), atol=0.05)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"normalizer": ("softmax",)}, r"num_layers=2 entries; got 1"),
        ({"normalizer": "nope"}, r"normalizer.*'nope'"),
        ({"normalizer": ("softmax", "nope")}, r"normalizer\[1\]"),
        ({"width": 30, "num_heads": 4}, r"30"),
        ({"num_layers": 0}, r"num_layers must be an int >= 1; got 0"),
        ({"dtype": "float64"}, r"dtype='float64'; accepted: float32, bfloat16, float16"),
        ({"rope_theta": -1.0}, r"rope_theta"),
    ],
)
def test_config_errors_name_the_field_and_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **overrides})


def test_tokens_must_be_an_int_matrix():
    with pytest.raises(ValueError, match=r"tokens must be an int array \[batch, seq\]"):
        _model()(jnp.zeros((2, 3), jnp.float32))


def test_tokens_outside_the_vocabulary_are_named_not_turned_into_nan():
    model = _model()
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token {vocab} at \(1, 2\) is outside \[0, vocab_size={vocab}\)"):
        model(jnp.asarray([[0, 1, 2], [3, 4, vocab]]))
    with pytest.raises(ValueError, match=r"token -1 at \(0, 0\)"):
        model(jnp.asarray([[-1, 1, 2]]))
