"""pallas_online_attention (interpret mode on CPU) against the dense reference, and its CUDA lowering.

Values and gradients (q, k, v, sink, row_bias) are compared with `attnlab.dot_product_attention(...,
implementation="dense")` for softmax, softmax1 and sigmoid; a learnable per-head sink has no dense
normalizer, so its reference is written here in jnp (and checked against the dense softmax1 at
sink 0). Sizes are small because the Pallas interpreter is slow; T and S are not multiples of the
blocks, so padding is always exercised. Each case runs its forward and pullback under one `jax.jit`
(one compilation, not one per eager op).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import attnlab
from attnlab import normalizers
from attnlab.attention import backends
from attnlab.attention.pallas_online import pallas_online_attention

B, T, S, H = 2, 100, 130, 16
TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
TRITON_CALL = "__gpu$xla.gpu.triton"


def _inputs(seed=0, dtype=jnp.float32, heads=2, kv_heads=2, h=H):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    # q is pre-scaled (the kernel applies no scale); 0.5 keeps the weights far from one-hot.
    q = 0.5 * jax.random.normal(keys[0], (B, T, heads, h))
    k = jax.random.normal(keys[1], (B, S, kv_heads, h))
    v = jax.random.normal(keys[2], (B, S, kv_heads, h))
    d_out = jax.random.normal(keys[3], (B, T, heads, h))
    return tuple(x.astype(dtype) for x in (q, k, v, d_out))


def _value_and_pullback(fn, args, d_out, has_aux=False):
    """fn(*args) (with its aux, if any) and the gradients of <fn(*args), d_out> w.r.t. every arg, in one
    jitted call."""

    @jax.jit
    def run(args, d_out):
        out, pullback, *aux = jax.vjp(fn, *args, has_aux=has_aux)
        return out, pullback(d_out.astype(out.dtype)), *aux

    return run(args, d_out)


def _max_error(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _assert_close(got, want, tolerance, what):
    """max |got - want| <= tolerance * max(1, max |want|): absolute near 1, relative for large sums."""
    scale = max(1.0, float(np.max(np.abs(np.asarray(want, np.float64)))))
    error = _max_error(got, want)
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance:.1g} * {scale:.3g}"


def _dense(q, k, v, normalizer, is_causal, lengths):
    return attnlab.dot_product_attention(
        q, k, v, normalizer=normalizer, scale=1.0, is_causal=is_causal, key_value_seq_lengths=lengths,
        implementation="dense",
    )  # fmt: skip


def _visible(is_causal, lengths, t=T, s=S):
    """bool [B, 1, T, S]."""
    visible = jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    if is_causal:
        visible = visible & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
    return visible


def _sink_reference(q, k, v, sink, is_causal, lengths):
    """e^z / (e^{sink_n} + sum e^z) attention in float32 jnp, sink [N] (what no dense normalizer takes)."""
    N, K = q.shape[2], k.shape[2]
    k, v = (jnp.repeat(x.astype(jnp.float32), N // K, axis=2) for x in (k, v))
    z = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k, precision="highest")
    visible = _visible(is_causal, lengths)
    sink = sink[None, :, None, None]
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.where(visible, z, -jnp.inf), axis=-1, keepdims=True), sink))
    e = jnp.where(visible, jnp.exp(jnp.where(visible, z, 0.0) - m), 0.0)
    p = e / (jnp.exp(sink - m) + jnp.sum(e, axis=-1, keepdims=True))
    return jnp.einsum("bnts,bsnh->btnh", p, v, precision="highest")


def _assert_empty_rows_are_zero(out, grads, batch, lse=None, lse_value=None):
    """Batch row `batch` sees no key: output and its q gradient exactly 0, its k and v gradients too."""
    for x in (out, *grads):
        assert np.all(np.isfinite(np.asarray(x, np.float32)))
    assert np.all(np.asarray(out[batch]) == 0.0)
    for g in grads[:3]:
        assert np.all(np.asarray(g[batch]) == 0.0)
    if lse is not None:
        assert np.all(np.asarray(lse[batch]) == lse_value)


# ---------------------------------------------------------------------------------------------- softmax

SOFTMAX_CASES = {
    # id: (sink, is_causal, key lengths, (query heads, kv heads), head_dim, (block_q, block_k))
    "softmax-causal-empty_row": (None, True, [77, 0], (2, 2), H, (64, 64)),
    "softmax1-full-head_dim_24": (0.0, False, [S, 61], (2, 2), 24, (64, 64)),
    "head_sinks-causal-gqa-empty_row": ("per_head", True, [90, 0], (4, 2), H, (16, 32)),
}


@pytest.mark.parametrize("case", list(SOFTMAX_CASES), ids=list(SOFTMAX_CASES))
def test_the_softmax_kind_matches_the_dense_reference_in_values_and_gradients(case):
    sink, is_causal, lengths, (heads, kv_heads), head_dim, (block_q, block_k) = SOFTMAX_CASES[case]
    q, k, v, d_out = _inputs(heads=heads, kv_heads=kv_heads, h=head_dim)
    lengths = jnp.asarray(lengths)
    sinks = jnp.asarray([0.7, -0.4, 2.0, -3.0][:heads]) if sink == "per_head" else sink
    args = (q, k, v, sinks) if sink == "per_head" else (q, k, v)

    def kernel(q, k, v, sink=sinks):
        return pallas_online_attention(
            q, k, v, kind="softmax", sink=sink, is_causal=is_causal, key_lengths=lengths, block_q=block_q,
            block_k=block_k, return_residual=True,
        )  # fmt: skip

    if sink == "per_head":

        def reference(q, k, v, sinks):
            # The jnp reference is the package's softmax1 at sink 0 (aux, checked below).
            softmax1 = _sink_reference(q, k, v, jnp.zeros(heads), is_causal, lengths)
            return _sink_reference(q, k, v, sinks, is_causal, lengths), softmax1 - _dense(
                q, k, v, "softmax1", is_causal, lengths
            )

        want_out, want_grads, softmax1_error = _value_and_pullback(reference, args, d_out, has_aux=True)
        assert _max_error(softmax1_error, 0.0) <= 1e-6
    else:
        normalizer = "softmax" if sink is None else "softmax1"
        want_out, want_grads = _value_and_pullback(
            lambda q, k, v: _dense(q, k, v, normalizer, is_causal, lengths), args, d_out
        )
    out, grads, lse = _value_and_pullback(kernel, args, d_out, has_aux=True)
    assert out.shape == (B, T, heads, head_dim) and out.dtype == q.dtype and lse.shape == (B, heads, T)
    _assert_close(out, want_out, 1e-5, "out")
    for name, got, want in zip(("dq", "dk", "dv", "dsink")[: len(args)], grads, want_grads, strict=True):
        _assert_close(got, want, 1e-5, name)
    if 0 in lengths:
        # No key and no sink: lse = -inf; with a sink, all the row's weight is on it: lse = sink.
        empty_lse = -np.inf if sink is None else np.asarray(sinks)[:, None]
        _assert_empty_rows_are_zero(out, grads, batch=1, lse=lse, lse_value=empty_lse)


def test_the_pallas_backend_takes_a_learned_sink_per_head_and_gives_its_gradient():
    """sink_softmax with its sink one per head ([N, 1, 1], as the Flax layers learn it), traced under
    differentiation: implementation="pallas" runs it in the kernel and matches the dense path, values
    and gradients, the sink's included; a sink per query still goes to the online pass."""
    q, k, v, d_out = _inputs(heads=4, kv_heads=2)
    lengths = jnp.asarray([90, 17])
    sinks = jnp.asarray([0.7, -0.4, 2.0, -3.0])[:, None, None]

    def attention(implementation):
        def f(q, k, v, sinks):
            return attnlab.dot_product_attention(
                q, k, v, normalizer=normalizers.get("sink_softmax", sink=sinks), scale=1.0, is_causal=True,
                key_value_seq_lengths=lengths, implementation=implementation,
            )  # fmt: skip

        return f

    out, grads = _value_and_pullback(attention("pallas"), (q, k, v, sinks), d_out)
    want_out, want_grads = _value_and_pullback(attention("dense"), (q, k, v, sinks), d_out)
    _assert_close(out, want_out, 1e-5, "out")
    for name, got, want in zip(("dq", "dk", "dv", "dsink"), grads, want_grads, strict=True):
        _assert_close(got, want, 1e-5, name)
    per_query = normalizers.get("sink_softmax", sink=jax.random.normal(jax.random.PRNGKey(1), (B, 4, T, 1)))
    assert backends.pallas_kernel(normalizers.get("sink_softmax", sink=sinks)) == "softmax"
    assert backends.pallas_kernel(per_query) is None


