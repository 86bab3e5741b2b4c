"""Decoding with a key/value cache (issue 18): the NNX layer's `decode=True` / `init_cache`, the
TransformerLM's `decode` path and `attnlab.nn.generate`. The property throughout: decoding a
sequence in pieces (a prompt, more of it later, then one token at a time) gives the logits of the
full causal forward over the whole sequence, for every normalizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.losses import OutputNormalizer
from attnlab.nn import LinenMultiHeadAttention, ModelConfig, MultiHeadAttention, Sampling, TransformerLM, generate
from attnlab.nn.decoding import sample
from attnlab.normalizers import NAMES

B, T, V = 2, 6, 32
# init_std well above the training default: attention logits spread over several units, so sparse
# maps have small supports and a wrong key set changes the logits by far more than the tolerance.
TINY = {"vocab_size": V, "num_layers": 1, "width": 16, "num_heads": 2, "init_std": 0.3}
CHUNKS = (2, 2, 1, 1)  # a prompt, more of it at p = 2 (the mask path), then single steps (key lengths)
MAX_LENGTH = T + 2  # positions past the sequence stay hidden


def _model(seed=0, **overrides):
    model = TransformerLM(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))
    _spread_learned_normalizer_parameters(model, seed)
    return model


def _spread_learned_normalizer_parameters(model, seed):
    """Each head's learned normalizer parameters moved from the shared start, by a different amount,
    so that a head reading another head's parameters would show."""
    for i, block in enumerate(model.blocks):
        learned = block.attention.normalizer
        for j, name in enumerate(learned.names):
            param = getattr(learned, name)
            key = jax.random.fold_in(jax.random.key(seed), 10 * i + j)
            param[...] = param[...] + 0.1 * jax.random.uniform(key, param.shape)


def _tokens(seed=1, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


def _decoded(model, tokens, chunks=CHUNKS, **kwargs):
    """The decoding calls' outputs over `tokens` in pieces of `chunks`, joined along positions."""
    model.init_cache(tokens.shape[0], MAX_LENGTH)
    outputs, start = [], 0
    for size in chunks:
        outputs.append(model(tokens[:, start : start + size], decode=True, **kwargs))
        start += size
    assert start == tokens.shape[1]
    if isinstance(outputs[0], tuple):
        logits = jnp.concatenate([o[0] for o in outputs], axis=1)
        stats = {name: jnp.concatenate([o[1][name] for o in outputs], axis=-1) for name in outputs[0][1]}
        return logits, stats
    return jnp.concatenate(outputs, axis=1)


# ------------------------------------------------------------------------------------------------
# TransformerLM: decoding equals the full forward


@pytest.mark.parametrize("name", NAMES)
def test_decoding_equals_the_full_forward_for_every_normalizer(name):
    model = _model(normalizer=name)
    tokens = _tokens()
    full, full_stats = model(tokens, statistics=True)
    logits, stats = _decoded(model, tokens, statistics=True)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    for stat in ("max_weight", "support_size"):  # the weights too, not only what reaches the logits
        np.testing.assert_allclose(stats[stat], full_stats[stat], rtol=1e-5, atol=1e-5, err_msg=stat)
    assert int(model.blocks[0].attention.cache_index[...]) == T


def test_the_comparison_can_fail():
    # The tolerance is far below what a wrong cache does: one cached key changed moves the logits by > 1e-2.
    model = _model(normalizer="sparsemax")
    tokens = _tokens()
    full = model(tokens)
    model.init_cache(B, MAX_LENGTH)
    model(tokens[:, :2], decode=True)
    layer = model.blocks[0].attention
    layer.cached_key[...] = layer.cached_key[...].at[:, 0].set(-layer.cached_key[...][:, 0])
    later = model(tokens[:, 2:4], decode=True)
    assert float(jnp.max(jnp.abs(later - full[:, 2:4]))) > 1e-2


@pytest.mark.parametrize("name", ["softmax", "entmax15", "sink_softmax"])
def test_grouped_query_cache_with_a_gate(name):
    model = _model(normalizer=name, num_layers=2, num_kv_heads=1, gate="headwise")
    tokens = _tokens(2)
    full = model(tokens)
    np.testing.assert_allclose(_decoded(model, tokens), full, rtol=1e-5, atol=1e-5)
    layer = model.blocks[1].attention
    assert layer.cached_key[...].shape == layer.cached_value[...].shape == (B, MAX_LENGTH, 1, 8)  # [B, S, K, H]
    assert isinstance(layer.cached_key, nnx.Cache) and isinstance(layer.cache_index, nnx.Cache)
    np.testing.assert_array_equal(layer.cached_key[...][:, T:], 0.0)


def test_decoding_under_jit_equals_the_full_forward_and_nans_an_overflow():
    model = _model(normalizer="ssmax")
    tokens = _tokens(3)
    full = model(tokens)
    model.init_cache(B, T)
    step = nnx.jit(lambda model, x: model(x, decode=True))
    logits = jnp.concatenate([step(model, tokens[:, :4]), *(step(model, tokens[:, i : i + 1]) for i in (4, 5))], 1)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    # The index is traced: a call past max_length cannot raise, and gives NaN rather than wrong logits.
    assert bool(jnp.all(jnp.isnan(step(model, tokens[:, :1]))))


def test_cache_errors_name_the_problem():
    model = _model()
    tokens = _tokens()
    with pytest.raises(ValueError, match=r"no cache; call layer.init_cache"):
        model(tokens, decode=True)
    _decoded(model, tokens)  # 6 positions of 8
    with pytest.raises(ValueError, match=rf"3 new positions at index 6 do not fit max_length={MAX_LENGTH}"):
        model(tokens[:, :3], decode=True)
    with pytest.raises(ValueError, match=r"the inputs have batch 1; the cache was made for batch 2"):
        model(tokens[:1, :1], decode=True)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        model.init_cache(0, 4)
    model.init_cache(B, MAX_LENGTH)  # a new cache: decoding starts over
    assert int(model.blocks[0].attention.cache_index[...]) == 0


# ------------------------------------------------------------------------------------------------
# The NNX layer on its own, flax's conventions


def _layer(**kwargs):
    return MultiHeadAttention(2, 16, num_kv_heads=1, rope_theta=100.0, rngs=nnx.Rngs(0), **kwargs)


def test_layer_decode_flag_init_cache_and_view_follow_flax():
    x = jax.random.normal(jax.random.key(0), (B, T, 16))
    layer = _layer(normalizer="logn_entmax15", decode=True)
    full = layer(x, is_causal=True, decode=False)
    layer.init_cache((B, MAX_LENGTH, 16))  # flax: the whole sequence's input shape
    pieces = [layer(x[:, start : start + size]) for start, size in zip((0, 2, 4, 5), CHUNKS, strict=True)]
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    # nnx.view makes the cache on the way (flax's set_view).
    viewed = nnx.view(_layer(normalizer="stick_breaking"), decode=True, batch_size=B, max_length=MAX_LENGTH)
    assert viewed.decode and viewed.cached_key[...].shape == (B, MAX_LENGTH, 1, 8)
    full = viewed(x, is_causal=True, decode=False)
    pieces = [viewed(x[:, start : start + size]) for start, size in zip((0, 2, 4, 5), CHUNKS, strict=True)]
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_value_seq_lengths is set by the cache"):
        layer(x[:, :1], key_value_seq_lengths=jnp.array([1, 1]))
    with pytest.raises(ValueError, match="self-attention over the cache"):
        layer(x[:, :1], x[:, :2])


def test_layer_decoding_equals_flax_decoding_for_softmax():
    # flax's own layer, same parameters, one token at a time with its cache (no RoPE: flax has none).
    ours = MultiHeadAttention(2, 16, num_kv_heads=1, rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(2, 16, num_kv_heads=1, decode=True, rngs=nnx.Rngs(1))
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    x = jax.random.normal(jax.random.key(1), (B, 4, 16))
    ours.init_cache(x.shape)
    theirs.init_cache(x.shape)
    for t in range(4):
        np.testing.assert_allclose(ours(x[:, t : t + 1], decode=True), theirs(x[:, t : t + 1]), rtol=1e-5, atol=1e-5)


def test_linen_layer_refuses_to_decode():
    x = jnp.ones((B, T, 16))
    layer = LinenMultiHeadAttention(num_heads=2, decode=True)
    with pytest.raises(ValueError, match="does not decode with a cache"):
        layer.init(jax.random.key(0), x)


# ------------------------------------------------------------------------------------------------
# generate and sample


# Two normalizers in one model (one per layer): each generate compiles its programs once per model.
GENERATING = {"num_layers": 2, "normalizer": ("sparsemax", "ssmax")}


def test_greedy_generation_is_the_argmax_of_the_full_forward_at_each_step():
    model = _model(**GENERATING)
    prompt = _tokens(4, (B, 2))
    out = generate(model, prompt, max_new_tokens=4, greedy=True)
    assert out.shape == (B, T) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :2], prompt)
    # The full forward is causal, so its logits at position t are those of a rerun on out[:, : t + 1].
    np.testing.assert_array_equal(out[:, 2:], jnp.argmax(model(out)[:, 1:-1], axis=-1))
    assert model.blocks[0].attention.cached_key is None  # the cache lived in a copy
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=4, key=jax.random.key(5), top_k=1), out)


