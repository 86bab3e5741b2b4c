"""GPU paths proven before the GPU: every kernel lowers for CUDA (and the XLA backends for TPU) here.

`jax.export` with `platforms=["cuda"]` lowers a Pallas kernel to Triton IR on this CPU-only machine
(the Triton custom call's safety check is disabled: it is checked on the device), so a kernel that
cannot lower fails here, not in the few device minutes. cuDNN cannot be lowered without cuDNN; it is
checked on the device (issue 17).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax import export

import attnlab.normalizers as N
from attnlab.attention import dot_product_attention
from attnlab.attention.masks import Visibility
from attnlab.attention.pallas_sparse import pallas_sparse_attention
from attnlab.attention.sparse_blocked import sparse_blocked_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
TRITON = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lowers(fn, *args, platforms, disabled=()):
    exported = export.export(jax.jit(fn), platforms=platforms, disabled_checks=list(disabled))(*args)
    assert exported.platforms == tuple(platforms)
    return exported.mlir_module()


@pytest.mark.parametrize(
    ("alpha", "block", "is_causal", "lengths"),
    [
        (alpha, block, causal, lengths)
        for (alpha, block), causal, lengths in itertools.product(
            [(1.5, 16), (2.0, 32), (1.3, 64), (1.5, 128)], [True, False], [False, True]
        )
        if not (causal and lengths and block == 128)
    ],
)
def test_the_pallas_entmax_kernel_lowers_for_cuda_forward_and_backward(alpha, block, is_causal, lengths):
    q = _spec((2, 128, 4, 64))
    key_lengths = jnp.asarray([128, 77]) if lengths else None

    def forward(q, k, v):
        return pallas_sparse_attention(
            q, k, v, alpha=alpha, is_causal=is_causal, key_lengths=key_lengths, block_q=block, block_k=block,
            interpret=False,
        )  # fmt: skip

    module = _lowers(forward, q, q, q, platforms=["cuda"], disabled=TRITON)
    assert module.count(TRITON_CALL) == 1
    # The backward is kernels too: the forward (saving its thresholds), dq, and dk/dv.
    grad = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v)), argnums=(0, 1, 2))
    grad_module = _lowers(grad, q, q, q, platforms=["cuda"], disabled=TRITON)
    assert grad_module.count(TRITON_CALL) == 3
    assert "sparse_map_attention_dq" in grad_module and "sparse_map_attention_dkdv" in grad_module


@pytest.mark.parametrize("implementation", ["dense", "online", "blocked_entmax", "query_blocked"])
def test_the_xla_backends_lower_for_cuda_and_tpu(implementation):
    q = _spec((1, 256, 2, 32), jnp.bfloat16)
    served = 0
    for name in N.NAMES:
        normalizer = N.get(name)

        def loss(q, k, v, normalizer=normalizer):
            out = dot_product_attention(
                q, k, v, normalizer=normalizer, is_causal=True, implementation=implementation, key_block=64,
                query_block=64,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32))

        try:
            jax.eval_shape(loss, q, q, q)
        except ValueError as err:  # this backend does not serve this normalizer: it says why
            assert "cannot" in str(err) or "support" in str(err) or "only" in str(err), str(err)
            continue
        _lowers(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, q, q, platforms=["cuda", "tpu"])
        served += 1
    assert served >= 1


def test_blocked_entmax_over_every_head_lowers_for_cuda_and_tpu():
    """dot_product_attention gives blocked entmax blocks of one head on a CPU (lowered above) and
    blocks of every head elsewhere: those lower too, forward and backward, with lengths and a bias."""
    B, K, G, T, H = 2, 2, 2, 256, 32
    visibility = Visibility(T, T, is_causal=True, key_lengths=jnp.array([T, 200]))

    def loss(q, k, v, bias):
        out, _ = sparse_blocked_attention(q, k, v, bias, visibility, 1.5, query_block=64, split_heads=False)
        return jnp.sum(out)

    args = (_spec((B, K, G, T, H)), _spec((B, K, T, H)), _spec((B, K, T, H)), _spec((1, K, 1, T, T)))
    module = _lowers(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), *args, platforms=["cuda", "tpu"])
    assert "stablehlo.while" in module
