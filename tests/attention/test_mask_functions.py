"""Masks and scores as functions (attention.mask_functions) against the same masks and biases
written as arrays, on every backend that takes them; block skipping; gradients of the arrays a
score function closes over; no T x S array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import normalizers
from attnlab.attention import dot_product_attention
from attnlab.attention import mask_functions as mf
from attnlab.attention.backends import BACKENDS, Options
from attnlab.attention.masks import Visibility
from attnlab.attention.online_softmax import online_softmax_attention

B, T, N, K, H = 2, 48, 4, 2, 8
BLOCKS = {"key_block": 16, "query_block": 16}
# (normalizer, memory-efficient backend): every family, through each backend that serves it
CASES = [
    ("softmax", "online"),
    ("ssmax", "online"),
    ("sink_softmax", "online"),
    ("sigmoid", "online"),
    ("sparsemax", "blocked_entmax"),
    ("asentmax", "blocked_entmax"),
    ("entmax15", "query_blocked"),
    ("stick_breaking", "query_blocked"),
]
# By default one normalizer per backend and family with a scale policy among them (SSMax, ASEntmax);
# the rest run with -m slow (the same backends and code paths).
QUICK = {
    ("ssmax", "online"),
    ("sigmoid", "online"),
    ("asentmax", "blocked_entmax"),
    ("stick_breaking", "query_blocked"),
}
CASE_PARAMS = [pytest.param(*case, marks=() if case in QUICK else pytest.mark.slow) for case in CASES]


def _inputs(seed=0, t=T):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = 1.5 * jax.random.normal(keys[0], (B, t, N, H))
    k = jax.random.normal(keys[1], (B, t, K, H))
    v = jax.random.normal(keys[2], (B, t, K, H))
    return q, k, v


def _close(a, b, atol=3e-5, rtol=3e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


def _segments(t=T, lengths=(10, 20, 18)):
    """Segment ids [B, t]: row 0 packs documents of `lengths`, row 1 the reverse."""
    rows = [np.repeat(np.arange(len(lengths)), lengths), np.repeat(np.arange(len(lengths)), lengths[::-1])]
    return jnp.asarray(np.stack(rows)[:, :t], jnp.int32)


def _as_array(mask_fn, t=T, s=T):
    """The mask function evaluated on the full grid: bool [B, N, T, S] (what the functions replace)."""
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(N)[None, :, None, None]
    q = jnp.arange(t)[None, None, :, None]
    kv = jnp.arange(s)[None, None, None, :]
    return jnp.broadcast_to(mask_fn(b, h, q, kv), (B, N, t, s))


MASKS = {
    "causal": (mf.causal_mask(), lambda: jnp.tril(jnp.ones((T, T), bool))),
    "sliding_window": (mf.sliding_window_mask(5, 2), lambda: _window(5, 2)),
    "prefix_lm": (mf.prefix_lm_mask(jnp.asarray([7, 20])), None),
    "document_causal": (mf.and_masks(mf.causal_mask(), mf.document_mask(_segments())), None),
    "or": (mf.or_masks(mf.sliding_window_mask(0, 0), mf.document_mask(_segments())), None),
}


def _window(left, right):
    t = np.arange(T)
    return jnp.asarray((t[None, :] >= t[:, None] - left) & (t[None, :] <= t[:, None] + right))


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_builtin_masks_equal_their_arrays(mask_name):
    mask_fn, expected = MASKS[mask_name]
    array = _as_array(mask_fn)
    if expected is not None:
        np.testing.assert_array_equal(array, jnp.broadcast_to(expected(), array.shape))
    if mask_name == "prefix_lm":  # batch row 1 sees its first 20 keys from every query
        assert bool(array[1, 0, 0, 19]) and not bool(array[1, 0, 0, 20]) and not bool(array[0, 0, 0, 7])
    if mask_name == "document_causal":  # row 0: documents [0, 10), [10, 30), [30, 48)
        assert bool(array[0, 0, 29, 10]) and not bool(array[0, 0, 29, 9]) and not bool(array[0, 0, 10, 11])


@pytest.mark.parametrize(("name", "implementation"), CASE_PARAMS)
def test_mask_and_score_functions_equal_the_mask_and_bias_arrays_values_and_gradients(name, implementation):
    """A document + causal mask and ALiBi as functions, against the same mask and bias as arrays on
    the dense reference: outputs and gradients (queries, keys, values and ALiBi's slopes)."""
    q, k, v = _inputs()
    mask_fn = mf.and_masks(mf.causal_mask(), mf.document_mask(_segments()))
    mask = _as_array(mask_fn)
    distance = (jnp.arange(T)[None, :] - jnp.arange(T)[:, None]).astype(jnp.float32)  # kv - q

    def with_functions(q, k, v, slopes):
        return dot_product_attention(
            q, k, v, normalizer=name, implementation=implementation, mask_fn=mask_fn, score_fn=mf.alibi(slopes),
            **BLOCKS,
        )  # fmt: skip

    def with_arrays(q, k, v, slopes):
        bias = slopes[:, None, None] * distance
        return dot_product_attention(q, k, v, bias, mask, normalizer=name, implementation="dense")

    slopes = mf.alibi_slopes(N)
    _close(with_functions(q, k, v, slopes), with_arrays(q, k, v, slopes))
    loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)))  # noqa: E731
    grads = jax.grad(loss(with_functions), argnums=(0, 1, 2, 3))(q, k, v, slopes)
    expected = jax.grad(loss(with_arrays), argnums=(0, 1, 2, 3))(q, k, v, slopes)
    for got, want in zip(grads, expected, strict=True):
        _close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "implementation"), CASE_PARAMS)
