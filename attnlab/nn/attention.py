"""`MultiHeadAttention`: an `flax.nnx` attention layer with any attnlab normalizer, per-head learned
normalizer parameters, optional RoPE, an optional output gate, and attention statistics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.nn import core
from attnlab.normalizers import Normalizer
from attnlab.normalizers.spec import NormalizerSpec, as_spec

Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()

GATES = ("headwise", "elementwise")


def check_gate(gate: Any, where: str) -> None:
    """ValueError unless `gate` is None or one of `GATES`."""
    if gate is not None and (not isinstance(gate, str) or gate not in GATES):
        accepted = ", ".join(["None", *map(repr, GATES)])
        raise ValueError(f"{where}: gate={gate!r} is not an output gate; accepted: {accepted}")


class LearnedNormalizer(nnx.Module):
    """The learned normalizer parameters of one attention layer, each an `nnx.Param` [N, 1, 1].

    Attributes are named as in `NormalizerSpec.learned` (s, bias, alpha_logit, log_temperature);
    calling the module returns the `Normalizer` built from their current values.
    """

    def __init__(self, spec: NormalizerSpec, num_heads: int, *, param_dtype: Any = jnp.float32):
        self.spec = spec
        self.names = spec.learned
        for name, value in spec.initial_params(num_heads).items():
            setattr(self, name, nnx.Param(jnp.asarray(value, param_dtype)))

    def __call__(self) -> Normalizer:
        return self.spec.build({name: getattr(self, name)[...] for name in self.names})


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with an attnlab normalizer; a drop-in for `flax.nnx.MultiHeadAttention`.

    Projections, parameter names and shapes follow `flax.nnx.MultiHeadAttention` (query / key /
    value `LinearGeneral` with kernels [F, N, H] / [F_kv, K, H], out with kernel [N, H, F_out]), so
    weights transfer one to one. Then, for inputs_q [B, T, F] and inputs_k/v [B, S, F_kv]:

        q, k = rope(q, positions), rope(k, key_positions)       when rope_theta is set
        p[b, n, t, :] = normalizer(q[b, t, n] . k[b, :, n // G] / sqrt(H), where=visible)
        o[b, t, n] = sum_s p[b, n, t, s] v[b, s, n // G]                           [B, T, N, H]
        o[b, t, n] = o[b, t, n] * sigmoid(inputs_q[b, t] @ W_gate[:, n] + b_gate[n])   with a gate
        out = o @ W_out

    with G = num_heads / num_kv_heads (grouped-query attention). The normalizer is rebuilt at each
    call from the current values of its learned parameters (`self.normalizer`, a
    `LearnedNormalizer`), one per query head, shaped [N, 1, 1].

    Args (beyond those of `flax.nnx.MultiHeadAttention`, which keep their meaning):
      normalizer: a name from `attnlab.normalizers.NAMES` or a `NormalizerSpec` (which parameters to
        learn and how to start them). A plain "ssmax" learns s per head, starting at 0.43.
      rope_theta: None for no position embedding; a base > 0 applies RoPE to queries and keys.
      gate: the output gate of gated attention (Qiu et al. 2025, "Gated Attention for Large Language
        Models"; Qwen3-Next): each head's attention output is multiplied, before the output
        projection, by a sigmoid of a projection of the layer's query input (`self.gate`, a
        `LinearGeneral` from in_features). None (the default): no gate, no `gate` parameters;
        "headwise": one gate per head and query, kernel [F, N], bias [N];
        "elementwise": one per head dimension, kernel [F, N, H], bias [N, H].
        It is initialised as the query projection (kernel_init, bias_init, use_bias), as in the
        reference code, where the gate is extra output columns of the query projection.
      implementation, key_block, query_block: passed to `attnlab.attention.dot_product_attention`.
      sow_statistics: sow {"max_weight", "entropy", "support_size"}, each [B, N, T], into
        `nnx.Intermediate` as "attention_statistics" at every call.
      dropout_rate: attention-weight dropout; supported for softmax-type normalizers on the dense
        path only, and rejected here at construction otherwise (see `attnlab.nn.core`).

    Inputs have one batch axis or none ([T, F], e.g. inside vmap). Not supported (unlike flax's
    layer): autoregressive decoding with a cache (`decode`), several batch axes (ValueError).
    `precision` applies to the projections; the attention itself accumulates in float32.

    `attnlab.nn.LinenMultiHeadAttention` is this layer for `flax.linen`, built from it through
    `flax.nnx.bridge` (see `attnlab.nn.linen`): what holds here holds there.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        normalizer: str | NormalizerSpec = "softmax",
        rope_theta: float | None = None,
        implementation: str | None = None,
        key_block: int = 512,
        query_block: int | None = None,
        sow_statistics: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = default_bias_init,
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        normalize_qk: bool = False,
        gate: str | None = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
    ):
        where = "attnlab.nn.MultiHeadAttention"
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = in_features if qkv_features is None else qkv_features
        self.out_features = in_features if out_features is None else out_features
        self.in_kv_features = in_features if in_kv_features is None else in_kv_features
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = core.check_heads(num_heads, self.num_kv_heads, self.qkv_features, where)
        self.normalizer_spec = as_spec(normalizer, f"{where}: normalizer")
        core.check_rope_theta(rope_theta, self.head_dim, where)
        core.check_implementation(implementation, key_block, query_block, where)
        check_gate(gate, where)
        core.check_dropout(
            dropout_rate, self.normalizer_spec.softmax_type, implementation, self.normalizer_spec.name, where
        )
        self.rope_theta = rope_theta
        self.implementation = implementation
        self.key_block = key_block
        self.query_block = query_block
        self.sow_statistics = sow_statistics
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.precision = precision
        self.use_bias = use_bias
        self.normalize_qk = normalize_qk
        self.gate_kind = gate

        linear = functools.partial(
            nnx.LinearGeneral,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            use_bias=use_bias,
            precision=precision,
            rngs=rngs,
        )
        self.query = linear(in_features, (num_heads, self.head_dim))
        self.key = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        self.value = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        if normalize_qk:
            layer_norm = functools.partial(
                nnx.LayerNorm, self.head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            self.query_ln, self.key_ln = layer_norm(), layer_norm()
        else:
            self.query_ln = self.key_ln = nnx.data(None)
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim),
            self.out_features,
            axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init,
            bias_init=out_bias_init or bias_init,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        # Made after the other projections, so that adding a gate leaves their initial values as they were.
        if gate == "headwise":
            self.gate = linear(in_features, num_heads)
        elif gate == "elementwise":
            self.gate = linear(in_features, (num_heads, self.head_dim))
        else:
            self.gate = nnx.data(None)
        self.normalizer = LearnedNormalizer(self.normalizer_spec, num_heads, param_dtype=param_dtype)
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)

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
        rngs: nnx.Rngs | nnx.RngStream | Callable[[], jax.Array] | None = None,
        sow_weights: bool = False,
        return_statistics: bool = False,
        mass_keys: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Attention of inputs_q [B, T, F] over inputs_k [B, S, F_kv] (default inputs_q) and inputs_v
        (default inputs_k); returns [B, T, out_features]. As in flax, inputs_v without inputs_k is
        refused (ValueError), and inputs without a batch axis ([T, F], [S, F_kv]) give results
        without one (output, statistics and sown values).

        Args:
          mask: bool (or 0/1) broadcasting against [B, N, T, S]; False hides a key from a query.
          bias: added to the logits, broadcasting against [B, N, T, S].
          is_causal: key s visible to query t only if s <= t.
          positions: RoPE positions of the queries, [T] or [B, T] ints (default arange(T)).
          key_positions: RoPE positions of the keys (default `positions` when S == T, else arange(S)).
          rope_theta: overrides the layer's rope_theta for this call (e.g. 50x at evaluation);
            only for a layer built with RoPE.
          key_value_seq_lengths: [B] valid key counts (padding on the right).
          deterministic, rngs: dropout control, as in `flax.nnx.MultiHeadAttention` (the call's
            deterministic overrides the constructor's). rngs: an `nnx.Rngs` (its dropout stream), an
            `nnx.RngStream`, or any function of no arguments returning a key, called only when
            dropout is active (the Linen layer passes `make_rng("dropout")` this way).
          sow_weights: sow the weights [B, N, T, S] into nnx.Intermediate as "attention_weights"
            (dense path).
          return_statistics: return (out, statistics) with statistics {"max_weight", "entropy",
            "support_size"}, each [B, N, T] (not differentiated), reduced inside the attention pass.
          mass_keys: bool [B, S] or [S]: also return "key_mass", the weight each query puts on
            these keys (e.g. the needle's positions); implies return_statistics.
        """
        inputs_k, inputs_v = core.key_value_inputs(inputs_q, inputs_k, inputs_v)
        unbatched = core.check_inputs(inputs_q, inputs_k, inputs_v, self.in_features, self.in_kv_features)
        if unbatched:
            inputs_q, inputs_k, inputs_v = inputs_q[None], inputs_k[None], inputs_v[None]
            if key_value_seq_lengths is not None:
                key_value_seq_lengths = jnp.reshape(key_value_seq_lengths, (1,))
        query, key, value = self.project(inputs_q, inputs_k, inputs_v, positions, key_positions, rope_theta)

        deterministic, dropout_rng = self._dropout_state(deterministic, rngs)
        returned = return_statistics or mass_keys is not None
        out, aux = core.attend(
            query,
            key,
            value,
            self.normalizer(),
            bias=bias,
            mask=mask,
            is_causal=is_causal,
            key_value_seq_lengths=key_value_seq_lengths,
            implementation=self.implementation,
            key_block=self.key_block,
            query_block=self.query_block,
            statistics=self.sow_statistics or returned,
            mass_keys=mass_keys,
            return_weights=sow_weights,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            broadcast_dropout=self.broadcast_dropout,
            deterministic=deterministic,
        )
        # Unbatched inputs give unbatched results, sown ones included (as flax's layer does).
        unbatch = (lambda tree: jax.tree.map(lambda x: x[0], tree)) if unbatched else (lambda tree: tree)
        if self.sow_statistics:
            self.sow(nnx.Intermediate, "attention_statistics", unbatch({name: aux[name] for name in core.STATISTICS}))
        if sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", unbatch(aux["weights"]))
        if self.gate is not None:
            out = out * self.output_gate(inputs_q).astype(out.dtype)
        out = unbatch(self.out(out))
        if returned:
            names = (*core.STATISTICS, "key_mass") if mass_keys is not None else core.STATISTICS
            return out, unbatch({name: aux[name] for name in names})
        return out

    def project(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array,
        inputs_v: jax.Array,
        positions: jax.Array | None = None,
        key_positions: jax.Array | None = None,
        rope_theta: Any = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, N, H] (not yet scaled), k and v [B, S, K, H]: the projections, the optional q/k
        layer norms and RoPE (base `rope_theta`, or the layer's)."""
        query, key, value = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)
        theta = core.resolve_rope_theta(self.rope_theta, rope_theta)
        if theta is not None:
            query, key = core.rope_query_key(query, key, theta, positions, key_positions)
        return query, key, value

    def output_gate(self, inputs_q: jax.Array) -> jax.Array:
        """sigmoid(inputs_q @ W_gate + b_gate) for inputs_q [B, T, F]: [B, T, N, 1] head-wise, [B, T, N, H]
        elementwise; the factor on each head's attention output. Only for a layer built with a gate."""
        if self.gate is None:
            raise ValueError("attnlab.nn.MultiHeadAttention: the layer was built without a gate (gate=None)")
        logits = self.gate(inputs_q)
        return jax.nn.sigmoid(logits[..., None] if self.gate_kind == "headwise" else logits)

    def _dropout_state(self, deterministic: bool | None, rngs: Any) -> tuple[bool, jax.Array | None]:
        if self.dropout_rate == 0.0:
            return True, None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError(
                "attnlab.nn.MultiHeadAttention has dropout_rate > 0: pass deterministic=True/False to the "
                "constructor or to the call"
            )
        if deterministic:
            return True, None
        stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
        stream = self.rngs if stream is None else stream
        if stream is None:
            raise ValueError(
                "attnlab.nn.MultiHeadAttention: dropout needs rngs: the layer was built with keep_rngs=False, "
                "so pass rngs=nnx.Rngs(dropout=...) to the call"
            )
        return False, stream()