def test_sampling_is_reproducible_from_the_key_and_stays_in_the_support():
    model = _model(**GENERATING, output="sparsemax")
    prompt = _tokens(5, (B, 2))
    draw = lambda key, **kw: generate(model, prompt, max_new_tokens=4, key=jax.random.key(key), **kw)  # noqa: E731
    first = draw(0, temperature=1.5)
    np.testing.assert_array_equal(first, draw(0, temperature=1.5))
    assert not np.array_equal(first, draw(1, temperature=1.5))
    assert np.all((first >= 0) & (first < V))
    # Each drawn token has p > 0 under the sparse output normalizer at temperature 1.5.
    probabilities = model.probabilities(model(first)[:, 1:-1] / 1.5)
    drawn = jnp.take_along_axis(probabilities, first[:, 2:, None], axis=-1)
    assert np.all(drawn > 0)
    with pytest.raises(ValueError, match="sampling needs a key"):
        generate(model, prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        generate(model, prompt, max_new_tokens=2, key=jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="outside \\[0, vocab_size=32\\)"):
        generate(model, prompt + V, max_new_tokens=2, greedy=True)


@pytest.mark.parametrize(
    ("output", "sampling"),
    [("softmax", Sampling(temperature=0.7)), ("softmax", Sampling(top_k=3)), ("entmax15", Sampling(temperature=2.0))],
)
def test_draws_follow_the_output_normalizers_probabilities(output, sampling):
    logits = jnp.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0])
    rows = 20_000
    tokens = sample(jnp.broadcast_to(logits, (rows, 6)), jax.random.key(0), sampling, output)
    kept = jnp.ones(6, bool) if sampling.top_k is None else logits >= jnp.sort(logits)[-sampling.top_k]
    p = OutputNormalizer.parse(output).probabilities(logits / sampling.temperature, where=kept)
    frequencies = np.bincount(np.asarray(tokens), minlength=6) / rows
    np.testing.assert_allclose(frequencies, p, atol=0.015)  # about 4 standard errors
    np.testing.assert_array_equal(frequencies[np.asarray(p) == 0], 0.0)
