"""The query-blocked path (any normalizer) under a causal mask: groups of query blocks that compute
only the keys they can see give the dense path's values, gradients and statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import normalizers
from attnlab.attention import dot_product_attention
from attnlab.attention.blocks import plan_groups
from attnlab.attention.query_blocked import MAX_GROUPS, drops_hidden_keys

# 300 queries in blocks of 32: groups with key extents 128, 256 and 300 (see the first test).
B, T, N, K, H, BLOCK = 1, 300, 2, 1, 8, 32


def _close(a, b, atol=2e-5, rtol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


def test_the_causal_plan_cuts_keys_in_three_groups():
    plan = plan_groups(T, T, True, BLOCK, MAX_GROUPS)
    assert [(g.first, g.count, g.extent) for g in plan] == [(0, 2, 128), (2, 6, 256), (8, 2, 300)]


@pytest.mark.parametrize("name", list(normalizers.NAMES))
def test_every_normalizer_gives_a_row_cut_after_hidden_keys_the_same_weights_and_gradients(name):
    """What the cut relies on: keys hidden by `where` get 0 and take no part in the others' weights."""
    normalizer = normalizers.get(name)
    assert drops_hidden_keys(normalizer, 40)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = 3.0 * jax.random.normal(keys[0], (6, 40))
    kept = 25
    valid = jax.random.bernoulli(keys[1], 0.7, (6, 40)).at[:, 0].set(True).at[:, kept:].set(False)
    cotangent = jax.random.normal(keys[2], (6, kept))

    def whole(x):
        return normalizer(x, axis=-1, where=valid)

    def cut(x):
        return normalizer(x[:, :kept], axis=-1, where=valid[:, :kept])

    np.testing.assert_array_equal(whole(x)[:, kept:], 0.0)
    _close(whole(x)[:, :kept], cut(x))
    grad_whole = jax.grad(lambda x: jnp.sum(whole(x)[:, :kept] * cotangent))(x)
    grad_cut = jax.grad(lambda x: jnp.sum(cut(x) * cotangent))(x)
    _close(grad_whole, grad_cut)


def _inputs(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 2.0 * jax.random.normal(keys[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (B, T, N, H))


@pytest.mark.parametrize(
    "normalizer",
    [
        normalizers.get("stablemax"),
        normalizers.get("stick_breaking"),
        normalizers.get("ssmax", s=jnp.array([0.3, 0.6])[:, None, None]),  # a parameter per head
        lambda x, *, axis=-1, where=None: jax.nn.softmax(x, axis=axis),  # reads hidden logits: rows stay whole
    ],
    ids=["stablemax", "stick_breaking", "ssmax-per-head", "callable-reading-hidden-keys"],
)
def test_causal_query_blocks_in_groups_equal_dense(normalizer):
    q, k, v, cotangent = _inputs()
    mass_keys = (jnp.arange(T) % 7 == 0)[None, :]
    kw = {"normalizer": normalizer, "is_causal": True, "statistics": True, "mass_keys": mass_keys}

    def attend(implementation, q, k, v):
        extra = {"query_block": BLOCK} if implementation == "query_blocked" else {}
        return dot_product_attention(q, k, v, implementation=implementation, **kw, **extra)

    (out, stats), (want, want_stats) = attend("query_blocked", q, k, v), attend("dense", q, k, v)
    _close(out, want)
    assert set(stats) == set(want_stats) >= {"max_weight", "entropy", "support_size", "key_mass"}
    for name in want_stats:
        _close(stats[name], want_stats[name], atol=1e-4)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(attend(implementation, q, k, v)[0] * cotangent)

    grads = jax.grad(loss("query_blocked"), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    for got, expected in zip(grads, want_grads, strict=True):
        _close(got, expected, atol=5e-5)
