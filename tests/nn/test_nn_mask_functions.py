"""The NNX layer with masks and scores as functions: equal to the same mask and bias as arrays, a
learned ALiBi slope per head gets its gradient, and decoding sees the sequence's positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.attention import mask_functions as mf
from attnlab.nn import MultiHeadAttention

B, T, F, N = 2, 12, 16, 4


class ALiBiAttention(nnx.Module):
    """Attention whose ALiBi slopes are parameters (learned)."""

    def __init__(self, normalizer: str, implementation: str | None):
        self.attention = MultiHeadAttention(N, F, normalizer=normalizer, implementation=implementation,
                                            key_block=4, query_block=4, rngs=nnx.Rngs(0))  # fmt: skip
        self.slopes = nnx.Param(mf.alibi_slopes(N))

    def __call__(self, x, segments, **kwargs):
        return self.attention(
            x, is_causal=not kwargs.get("decode", False), mask_fn=mf.document_mask(segments),
            score_fn=mf.alibi(self.slopes[...]), **kwargs,
        )  # fmt: skip


def _inputs():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, F))
    segments = jnp.asarray([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4], jnp.int32)
    return x, segments


@pytest.mark.slow  # tests/attention/test_mask_functions.py checks the same functions and the slopes' gradient
def test_functions_equal_arrays_and_the_slopes_get_their_gradient():
    x, segments = _inputs()
    model = ALiBiAttention("ssmax", "online")
    mask = (segments[:, None, :, None] == segments[:, None, None, :]) & jnp.tril(jnp.ones((T, T), bool))
    distance = (jnp.arange(T)[None, :] - jnp.arange(T)[:, None]).astype(jnp.float32)

    def with_arrays(model):
        bias = model.slopes[...][:, None, None] * distance
        return model.attention(x, mask=mask, bias=bias)

    np.testing.assert_allclose(model(x, segments), with_arrays(model), atol=2e-5)
    grads = nnx.grad(lambda m: jnp.sum(m(x, segments) ** 2))(model)
    expected = nnx.grad(lambda m: jnp.sum(with_arrays(m) ** 2))(model)
    np.testing.assert_allclose(grads.slopes[...], expected.slopes[...], atol=2e-4, rtol=1e-4)
    assert float(jnp.max(jnp.abs(grads.slopes[...]))) > 0


def test_decoding_with_functions_equals_the_full_forward():
    """A prompt of 5, then one token at a time: mask_fn and score_fn see q_idx = the position in the sequence."""
    x, segments = _inputs()
    model = ALiBiAttention("entmax15", None)
    full = model(x, segments)
    model.attention.init_cache((B, T, F))
    steps = [model(x[:, :5], segments, decode=True)]
    for t in range(5, T):
        steps.append(model(x[:, t : t + 1], segments, decode=True))
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_flax_layers_and_the_linen_layer_take_the_functions():
    """flax's own layer through attention_fn(mask_fn=...), and the Linen layer, equal the NNX layer's call."""
    from attnlab.nn import LinenMultiHeadAttention, attention_fn

    x, segments = _inputs()
    documents, alibi = mf.document_mask(segments), mf.alibi(mf.alibi_slopes(N))
    flax_layer = nnx.MultiHeadAttention(
        num_heads=N, in_features=F, decode=False, rngs=nnx.Rngs(0),
        attention_fn=attention_fn("softmax", mask_fn=documents, score_fn=alibi),
    )  # fmt: skip
    ours = MultiHeadAttention(N, F, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(flax_layer, nnx.Param))
    np.testing.assert_allclose(flax_layer(x), ours(x, mask_fn=documents, score_fn=alibi), atol=1e-5)
    linen = LinenMultiHeadAttention(num_heads=N, normalizer="sparsemax")
    variables = linen.init(jax.random.PRNGKey(1), x)
    got = linen.apply(variables, x, is_causal=True, mask_fn=documents)
    mask = segments[:, None, :, None] == segments[:, None, None, :]
    np.testing.assert_allclose(got, linen.apply(variables, x, is_causal=True, mask=mask), atol=1e-5)
