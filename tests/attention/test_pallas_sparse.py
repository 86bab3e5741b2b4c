"""pallas_sparse_attention (interpret mode on CPU) against the dense XLA reference.

Sizes are small because the Pallas interpreter is slow; T and S are deliberately not multiples
of the 64-wide blocks, so padding is always exercised. Every call with the same shapes, dtype,
alpha and causality reuses one compiled kernel (key lengths are a traced input). The dense
reference, values and pullbacks, runs eagerly (its ops, compiled once per shape, are shared by
every case; shapes that only one test uses are jitted instead), and so do the kernel's pullbacks:
its forward and backward are jitted inside, once per static config. Compiling, not running, is
what the interpreter costs here, so the gradient cases are few and each covers several properties.
"""

from __future__ import annotations

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
    sparse_attention_gradient_block_counts,
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


def _dense_pullback(q, k, v, cotangent, *, alpha, is_causal, lengths=None, jit=False):
    """(out, (dq, dk, dv)) of the dense reference on pre-scaled q, in float32 from the values given.

    Eager by default, like the forward reference: its ops compile once per shape and the cases on
    the shared shapes reuse them. `jit` for shapes used once: one compilation beats many ops'.
    """

    def pullback(q, k, v, cotangent):
        def dense(q, k, v):
            return attnlab.dot_product_attention(
                q, k, v, normalizer=_normalizer(alpha), scale=1.0, is_causal=is_causal,
                key_value_seq_lengths=lengths, implementation="dense",
            )  # fmt: skip

        out, vjp = jax.vjp(dense, q, k, v)
        return out, vjp(cotangent)

    return (jax.jit(pullback) if jit else pullback)(*(x.astype(jnp.float32) for x in (q, k, v, cotangent)))


def _pullbacks(q, k, v, *, alpha, is_causal, lengths=None, seed=10, jit=False):
    """The kernel's and the dense reference's (out, (dq, dk, dv)) at one random cotangent.

    The same cotangent for both, so only the backward itself is compared; the reference runs in
    float32 on the same values, so with bfloat16 inputs it is the exact answer the kernel rounds.
    """
    cotangent = jax.random.normal(jax.random.PRNGKey(seed), q.shape).astype(q.dtype)

    def kernel(q, k, v):
        return pallas_sparse_attention(q, k, v, alpha=alpha, is_causal=is_causal, key_lengths=lengths)

    out, vjp = jax.vjp(kernel, q, k, v)
    want = _dense_pullback(q, k, v, cotangent, alpha=alpha, is_causal=is_causal, lengths=lengths, jit=jit)
    return (out, vjp(cotangent)), want


def _assert_close(got, want, *, atol, rtol):
    """got and want: (out, (dq, dk, dv)); every array nonzero somewhere and close elementwise."""
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert g.shape == w.shape, name
        assert float(jnp.max(jnp.abs(w))) > 0, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=atol, rtol=rtol, err_msg=name)


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


