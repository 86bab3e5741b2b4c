"""The fast chunked paths against the dense reference: block skipping and the entmax-family path."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import normalizers
from attnlab.attention import dot_product_attention
from attnlab.attention.api import static_entmax_alpha
from attnlab.attention.blocks import plan_groups
from attnlab.attention.masks import Visibility
from attnlab.attention.online_softmax import key_block_ranges
from attnlab.attention.sparse_blocked import sparse_blocked_attention

B, T, S, N, K, H = 2, 70, 70, 4, 2, 8


def _inputs(seed=0, t=T, s=S):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 2.0 * jax.random.normal(keys[0], (B, t, N, H))
    k = jax.random.normal(keys[1], (B, s, K, H))
    v = jax.random.normal(keys[2], (B, s, K, H))
    bias = 0.5 * jax.random.normal(keys[3], (B, N, t, s))
    return q, k, v, bias


def _close(a, b, atol=2e-5, rtol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("num_queries", "num_keys", "is_causal", "window", "query_block", "key_block"),
    [
        (70, 70, True, None, 8, 8),
        (70, 70, True, None, 16, 5),
        (33, 70, True, None, 7, 16),
        (70, 33, False, (5, 3), 8, 4),
        (70, 70, True, (20, 0), 16, 8),
        (10, 10, False, None, 4, 4),
    ],
)
def test_key_block_ranges_cover_every_visible_pair_and_only_fully_visible_blocks_skip_the_mask(
    num_queries, num_keys, is_causal, window, query_block, key_block
):
    ranges = key_block_ranges(num_queries, num_keys, is_causal, window, query_block, key_block)
    visible = np.asarray(Visibility(num_queries, num_keys, is_causal, window).dense())[0, 0, 0]
    for i in range(len(ranges.first)):
        rows = visible[i * query_block : (i + 1) * query_block]
        keys_seen = np.flatnonzero(rows.any(axis=0))
        first, full_first, full_stop, stop = (int(r[i]) for r in ranges)
        if keys_seen.size:
            assert first * key_block <= keys_seen[0] and keys_seen[-1] < stop * key_block
        assert first <= full_first <= full_stop <= stop or full_first == full_stop == stop
        for j in range(full_first, full_stop):
            assert rows[:, j * key_block : (j + 1) * key_block].all(), (i, j)


def test_key_block_ranges_with_lengths_or_masks_mask_every_block():
    ranges = key_block_ranges(64, 64, True, None, 16, 16, only_structured=False)
    np.testing.assert_array_equal(ranges.full_first, ranges.stop)
    np.testing.assert_array_equal(ranges.full_stop, ranges.stop)


@pytest.mark.parametrize(("num_queries", "block", "groups"), [(70, 8, 4), (4096, 32, 8), (5, 8, 8), (100, 100, 3)])
def test_causal_groups_cover_every_query_block_and_its_keys(num_queries, block, groups):
    plan = plan_groups(num_queries, num_queries, True, block, groups)
    blocks = [i for g in plan for i in range(g.first, g.first + g.count)]
    assert blocks == list(range(-(-num_queries // block)))
    for g in plan:
        last_query = min(num_queries, (g.first + g.count) * block) - 1
        assert last_query < g.extent <= num_queries
    if num_queries == 4096:  # 8 groups of 16 blocks: (8 + 1) / 16 of the full work
        work = sum(g.count * block * g.extent for g in plan)
        assert work / num_queries**2 == pytest.approx(9 / 16)


def test_static_alpha_selects_the_fast_path():
    assert static_entmax_alpha(normalizers.get("sparsemax")) == 2.0
    assert static_entmax_alpha(normalizers.get("logn_entmax15")) == 1.5
    assert static_entmax_alpha(normalizers.get("entmax", alpha=1.3)) == pytest.approx(1.3)
    assert static_entmax_alpha(normalizers.get("entmax", alpha=jnp.array([1.2, 1.4])[:, None, None])) is None
    assert static_entmax_alpha(normalizers.get("entmax", alpha=2.5)) is None
    assert static_entmax_alpha(normalizers.get("softmax")) is None


SETTINGS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (9, 3)},
    "causal+mask+lengths": {
        "is_causal": True,
        "mask": "random",
        "key_value_seq_lengths": jnp.array([S, 40]),
        "query_seq_lengths": jnp.array([T, 61]),
    },
}
NORMALIZERS = {
    "sparsemax": normalizers.get("sparsemax"),
    "entmax15": normalizers.get("entmax15"),
    "entmax13": normalizers.get("entmax", alpha=1.3),
    "logn_entmax15": normalizers.get("logn_entmax15"),
}


def _loss(fn, q, k, v, bias):
    out = fn(q, k, v) if bias is None else fn(q, k, v, bias)
    return jnp.sum(jnp.sin(out) * jnp.cos(jnp.arange(q.shape[-1])))


# Every setting and every normalizer at least once by default; the full product is marked slow.
QUICK_CASES = [
    ("plain", "sparsemax"),
    ("causal", "entmax15"),
    ("window", "entmax13"),
    ("causal+mask+lengths", "logn_entmax15"),
]
CASES = [
    pytest.param(*case, marks=() if case in QUICK_CASES else pytest.mark.slow)
    for case in itertools.product(SETTINGS, NORMALIZERS)
]


@pytest.mark.parametrize(("setting", "name"), CASES)
def test_entmax_fast_path_equals_dense_values_and_gradients(setting, name):
    q, k, v, bias = _inputs(seed=len(setting) + len(name))
    options = dict(SETTINGS[setting])
    if options.get("mask") == "random":
        mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.7, (B, 1, T, S))
        options["mask"] = mask.at[..., 0].set(True)

    def run(implementation, q, k, v, b):
        return dot_product_attention(
            q, k, v, b, normalizer=NORMALIZERS[name], implementation=implementation, query_block=8, **options
        )

    dense, chunked = jax.jit(functools.partial(run, "dense")), jax.jit(functools.partial(run, "chunked"))
    _close(chunked(q, k, v, bias), dense(q, k, v, bias))
    got = jax.jit(jax.grad(functools.partial(_loss, chunked), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    want = jax.jit(jax.grad(functools.partial(_loss, dense), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g, w in zip(got, want, strict=True):
        _close(g, w, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", ["sparsemax", "entmax13"])
def test_entmax_fast_path_statistics_match_dense(name):
    q, k, v, _ = _inputs(seed=7)
    mass_keys = jnp.arange(S) % 3 == 0
    outs = [
        dot_product_attention(
            q, k, v, normalizer=NORMALIZERS[name], is_causal=True, implementation=impl, query_block=16,
            statistics=True, mass_keys=mass_keys,
        )[1]
        for impl in ("chunked", "dense")
    ]  # fmt: skip
    assert set(outs[0]) == set(outs[1]) == {"max_weight", "entropy", "support_size", "key_mass"}
    for key in outs[0]:
        _close(outs[0][key], outs[1][key], atol=2e-5)
    assert float(jnp.mean(outs[0]["support_size"])) < 0.5 * S  # sparse, and counted exactly


def test_entmax_fast_path_propagates_nan_from_its_row():
    q, k, v, _ = _inputs(seed=8)
    q = q.at[0, 5, 1, 0].set(jnp.nan)
    out = dot_product_attention(q, k, v, normalizer="sparsemax", implementation="chunked", query_block=8)
    assert bool(jnp.all(jnp.isnan(out[0, 5, 1])))
    assert int(jnp.sum(jnp.isnan(out))) == H


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_entmax_fast_path_cuts_a_row_at_its_plus_inf_keys_even_beside_a_nan(name):
    """Rows long enough for the chunked threshold start (the +inf rows are found from its chunk
    maxima): a row holding +inf is uniform over its +inf keys, as dense gives, also when it holds a
    NaN too (dense drops it there); a row with a NaN alone is NaN; the other rows' gradients are finite and dense's."""
    q, k, v, _ = _inputs(seed=10, t=4, s=256)
    bias = jnp.zeros((1, N, 4, 256))
    bias = bias.at[0, :, 0, [3, 200]].set(jnp.inf)  # query 0: two +inf keys
    # query 1: +inf and NaN (where XLA:CPU's maximum over the row gives NaN, hiding the +inf)
    bias = bias.at[0, :, 1, 0].set(jnp.inf).at[0, :, 1, 255].set(jnp.nan)
    bias = bias.at[0, :, 2, 11].set(jnp.nan)  # query 2: a NaN alone
    run = functools.partial(dot_product_attention, normalizer=name, bias=bias)
    got, want = run(q, k, v, implementation="chunked"), run(q, k, v, implementation="xla")
    _close(got[:, :2], want[:, :2], atol=1e-6)
    _close(got[:, 3], want[:, 3])
    assert bool(jnp.all(jnp.isnan(got[:, 2]))) and bool(jnp.all(jnp.isnan(want[:, 2])))
    _close(got[:, 0], (v[:, 3] + v[:, 200]).repeat(N // K, axis=1) / 2, atol=1e-6)

    def loss(q, implementation):  # the NaN row's gradients are NaN (both paths): rows 0, 1 and 3
        return jnp.sum(jnp.nan_to_num(run(q, k, v, implementation=implementation)))

    grads = [jax.grad(loss)(q, implementation)[:, [0, 1, 3]] for implementation in ("chunked", "xla")]
    assert bool(jnp.all(jnp.isfinite(grads[0])))
    _close(*grads, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(B, 1, 1, T, S), (1, K, N // K, T, S), (1, K, 1, 1, S)])
def test_entmax_blocks_of_one_head_or_of_all_heads_give_the_same_values_and_gradients(bias_shape):
    """The blocked entmax path takes blocks of one batch row and key-value head on a CPU (the backends
    above, against dense) and blocks of every head elsewhere: both, with grouped queries, lengths, a
    bias broadcast over heads or over the batch, a mask function and a score function that read the
    batch row and head, and statistics, give the same values and gradients, score arrays included."""
    q, k, v, _ = _inputs(seed=13)
    q, k, v = (jnp.moveaxis(x, 1, 2) for x in (q, k, v))  # [B, heads, T, H]
    q = q.reshape(B, K, N // K, T, H)
    bias = 0.5 * jax.random.normal(jax.random.PRNGKey(14), bias_shape)  # grouped [B|1, K|1, G|1, T|1, S]
    table = jax.random.normal(jax.random.PRNGKey(15), (B, N))

    def mask_fn(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + b) | (h == 3)

    def run(split_heads, q, k, v, bias, table):
        def score_fn(s, b, h, q_idx, kv_idx):
            return s * (1.0 + 0.1 * table[b, h])

        visibility = Visibility(T, S, key_lengths=jnp.array([S, 50]), mask_fn=mask_fn, heads=(B, K, N // K))
        out, stats = sparse_blocked_attention(
            q, k, v, bias, visibility, 1.5, query_block=16, want_stats=True, score_fn=score_fn, split_heads=split_heads
        )
        return jnp.sum(jnp.sin(out)), (out, stats)

    results = [
        jax.jit(jax.grad(functools.partial(run, split), argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, bias, table)
        for split in (False, True)
    ]
    (grads_all, (out_all, stats_all)), (grads_one, (out_one, stats_one)) = results
    _close(out_one, out_all, atol=1e-6)
    for name in stats_all:
        _close(stats_one[name], stats_all[name], atol=1e-6)
    for got, want in zip(grads_one, grads_all, strict=True):
        assert got.shape == want.shape
        _close(got, want, atol=1e-5)
    assert float(jnp.max(jnp.abs(grads_all[4]))) > 0  # the score function's array has a gradient


@pytest.mark.slow  # test_attention.py's GQA test checks the same path against dense by default
def test_entmax_fast_path_gqa_matches_repeated_heads():
    q, k, v, _ = _inputs(seed=9)
    run = functools.partial(
        dot_product_attention, normalizer="entmax15", is_causal=True, implementation="chunked", query_block=8
    )
    repeat = functools.partial(jnp.repeat, repeats=N // K, axis=2)
    _close(run(q, k, v), run(q, repeat(k), repeat(v)))


@pytest.mark.parametrize(
    ("name", "is_causal"),
    [("sparsemax", True), ("entmax15", False)]
    + [
        pytest.param(*case, marks=pytest.mark.slow)
        for case in [("sparsemax", False), ("entmax15", True), ("entmax13", False), ("entmax13", True)]
    ],
)
def test_entmax_fast_path_on_rows_long_enough_for_the_chunked_threshold_start(name, is_causal):
    # Rows of 256+ keys seed the threshold search with the threshold of their 128-key chunk maxima.
    t, s = 384, 384
    q, k, v, bias = _inputs(seed=11, t=t, s=s)

    def run(implementation, q, k, v):
        return dot_product_attention(
            q, k, v, bias[:, :, :, :], normalizer=NORMALIZERS[name], implementation=implementation,
            query_block=64, is_causal=is_causal, key_value_seq_lengths=jnp.array([s, 300]),
        )  # fmt: skip

    dense, chunked = jax.jit(functools.partial(run, "dense")), jax.jit(functools.partial(run, "chunked"))
    _close(chunked(q, k, v), dense(q, k, v))
    loss = lambda fn, q, k, v: _loss(fn, q, k, v, None)  # noqa: E731
    got = jax.jit(jax.grad(functools.partial(loss, chunked), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want, strict=True):
        _close(g, w, atol=5e-5, rtol=5e-5)


def test_pallas_implementation_is_wired_for_the_entmax_family():
    q, k, v, bias = _inputs(seed=12, t=40, s=40)
    lengths = jnp.array([40, 25])
    for name in ("logn_entmax15",):  # the log n factor folded in; plain 1.5-entmax: test_pallas_sparse.py
        run = functools.partial(
            dot_product_attention, q, k, v, normalizer=NORMALIZERS[name], is_causal=True,
            key_value_seq_lengths=lengths,
        )  # fmt: skip
        _close(run(implementation="pallas"), run(implementation="dense"))
    with pytest.raises(ValueError, match="does not support bias"):
        dot_product_attention(q, k, v, bias, normalizer="sparsemax", implementation="pallas")
    with pytest.raises(ValueError, match="Pallas kernels run"):
        dot_product_attention(q, k, v, normalizer="multimax", implementation="pallas")


def test_pallas_implementation_is_wired_for_sinks_and_sigmoid():
    # ssmax: the scale folded into q before the plain-softmax kernel; sigmoid: its -log n bias per row.
    q, k, v, _ = _inputs(seed=13, t=40, s=40)
    lengths = jnp.array([40, 25])
    for name in ("softmax1", "sigmoid", "ssmax"):
        run = functools.partial(
            dot_product_attention, q, k, v, normalizer=name, is_causal=True,
            key_value_seq_lengths=lengths,
        )  # fmt: skip
        _close(run(implementation="pallas"), run(implementation="dense"))
    out, lse = dot_product_attention(q, k, v, normalizer="softmax1", implementation="pallas", return_residual=True)
    want_out, want_lse = dot_product_attention(
        q, k, v, normalizer="softmax1", implementation="dense", return_residual=True
    )
    _close(out, want_out)
    _close(lse, want_lse)


def test_per_query_normalizer_parameters_run_on_every_backend():
    """Parameters [B, N, T, 1] (one per query: ASEntmax's adaptive beta and gamma) with a traced alpha:
    the query-blocked backend cuts them by query block; equal to dense, values and gradients."""
    q, k, v, _ = _inputs(5)
    keys = jax.random.split(jax.random.PRNGKey(9), 2)
    beta = jax.nn.softplus(jax.random.normal(keys[0], (B, N, T, 1)))
    gamma = 0.5 * jax.random.normal(keys[1], (B, N, T, 1))

    def attention(implementation, beta, gamma):
        normalizer = normalizers.get("asentmax", beta=beta, gamma=gamma, alpha=jnp.asarray(1.4))
        return dot_product_attention(
            q, k, v, normalizer=normalizer, is_causal=True, implementation=implementation, query_block=16
        )

    _close(attention("query_blocked", beta, gamma), attention("dense", beta, gamma))
    grads = jax.grad(lambda *a: jnp.sum(attention("query_blocked", *a) ** 2), argnums=(0, 1))(beta, gamma)
    expected = jax.grad(lambda *a: jnp.sum(attention("dense", *a) ** 2), argnums=(0, 1))(beta, gamma)
    for got, want in zip(grads, expected, strict=True):
        _close(got, want, atol=1e-4, rtol=1e-4)