# ---------------------------------------------------------------------------------------------- sigmoid


def test_the_elementwise_kind_matches_the_dense_sigmoid_with_its_default_and_an_explicit_bias():
    q, k, v, d_out = _inputs(heads=4, kv_heads=2)
    lengths = jnp.asarray([77, 0])

    @jax.jit
    def kernel(args, d_out):  # one compilation for both biases
        def attention(q, k, v, row_bias):
            return pallas_online_attention(
                q, k, v, kind="elementwise", row_bias=row_bias, is_causal=True, key_lengths=lengths, block_q=32,
                block_k=16,
            )  # fmt: skip

        out, pullback = jax.vjp(attention, *args)
        return out, pullback(d_out)

    # The sigmoid normalizer's default bias, -log n with n the row's visible keys (a row that sees
    # nothing has no weights to bias).
    visible_count = jnp.sum(_visible(True, lengths), axis=-1, dtype=jnp.float32)  # [B, 1, T]
    minus_log_n = jnp.broadcast_to(-jnp.log(jnp.maximum(visible_count, 1.0)), (B, 4, T))
    out, grads = kernel((q, k, v, minus_log_n), d_out)
    want_out, want_grads = _value_and_pullback(
        lambda q, k, v: _dense(q, k, v, "sigmoid", True, lengths), (q, k, v), d_out
    )
    _assert_close(out, want_out, 1e-5, "out (-log n)")
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], want_grads, strict=True):
        _assert_close(got, want, 1e-5, f"{name} (-log n)")

    row_bias = jax.random.normal(jax.random.PRNGKey(5), (B, 4, T)) - 2.0

    def dense(q, k, v, row_bias):
        return _dense(q, k, v, normalizers.get("sigmoid", bias=row_bias[..., None]), True, lengths)

    out, grads = kernel((q, k, v, row_bias), d_out)
    want_out, want_grads = _value_and_pullback(dense, (q, k, v, row_bias), d_out)
    _assert_close(out, want_out, 1e-5, "out")
    for name, got, want in zip(("dq", "dk", "dv", "d_row_bias"), grads, want_grads, strict=True):
        _assert_close(got, want, 1e-5, name)
    _assert_empty_rows_are_zero(out, grads, batch=1)
    assert np.all(np.asarray(grads[3][1]) == 0.0)  # d row_bias of the rows that see nothing