def test_zero_length_row_gives_zero_and_visits_no_key_block():
    q, k, v = _inputs(seed=1)
    lengths = jnp.array([0, 45])
    out, counts = sparse_attention_block_counts(_scaled(q), k, v, alpha=1.5, is_causal=False, key_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert _max_error(out, _dense(q, k, v, 1.5, False, lengths)) <= 1e-5
    for name in ("reachable", "threshold", "output"):
        np.testing.assert_array_equal(np.asarray(counts[name][0]), 0, err_msg=name)
    # the 45 keys of row 1 fit in the first key block of 64
    np.testing.assert_array_equal(np.asarray(counts["reachable"][1]), 1)


def test_causal_without_lengths_and_block_counts_follow_the_diagonal():
    # block_q = 16 != block_k = 64: T = 100 -> 7 query blocks of 16 (the last padded), S = 130 ->
    # key blocks [0, 64), [64, 128) and [128, 192).
    q, k, v = _inputs(seed=2)
    cotangent = jax.random.normal(jax.random.PRNGKey(11), q.shape)
    out, grads, counts = sparse_attention_gradient_block_counts(
        _scaled(q), k, v, cotangent, alpha=2.0, is_causal=True, block_q=16
    )
    want = _dense_pullback(_scaled(q), k, v, cotangent, alpha=2.0, is_causal=True)
    _assert_close((out, grads), want, atol=1e-5, rtol=1e-5)
    # Query block i reaches key block 1 from query 64 on (i = 4); key block 0 is seen by all 7
    # query blocks, key block 1 by blocks 4..6, key block 2 by none (no query reaches past 99).
    np.testing.assert_array_equal(np.asarray(counts["reachable"]), np.broadcast_to([1, 1, 1, 1, 2, 2, 2], (B, N, 7)))
    np.testing.assert_array_equal(np.asarray(counts["dkdv_reachable"]), np.broadcast_to([7, 3, 0], (B, N, 3)))
    assert bool(jnp.all(counts["dq"] <= counts["reachable"]))
    assert bool(jnp.all(counts["dkdv"] <= counts["dkdv_reachable"]))


@pytest.mark.parametrize("alpha", [2.0, 1.3], ids=["sparsemax", "entmax_1.3"])
def test_key_blocks_without_support_are_skipped_forward_and_backward(alpha):
    # Every query's large logits sit in key block 2 of 4 (keys 128..191); all other keys score far
    # below the threshold, so only that block may be visited after the first pass, by the forward's
    # output pass and by both backward kernels, and the gradients are still exact.
    t, s = 64, 256
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, s))
    q = jnp.zeros((B, t, N, H)).at[..., 0].set(4.0).at[..., 1].set(0.5 * noise[0, :t, None])
    sign = jnp.where((jnp.arange(s) >= 128) & (jnp.arange(s) < 192), 1.0, -1.0)
    k = jnp.zeros((B, s, N, H)).at[..., 0].set((sign + 0.2 * noise[1])[:, None]).at[..., 1].set(0.5 * noise[2, :, None])
    v = jax.random.normal(jax.random.PRNGKey(4), (B, s, N, H))
    cotangent = jax.random.normal(jax.random.PRNGKey(5), q.shape)
    iterations = 8
    out, grads, counts = sparse_attention_gradient_block_counts(
        q, k, v, cotangent, alpha=alpha, is_causal=False, num_iterations=iterations
    )
    want = _dense_pullback(q, k, v, cotangent, alpha=alpha, is_causal=False, jit=True)
    _assert_close((out, grads), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts["reachable"]), 4)
    np.testing.assert_array_equal(np.asarray(counts["output"]), 1)
    assert 1 <= int(jnp.max(counts["threshold"])) <= iterations
    # t = 64 is one query block: the dq kernel visits 1 of its 4 key blocks, the dk/dv kernel
    # visits its one query block for key block 2 only.
    np.testing.assert_array_equal(np.asarray(counts["dq"]), 1)
    np.testing.assert_array_equal(np.asarray(counts["dkdv_reachable"]), 1)
    np.testing.assert_array_equal(np.asarray(counts["dkdv"]), np.broadcast_to([0, 0, 1, 0], (B, N, 4)))


def test_bfloat16_inputs_values_and_gradients():
    q, k, v = _inputs(seed=5, dtype=jnp.bfloat16)
    got, want = _pullbacks(_scaled(q), k, v, alpha=1.5, is_causal=True, lengths=jnp.array([S, 90]))
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    # The reference computes in float32 from the same bfloat16 values. The kernel rounds p, dz and
    # the cotangent to bfloat16 before their dots (as flash kernels do, so the GPU's bfloat16 tensor
    # cores run them) and rounds out, dq, dk and dv to bfloat16: errors of a few bfloat16 ulps
    # (2**-8 relative) of the largest entry, not of each entry.
    for g, w in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        error = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
        assert scale > 0 and error <= 4 * 2**-8 * scale, (error, scale)


def test_grouped_query_heads_values_and_gradients():
    # N = 2 query heads share one key/value head: dk and dv sum both heads' contributions.
    q, k, v = _inputs(seed=6, kv_heads=1)
    got, want = _pullbacks(_scaled(q), k, v, alpha=1.3, is_causal=True, lengths=jnp.array([S, 0]), jit=True)
    _assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g in got[1]:
        np.testing.assert_array_equal(np.asarray(g[1]), 0.0)


@pytest.mark.parametrize(("alpha", "is_causal"), [(2.0, True), (1.5, False)], ids=["sparsemax-causal", "entmax15-full"])
def test_gradients_match_dense_reference(alpha, is_causal):
    # With the grouped-query test (1.3, causal) and the skipping test (2 and 1.3, full), every
    # alpha is checked with and without the causal mask in float32.
    q, k, v = _inputs(seed=7)
    got, want = _pullbacks(_scaled(q), k, v, alpha=alpha, is_causal=is_causal, lengths=jnp.array([0, 60]))
    _assert_close(got, want, atol=1e-5, rtol=1e-5)
    # batch row 0 sees no key: its output and gradients are exactly zero
    for g in (got[0], *got[1]):
        np.testing.assert_array_equal(np.asarray(g[0]), 0.0)


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
    with pytest.raises(ValueError, match="cotangent"):
        sparse_attention_gradient_block_counts(q, k, v, q[:, :-1], alpha=2.0, is_causal=False)
