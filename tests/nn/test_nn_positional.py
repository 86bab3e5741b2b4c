"""ModelConfig.positional: RoPE (the default), NoPE ("none") and ALiBi ("alibi") in TransformerLM.

Properties: the three share their parameters and initial values; an ALiBi model is the NoPE model
with ALiBi's explicit [N, T, S] bias added on the dense path (and the memory-efficient paths give
the same); a NoPE model's last position cannot see the order of the tokens before it (a RoPE or
ALiBi model's can); decoding with the cache equals the full forward for both; errors name the
value and what is accepted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.attention.mask_functions import alibi_slopes
from attnlab.nn import ModelConfig, TransformerLM
from attnlab.nn.inspect import attention_logits

V = 32
# init_std well above the training default: the logits spread over several units, so a missing or
# wrong distance penalty moves the outputs far more than the tolerance.
TINY = {"vocab_size": V, "num_layers": 2, "width": 16, "num_heads": 4, "init_std": 0.3}


def _model(seed=0, **overrides):
    return TransformerLM(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


def _tokens(seed=1, shape=(2, 10)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


def _alibi_bias(num_heads: int, length: int) -> jax.Array:
    """ALiBi's bias as an explicit array [1, N, T, S]: slope_n * (s - t)."""
    distance = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]  # [T, S]: s - t
    return (alibi_slopes(num_heads)[:, None, None] * distance)[None].astype(jnp.float32)


def _forward_with_bias(model: TransformerLM, tokens: jax.Array, bias: jax.Array) -> jax.Array:
    """The model's forward written out, every attention layer given `bias` (dense path)."""
    h = model.embed(tokens)
    for block in model.blocks:
        h = h + block.attention(block.attention_norm(h), is_causal=True, bias=bias)
        h = h + block.mlp(block.mlp_norm(h))
    return model.embed.attend(model.final_norm(h)).astype(jnp.float32)


def test_every_positional_encoding_has_the_same_parameters_and_initial_values():
    states = [nnx.state(_model(positional=p), nnx.Param) for p in ("rope", "none", "alibi")]
    leaves = [jax.tree.leaves(state) for state in states]
    assert all(len(x) == len(leaves[0]) for x in leaves)
    for other in leaves[1:]:
        for a, b in zip(leaves[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    assert ModelConfig().positional == "rope"
    assert ModelConfig(positional="alibi").to_json()["positional"] == "alibi"


@pytest.mark.parametrize("normalizer", ["softmax", pytest.param("ssmax", marks=pytest.mark.slow), "entmax15"])
def test_alibi_logits_equal_the_nope_model_with_an_explicit_alibi_bias(normalizer):
    tokens = _tokens()
    model = _model(normalizer=normalizer, positional="alibi", implementation="dense")
    nope = _model(normalizer=normalizer, positional="none", implementation="dense")
    expected = _forward_with_bias(nope, tokens, _alibi_bias(TINY["num_heads"], tokens.shape[1]))
    np.testing.assert_allclose(model(tokens), expected, rtol=1e-5, atol=1e-5)
    # The bias matters: without it the logits are far from these.
    assert float(jnp.max(jnp.abs(nope(tokens) - expected))) > 1e-2
    # The memory-efficient paths take ALiBi as a score function and give the same logits.
    chunked = _model(normalizer=normalizer, positional="alibi", implementation="chunked", key_block=4)
    np.testing.assert_allclose(chunked(tokens), expected, rtol=2e-5, atol=2e-5)


def test_inspected_alibi_logits_carry_the_distance_penalty():
    tokens = _tokens(shape=(1, 6))
    with_alibi = attention_logits(_model(positional="alibi"), tokens)
    without = attention_logits(_model(positional="none"), tokens)
    # Layer 0 sees the same inputs in both models: the difference is exactly slope_n (s - t).
    np.testing.assert_allclose(with_alibi[0] - without[0], _alibi_bias(4, 6), rtol=1e-5, atol=1e-5)


def _permuted_prefix(tokens: jax.Array) -> jax.Array:
    """The tokens with every position but the last reversed (a permutation that moves each of them)."""
    return jnp.concatenate([tokens[:, -2::-1], tokens[:, -1:]], axis=1)


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_one_nope_layer_sees_the_set_of_earlier_tokens_not_their_order(normalizer):
    # Without positions, one causal attention layer at the last query is a function of that query
    # and the set of (key, value) pairs before it: reordering them leaves its logits as they were.
    # (With two layers the earlier positions' outputs depend on their own prefixes, so not so.)
    tokens = _tokens(shape=(2, 9))
    permuted = _permuted_prefix(tokens)
    assert not np.array_equal(tokens, permuted)
    nope = _model(normalizer=normalizer, positional="none", num_layers=1)
    np.testing.assert_allclose(nope(permuted)[:, -1], nope(tokens)[:, -1], rtol=1e-5, atol=1e-5)
    # RoPE and ALiBi see the order: the same permutation moves their last logits.
    for positional in ("rope", "alibi"):
        model = _model(normalizer=normalizer, positional=positional, num_layers=1)
        moved = float(jnp.max(jnp.abs(model(permuted)[:, -1] - model(tokens)[:, -1])))
        assert moved > 1e-3, positional


CHUNKS = (3, 2, 1, 1)  # a prompt, more of it at p = 3 (the mask path), then single steps (key lengths)


# One case per encoding and family by default (softmax without positions, 1.5-entmax with ALiBi);
# the other four with -m slow (tests/nn/test_nn_decode.py covers every normalizer's cache).
DECODING_CASES = [
    case if case in (("none", "softmax"), ("alibi", "entmax15")) else pytest.param(*case, marks=pytest.mark.slow)
    for case in [(p, n) for p in ("none", "alibi") for n in ("softmax", "ssmax", "entmax15")]
]


@pytest.mark.parametrize(("positional", "normalizer"), DECODING_CASES)
def test_decoding_equals_the_full_forward(positional, normalizer):
    model = _model(normalizer=normalizer, positional=positional)
    tokens = _tokens(shape=(2, sum(CHUNKS)))
    full = model(tokens)
    model.init_cache(tokens.shape[0], tokens.shape[1] + 2)
    pieces, start = [], 0
    for size in CHUNKS:
        pieces.append(model(tokens[:, start : start + size], decode=True))
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_errors_name_the_value_and_what_is_accepted():
    with pytest.raises(
        ValueError, match=r"positional='learned' is not a positional encoding; accepted: 'rope'.*'none'.*'alibi'"
    ):
        ModelConfig(positional="learned")
    with pytest.raises(ValueError, match=r"positional=None is not a positional encoding"):
        ModelConfig(positional=None)
    with pytest.raises(ValueError, match=r"rope_theta=None with positional='rope'.*set positional='none'"):
        ModelConfig(rope_theta=None)
    # Without RoPE an odd head_dim is fine (it is RoPE's pairs that need an even one).
    assert ModelConfig(width=12, num_heads=4, positional="alibi").head_dim == 3
    model = _model(positional="none")
    for keyword in ({"rope_theta": 5e5}, {"positions": jnp.arange(4)}):
        with pytest.raises(ValueError, match=r"is a RoPE setting, but this model has positional='none'"):
            model(_tokens(shape=(1, 4)), **keyword)