def test_nonlinear_score_function_and_scale_policy_follow_the_dense_reference(name, implementation):
    """Soft-capping is not a bias: the memory-efficient backends apply it to each block's logits and
    the normalizer's scale policy (SSMax's s log n, ASEntmax's) to its output, as the dense path does;
    the dense path itself equals the normalizer on the capped logits."""
    q, k, v = _inputs(1)
    cap = 2.0
    table = 0.1 * jax.random.normal(jax.random.PRNGKey(5), (N, 2 * 3 + 1))

    def attention(implementation, q, table):
        score_fn = mf.compose_scores(mf.relative_position_bias(table, 3), mf.soft_cap(cap))
        return dot_product_attention(
            q, k, v, normalizer=name, implementation=implementation, is_causal=True, score_fn=score_fn, **BLOCKS
        )

    _close(attention(implementation, q, table), attention("dense", q, table))
    grads = jax.grad(lambda *a: jnp.sum(attention(implementation, *a) ** 2), argnums=(0, 1))(q, table)
    expected = jax.grad(lambda *a: jnp.sum(attention("dense", *a) ** 2), argnums=(0, 1))(q, table)
    for got, want in zip(grads, expected, strict=True):
        _close(got, want, atol=2e-4, rtol=1e-4)
    if name == "softmax":  # the dense path: softmax of the capped, biased logits
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2)) / np.sqrt(H)
        rel = jnp.clip(jnp.arange(T)[None, :] - jnp.arange(T)[:, None], -3, 3) + 3
        z = cap * jnp.tanh((logits + table[:, rel]) / cap)
        p = normalizers.get("softmax")(z, where=jnp.tril(jnp.ones((T, T), bool)))
        _close(attention("dense", q, table), jnp.einsum("bnts,bsnh->btnh", p, jnp.repeat(v, N // K, axis=2)))


def test_traced_segment_ids_and_learned_table_under_jit():
    """Arrays a mask or score function closes over may be traced (jit arguments): segment ids
    (integers, no gradient) and a relative-position table (gradient)."""
    q, k, v = _inputs(2)

    def loss(implementation):
        @jax.jit
        def f(q, segments, table):
            out = dot_product_attention(
                q, k, v, normalizer="softmax", implementation=implementation, is_causal=True,
                mask_fn=mf.document_mask(segments), score_fn=mf.relative_position_bias(table, 2), **BLOCKS,
            )  # fmt: skip
            return jnp.sum(out**2)

        return f

    table = 0.3 * jnp.ones((N, 5))
    for implementation in ("online", "dense"):
        value, grads = jax.value_and_grad(loss(implementation), argnums=(0, 2))(q, _segments(), table)
        if implementation == "online":
            online = value, grads
    _close(online[0], value)
    _close(online[1][0], grads[0], atol=2e-4)
    _close(online[1][1], grads[1], atol=2e-4)
    assert float(jnp.max(jnp.abs(grads[1]))) > 0


def test_block_map_lists_exactly_the_blocks_with_a_visible_pair():
    mask_fn = mf.document_mask(_segments())
    visibility = Visibility(T, T, is_causal=True, mask_fn=mask_fn, heads=(B, 1, 1))
    blocks = mf.block_map(visibility, 8, 8)
    visible = np.asarray(visibility.dense()).any(axis=(0, 1, 2))  # [T, S], over batch rows
    expected = visible.reshape(T // 8, 8, T // 8, 8).any(axis=(1, 3))
    np.testing.assert_array_equal(blocks.visible, expected)
    np.testing.assert_array_equal(blocks.count, expected.sum(axis=1))
    for i, count in enumerate(np.asarray(blocks.count)):
        np.testing.assert_array_equal(np.sort(blocks.indices[i, :count]), np.flatnonzero(expected[i]))


def test_the_online_pass_visits_only_the_blocks_a_document_mask_leaves():
    """8 packed documents of 64 tokens, blocks of 64: the forward's own loop counter says each query
    block visited 1 key block (8 of 64 pairs; with the causal rule alone it would be 36)."""
    t, block = 512, 64
    segments = jnp.asarray(np.repeat(np.arange(8), t // 8)[None], jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    q = jax.random.normal(keys[0], (1, 1, 1, t, 8))
    k = jax.random.normal(keys[1], (1, 1, t, 8))
    documents = Visibility(t, t, is_causal=True, mask_fn=mf.document_mask(segments), heads=(1, 1, 1))
    out, rows = online_softmax_attention(q, k, k, None, documents, key_block=block, query_block=block)
    np.testing.assert_array_equal(rows.key_blocks_visited, np.ones(8, np.int32))
    _, causal_rows = online_softmax_attention(
        q, k, k, None, Visibility(t, t, is_causal=True), key_block=block, query_block=block
    )
    assert int(causal_rows.key_blocks_visited.sum()) == 36
    mask = _as_array(mf.document_mask(segments), t, t)[:1, :1]
    reference = dot_product_attention(
        jnp.moveaxis(q[:, 0], 1, 2), jnp.moveaxis(k, 1, 2), jnp.moveaxis(k, 1, 2), mask=mask, is_causal=True, scale=1.0,
        implementation="dense",
    )  # fmt: skip
    _close(jnp.moveaxis(out[:, 0], 1, 2), reference)


def test_statistics_with_a_mask_function_equal_the_dense_ones():
    q, k, v = _inputs(4)
    mask_fn = mf.document_mask(_segments())
    kwargs = {"normalizer": "softmax", "is_causal": True, "statistics": True, **BLOCKS}
    _, stats = dot_product_attention(q, k, v, implementation="online", mask_fn=mask_fn, **kwargs)
    _, expected = dot_product_attention(q, k, v, mask=_as_array(mask_fn), implementation="dense", **kwargs)
    for name in expected:
        _close(stats[name], expected[name], atol=1e-4)


def test_mask_and_score_functions_build_no_t_by_s_array():
    """Compiled memory of a forward + backward at T = S = 4096 with a document mask and ALiBi: the
    online path's temporaries stay far below one T x S float32 array (64 MiB) and even below a T x S
    boolean mask (16 MiB); the dense path needs more than one T x S float32 array."""
    t = 4096
    segments = jnp.asarray(np.repeat(np.arange(8), t // 8)[None], jnp.int32)
    q = jnp.zeros((1, t, 1, 16))

    def loss(implementation):
        def f(q, slopes):
            out = dot_product_attention(
                q, q, q, normalizer="softmax", implementation=implementation, is_causal=True,
                mask_fn=mf.document_mask(segments), score_fn=mf.alibi(slopes),
            )  # fmt: skip
            return jnp.sum(out)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    def temp_bytes(implementation):
        compiled = loss(implementation).lower(q, jnp.ones(1)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    t_by_s = t * t * 4
    assert temp_bytes("online") < t_by_s / 8
    assert temp_bytes("dense") > t_by_s


def test_backends_that_take_no_functions_say_so_and_bad_functions_are_refused():
    q, k, v = _inputs()
    gpu_call = Options(B, T, T, N, K, H, dtype=jnp.bfloat16, platform="gpu", mask_fn=True)
    assert "takes no mask_fn or score_fn" in BACKENDS["cudnn"].supports(normalizers.get("softmax"), gpu_call)
    with pytest.raises(ValueError, match="does not support mask_fn"):
        dot_product_attention(q, k, v, normalizer="sparsemax", implementation="pallas", mask_fn=mf.causal_mask())
    with pytest.raises(ValueError, match="must return booleans"):
        dot_product_attention(q, k, v, mask_fn=lambda b, h, q_idx, kv_idx: kv_idx - q_idx)
    with pytest.raises(ValueError, match="mask_fn must be None or a function"):
        dot_product_attention(q, k, v, mask_fn=3)
    with pytest.raises(ValueError, match="segment_ids must be ints"):
        mf.document_mask(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="table must be"):
        mf.relative_position_bias(jnp.zeros((4, 5)), 3)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(mf.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # 6 heads (their code's rule): the 4-head slopes 2^(-2 i), then every other one of the 8-head
    # slopes 2^-i: 2^-1 and 2^-3
    np.testing.assert_allclose(mf.alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
