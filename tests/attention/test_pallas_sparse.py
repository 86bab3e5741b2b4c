"""pallas_sparse_attention (interpret mode on CPU) against the dense XLA reference.

Sizes are small because the Pallas interpreter is slow; T and S are deliberately not multiples
of the 64-wide blocks, so padding is always exercised. Every call with the same shapes, dtype,
alpha and causality reuses one compiled kernel (key lengths are a traced input). The dense
reference runs eagerly (its ops, compiled once, are shared by every case); gradients and the
threshold iteration run under `jax.jit` (one compilation instead of one per eager op).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlab
from attnlab import normalizers
from attnlab.attention.pallas_sparse import (
    pallas_sparse_attention,
    sparse_attention_block_counts,
    threshold_step,
)
from attnlab.normalizers.thresholds import entmax_threshold

B, T, S, N, H = 2, 100, 130, 2, 16
ALPHAS = {"sparsemax": 2.0, "entmax15": 1.5, "entmax_1.3": 1.3}


def _normalizer(alpha):
    if alpha == 2.0:
        return "sparsemax"
    if alpha == 1.5:
        return "entmax15"
    return normalizers.get("entmax", alpha=alpha)


def _inputs(seed=0, dtype=jnp.float32, t=T, s=S, n=N, kv_heads=N, h=H, spread=2.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    # `spread` widens the logits so that the maps are visibly sparse.
    q = (spread * jax.random.normal(keys[0], (B, t, n, h))).astype(dtype)
    k = jax.random.normal(keys[1], (B, s, kv_heads, h)).astype(dtype)
    v = jax.random.normal(keys[2], (B, s, kv_heads, h)).astype(dtype)
    return q, k, v


def _scaled(q):
    # The kernel expects pre-scaled queries; this is the same op the dense path applies inside.
    return q * (1.0 / math.sqrt(q.shape[-1]))


def _dense(q, k, v, alpha, is_causal, key_lengths=None):
    return attnlab.dot_product_attention(
        q,
        k,
        v,
        normalizer=_normalizer(alpha),
        is_causal=is_causal,
        key_value_seq_lengths=key_lengths,
        implementation="dense",
    )


def _max_error(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alpha", list(ALPHAS.values()), ids=list(ALPHAS))
def test_matches_dense_reference(alpha, is_causal):
    q, k, v = _inputs()
    lengths = jnp.array([S, 77])
    out = pallas_sparse_attention(_scaled(q), k, v, alpha=alpha, is_causal=is_causal, key_lengths=lengths)
    ref = _dense(q, k, v, alpha, is_causal, lengths)
    assert out.shape == (B, T, N, H) and out.dtype == q.dtype
    assert _max_error(out, ref) <= 1e-5
    # the inputs are sparse enough that the test means something: some weights are exactly zero
    _, aux = attnlab.dot_product_attention(
        q, k, v, normalizer=_normalizer(alpha), is_causal=is_causal, key_value_seq_lengths=lengths, statistics=True
    )
    assert float(jnp.min(aux["support_size"][1])) < 77


def test_zero_length_row_gives_zero_and_the_other_row_is_exact():
    q, k, v = _inputs(seed=1)
    lengths = jnp.array([0, 45])
    out = pallas_sparse_attention(_scaled(q), k, v, alpha=1.5, is_causal=False, key_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert _max_error(out, _dense(q, k, v, 1.5, False, lengths)) <= 1e-5


def test_causal_without_lengths_and_block_counts_follow_the_diagonal():
    q, k, v = _inputs(seed=2)
    out, counts = sparse_attention_block_counts(_scaled(q), k, v, alpha=2.0, is_causal=True)
    assert _max_error(out, _dense(q, k, v, 2.0, True)) <= 1e-5
    # T = 100 -> query blocks [0, 64) and [64, 128); S = 130 -> key blocks of 64.
    np.testing.assert_array_equal(np.asarray(counts["reachable"]), np.broadcast_to([1, 2], (B, N, 2)))


@pytest.mark.parametrize("alpha", [2.0, 1.3], ids=["sparsemax", "entmax_1.3"])
def test_key_blocks_without_support_are_skipped(alpha):
    # Every query's large logits sit in key block 2 of 4 (keys 128..191); all other keys score far
    # below the threshold, so only that block may be visited after the first pass.
    t, s = 64, 256
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, s))
    q = jnp.zeros((B, t, N, H)).at[..., 0].set(4.0).at[..., 1].set(0.5 * noise[0, :t, None])
    sign = jnp.where((jnp.arange(s) >= 128) & (jnp.arange(s) < 192), 1.0, -1.0)
    k = jnp.zeros((B, s, N, H)).at[..., 0].set((sign + 0.2 * noise[1])[:, None]).at[..., 1].set(0.5 * noise[2, :, None])
    v = jax.random.normal(jax.random.PRNGKey(4), (B, s, N, H))
    iterations = 8
    out, counts = sparse_attention_block_counts(q, k, v, alpha=alpha, is_causal=False, num_iterations=iterations)
    dense = functools.partial(
        attnlab.dot_product_attention, normalizer=_normalizer(alpha), scale=1.0, implementation="dense"
    )
    ref = jax.jit(dense)(q, k, v)
    assert _max_error(out, ref) <= 1e-5
    np.testing.assert_array_equal(np.asarray(counts["reachable"]), 4)
    np.testing.assert_array_equal(np.asarray(counts["output"]), 1)
    assert 1 <= int(jnp.max(counts["threshold"])) <= iterations


def test_bfloat16_inputs():
    q, k, v = _inputs(seed=5, dtype=jnp.bfloat16)
    lengths = jnp.array([S, 90])
    out = pallas_sparse_attention(_scaled(q), k, v, alpha=1.5, is_causal=True, key_lengths=lengths)
    ref = _dense(q, k, v, 1.5, True, lengths)
    assert out.dtype == jnp.bfloat16
    # both compute in float32 from the same bfloat16 inputs; the outputs differ by bfloat16 rounding
    assert _max_error(out, ref) <= 2e-2


def test_grouped_query_heads():
    q, k, v = _inputs(seed=6, kv_heads=1)
    out = pallas_sparse_attention(_scaled(q), k, v, alpha=1.3, is_causal=False)
    assert _max_error(out, _dense(q, k, v, 1.3, False)) <= 1e-5


@pytest.mark.parametrize("alpha", [2.0, 1.3], ids=["sparsemax", "entmax_1.3"])
def test_gradients_match_dense_reference(alpha):
    q, k, v = _inputs(seed=7)
    qs = _scaled(q)
    lengths = jnp.array([0, 60])
    cotangent = jax.random.normal(jax.random.PRNGKey(10), qs.shape)

    def kernel(q, k, v):
        return pallas_sparse_attention(q, k, v, alpha=alpha, is_causal=True, key_lengths=lengths)

    def dense(q, k, v):
        return attnlab.dot_product_attention(
            q,
            k,
            v,
            normalizer=_normalizer(alpha),
            scale=1.0,
            is_causal=True,
            key_value_seq_lengths=lengths,
            implementation="dense",
        )

    # The same cotangent for both, so only the backward itself is compared.
    def pullback(f, q, k, v, cotangent):
        return jax.vjp(f, q, k, v)[1](cotangent)

    grads = jax.jit(functools.partial(pullback, kernel))(qs, k, v, cotangent)
    expected = jax.jit(functools.partial(pullback, dense))(qs, k, v, cotangent)
    for got, want in zip(grads, expected, strict=True):
        assert float(jnp.max(jnp.abs(want))) > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # batch row 0 sees no key: its gradients are exactly zero
    np.testing.assert_array_equal(np.asarray(grads[0][0]), 0.0)


@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3, 1.1, 1.9])
def test_threshold_step_reaches_the_exact_threshold(alpha):
    # threshold_step is the kernel's per-row update; here it is iterated on whole rows.
    rows, n = 64, 300
    z = 1.5 * jax.random.normal(jax.random.PRNGKey(8), (rows, n))
    valid = jax.random.bernoulli(jax.random.PRNGKey(9), 0.8, (rows, n)).at[:, 0].set(True)
    u = jnp.where(valid, (alpha - 1.0) * (z - jnp.max(jnp.where(valid, z, -jnp.inf), axis=1, keepdims=True)), 0.0)
    q = 1.0 / (alpha - 1.0)
    count = jnp.sum(valid, axis=1).astype(jnp.float32)
    lo = -jnp.ones(rows)
    state = (lo, lo, -(count ** (1.0 - alpha)), jnp.zeros(rows, bool))

    @jax.jit  # one step (alpha is a Python constant), compiled once and called 16 times
    def step(state, u):
        tau = state[0]
        d = u - tau[:, None]
        inside = valid & (d > 0)
        safe = jnp.where(inside, d, 1.0)

        def moment(power):
            return jnp.sum(jnp.where(inside, safe**power, 0.0), axis=1)

        sums = (
            moment(q),
            moment(q - 1.0),
            moment(max(q - 2.0, 0.0)),
            jnp.min(jnp.where(inside, d, jnp.inf), axis=1),
            jnp.max(jnp.where(valid & ~inside, d, -jnp.inf), axis=1),
        )
        return threshold_step(state, sums, alpha)

    for _ in range(16):
        state = step(state, u)
    assert bool(jnp.all(state[3]))
    expected = entmax_threshold(u, valid, alpha)[:, 0]
    np.testing.assert_allclose(np.asarray(state[0]), np.asarray(expected), atol=2e-6, rtol=0)


def test_rejects_bad_arguments():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="alpha"):
        pallas_sparse_attention(q, k, v, alpha=2.5, is_causal=False)
    with pytest.raises(ValueError, match="block_k"):
        pallas_sparse_attention(q, k, v, alpha=2.0, is_causal=False, block_k=48)
    with pytest.raises(ValueError, match="key_lengths"):
        pallas_sparse_attention(q, k, v, alpha=2.0, is_causal=False, key_lengths=jnp.array([3]))
