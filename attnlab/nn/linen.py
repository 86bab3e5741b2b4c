"""`MultiHeadAttention` for `flax.linen`: the Linen twin of `attnlab.nn.MultiHeadAttention`.

Same features, same shared code (`attnlab.nn.core`, `attnlab.nn.spec`); parameters are named as
in `flax.linen.MultiHeadDotProductAttention` (query, key, value, out) plus, for learned
normalizer parameters, a submodule "normalizer" holding s, bias, alpha_logit or log_temperature,
each [N, 1, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnlab.nn import core
from attnlab.nn.spec import NormalizerSpec, as_spec
from attnlab.normalizers import Normalizer

Initializer = Callable[..., jax.Array]


class LearnedNormalizer(nn.Module):
    """Holds the learned normalizer parameters ([num_heads, 1, 1] each); returns the Normalizer."""

    spec: NormalizerSpec
    num_heads: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> Normalizer:
        values = {
            name: self.param(name, lambda _rng, v=value: jnp.asarray(v, self.param_dtype))
            for name, value in self.spec.initial_params(self.num_heads).items()
        }
        return self.spec.build(values)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an attnlab normalizer, for Linen models.

    Fields follow `flax.linen.MultiHeadDotProductAttention` (num_heads, qkv_features, out_features,
    dtype, param_dtype, broadcast_dropout, dropout_rate, deterministic, precision, kernel_init,
    out_kernel_init, bias_init, out_bias_init, use_bias, normalize_qk) plus num_kv_heads
    (grouped-query attention), normalizer (a name or a `NormalizerSpec`), rope_theta,
    implementation / key_block / query_block and sow_statistics, with the meanings documented on
    `attnlab.nn.MultiHeadAttention`. Statistics are sown into "intermediates" as
    "attention_statistics" (pass mutable=["intermediates"] to apply).
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    num_kv_heads: int | None = None
    normalizer: str | NormalizerSpec = "softmax"
    rope_theta: float | None = None
    implementation: str | None = None
    key_block: int = 512
    query_block: int | None = None
    sow_statistics: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    out_kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()
    out_bias_init: Initializer | None = None
    use_bias: bool = True
    normalize_qk: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        positions: jax.Array | None = None,
        key_positions: jax.Array | None = None,
        rope_theta: float | None = None,
        key_value_seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: jax.Array | None = None,
        sow_weights: bool = False,
    ) -> jax.Array:
        """inputs_q [B, T, F], inputs_k/v [B, S, F_kv] -> [B, T, out_features]; keywords as on
        `attnlab.nn.MultiHeadAttention.__call__` (dropout_rng as in Linen: default make_rng('dropout'))."""
        where = "attnlab.nn.LinenMultiHeadAttention"
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        core.check_inputs(inputs_q, inputs_k, inputs_v, None, None)
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        head_dim = core.check_heads(self.num_heads, num_kv_heads, qkv_features, where)
        spec = as_spec(self.normalizer, f"{where}: normalizer")
        core.check_rope_theta(self.rope_theta, head_dim, where)
        core.check_implementation(self.implementation, self.key_block, self.query_block, where)
        core.check_dropout(self.dropout_rate, spec.softmax_type, self.implementation, spec.name, where)

        dense = functools.partial(
            nn.DenseGeneral,
            axis=-1,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            use_bias=self.use_bias,
            precision=self.precision,
        )
        query = dense(features=(self.num_heads, head_dim), name="query")(inputs_q)
        key = dense(features=(num_kv_heads, head_dim), name="key")(inputs_k)
        value = dense(features=(num_kv_heads, head_dim), name="value")(inputs_v)
        if self.normalize_qk:
            layer_norm = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
            query, key = layer_norm(name="query_ln")(query), layer_norm(name="key_ln")(key)
        theta = core.resolve_rope_theta(self.rope_theta, rope_theta)
        if theta is not None:
            query, key = core.rope_query_key(query, key, theta, positions, key_positions)

        normalizer = LearnedNormalizer(spec, self.num_heads, self.param_dtype, name="normalizer")()
        deterministic, dropout_rng = self._dropout_state(deterministic, dropout_rng)
        out = core.layer_attention(
            self,
            query,
            key,
            value,
            normalizer,
            sow=lambda name, value: self.sow("intermediates", name, value),
            bias=bias,
            mask=mask,
            is_causal=is_causal,
            key_value_seq_lengths=key_value_seq_lengths,
            sow_weights=sow_weights,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
        )
        return nn.DenseGeneral(
            features=self.out_features or inputs_q.shape[-1],
            axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="out",
        )(out)

    def _dropout_state(self, deterministic: bool | None, dropout_rng: jax.Array | None):
        if self.dropout_rate == 0.0:
            return True, None
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic:
            return True, None
        return False, self.make_rng("dropout") if dropout_rng is None else dropout_rng