# ---------------------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("kind", ["softmax", "elementwise"])
def test_bfloat16_inputs_match_the_float32_reference_to_bfloat16_resolution(kind):
    # The reference takes the same bf16-rounded inputs in float32; the kernel rounds its output, and
    # p and ds before their dots, to bf16 (8 significant bits: relative steps of 2^-8 = 0.004), so
    # errors of a few such steps on values of order 1 are expected: 2e-2 relative leaves margin.
    q, k, v, d_out = _inputs(dtype=jnp.bfloat16, heads=4, kv_heads=2)
    lengths = jnp.asarray([S, 77])
    if kind == "softmax":
        extra = jnp.asarray([0.7, -0.4, 2.0, -3.0])

        def kernel(q, k, v, sinks):
            # block_q > block_k: the causal diagonal crosses several key blocks per query block.
            return pallas_online_attention(
                q, k, v, kind="softmax", sink=sinks, is_causal=True, key_lengths=lengths, block_q=32, block_k=16
            )

        def reference(q, k, v, sinks):
            return _sink_reference(q, k, v, sinks, True, lengths)
    else:
        extra = jax.random.normal(jax.random.PRNGKey(5), (B, 4, T)) - 2.0

        def kernel(q, k, v, row_bias):
            return pallas_online_attention(q, k, v, kind="elementwise", row_bias=row_bias, is_causal=False,
                                           key_lengths=lengths)  # fmt: skip

        def reference(q, k, v, row_bias):
            return _dense(q, k, v, normalizers.get("sigmoid", bias=row_bias[..., None]), False, lengths)

    out, grads = _value_and_pullback(kernel, (q, k, v, extra), d_out)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    want_out, want_grads = _value_and_pullback(reference, (*f32, extra), d_out.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    _assert_close(out, want_out, 2e-2, "out")
    for name, got, want in zip(("dq", "dk", "dv", "d_extra"), grads, want_grads, strict=True):
        _assert_close(got, want, 2e-2, name)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_arguments_are_rejected_with_what_would_be_accepted():
    q, k, v, _ = _inputs()
    cases = [
        (dict(kind="softplus"), "kind='softplus'"),
        (dict(kind="elementwise", sink=0.0), "sink needs kind='softmax'"),
        (dict(kind="softmax", row_bias=jnp.zeros((B, 2, T))), "needs kind='elementwise'"),
        (dict(kind="elementwise", return_residual=True), "only kind='softmax'"),
        (dict(kind="softmax", block_q=48), "block_q=48"),
        (dict(kind="softmax", sink=jnp.zeros(3)), "(2,) (one per query head)"),
        (dict(kind="softmax", sink=float("nan")), "finite"),
        (dict(kind="elementwise", row_bias=jnp.zeros((T, 2))), "does not broadcast to [B, N, T]"),
        (dict(kind="softmax", key_lengths=jnp.asarray([1.0, 2.0])), "expected ints of shape (2,)"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            pallas_online_attention(q, k, v, is_causal=False, **options)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        pallas_online_attention(q, k.astype(jnp.bfloat16), v, kind="softmax", is_causal=False)
    with pytest.raises(ValueError, match=r"multiple of key/value heads \(3\)"):
        pallas_online_attention(q, jnp.zeros((B, S, 3, H)), jnp.zeros((B, S, 3, H)), kind="softmax", is_causal=False)


# ---------------------------------------------------------------------------------------------- lowering


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _cuda_module(fn, *args) -> str:
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=TRITON)(*args)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


@pytest.mark.parametrize(
    ("kind", "sink", "is_causal", "block", "dtype"),
    [
        ("softmax", "per_head", True, 16, jnp.float32),
        ("softmax", None, False, 64, jnp.bfloat16),
        ("softmax", "per_head", True, 128, jnp.bfloat16),
        ("elementwise", None, False, 16, jnp.bfloat16),
        ("elementwise", None, True, 64, jnp.float32),
        ("elementwise", None, False, 128, jnp.float32),
    ],
)
def test_the_kernels_lower_for_cuda_forward_and_backward(kind, sink, is_causal, block, dtype):
    heads, kv_heads = 4, 2
    q, kv = _spec((B, T, heads, H), dtype), _spec((B, S, kv_heads, H), dtype)
    extra = _spec((heads,)) if sink else _spec((B, heads, T)) if kind == "elementwise" else None
    lengths = jnp.asarray([S, 77])

    def forward(q, k, v, extra=None):
        named = {"sink": extra} if kind == "softmax" else {"row_bias": extra}
        return pallas_online_attention(
            q, k, v, kind=kind, is_causal=is_causal, key_lengths=lengths, block_q=block, block_k=block,
            interpret=False, **named,
        )  # fmt: skip

    args = (q, kv, kv) if extra is None else (q, kv, kv, extra)
    module = _cuda_module(forward, *args)
    assert module.count(TRITON_CALL) == 1
    grad = jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))
    grad_module = _cuda_module(grad, *args)
    # The backward is kernels, not XLA: dq and dk/dv, plus the forward again for softmax (D needs out;
    # the sigmoid's gradient does not, so its forward is dead code there).
    assert grad_module.count(TRITON_CALL) == (3 if kind == "softmax" else 2)
