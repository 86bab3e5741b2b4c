"""`MultiHeadAttention` for `flax.linen`, derived from the NNX layer `attnlab.nn.MultiHeadAttention`.

The Linen module holds no attention code. At each call it builds the NNX layer through
`flax.nnx.bridge.ToLinen` (in_features and in_kv_features from the inputs, Linen style; every
other constructor argument from the field of the same name, whose default is read from the NNX
constructor) and hands it every call argument. The bridge stores the NNX layer's variables as
Linen variables at init and loads them back at apply, so the parameters are ordinary Linen
parameters: `jax.grad` of `apply` reaches all of them, the normalizer's learned ones included.
Once parameters are stored (at apply, or a second call of a shared layer at init) the NNX layer
is built abstractly (`nnx.eval_shape`): no initial values are computed only to be replaced.

Variables. The bridge shares this module's scope (`nn.share_scope`), so the NNX layer's attributes
sit directly under the module, with the names and shapes of `flax.linen.MultiHeadDotProductAttention`
(N query heads, K key/value heads, H = qkv_features / N):

    params/query/kernel [F, N, H], params/query/bias [N, H]
    params/key/..., params/value/...    kernel [F_kv, K, H], bias [K, H]
    params/out/kernel [N, H, F_out], params/out/bias [F_out]
    params/query_ln/scale, params/key_ln/scale [H]             with normalize_qk
    params/gate/kernel [F, N], params/gate/bias [N]            with gate="headwise"
    params/gate/kernel [F, N, H], params/gate/bias [N, H]      with gate="elementwise"
    params/scale_beta/kernel [F, N], params/scale_beta/bias [N]   with adaptive_scale (and
    params/scale_gamma/kernel [F, N], params/scale_gamma/bias [N]  use_bias)
    params/normalizer/<name> [N, 1, 1]                         each of NormalizerSpec.learned
    intermediates/attention_statistics, intermediates/attention_weights
                                                               when sown (mutable=["intermediates"])

This is the layout of `nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param))`, so weights move between
the two layers as they are.

Linen conventions kept: dropout draws its key from `make_rng("dropout")` unless `dropout_rng` is
passed; sown values go to "intermediates", a tuple per name growing at each call. The NNX layer's
rules hold otherwise: the call's `deterministic` overrides the field (no error when both are set),
and configuration errors are raised at init, naming `attnlab.nn.MultiHeadAttention`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict, meta

from attnlab.nn import attention, core
from attnlab.normalizers.spec import NormalizerSpec

Initializer = Callable[..., jax.Array]

NNX_ARGUMENTS = inspect.signature(attention.MultiHeadAttention.__init__).parameters
FROM_INPUTS = ("in_features", "in_kv_features")
NNX_ONLY = ("self", "rngs", "keep_rngs")
# The NNX call with what it sows returned (an nnx.State of Intermediates) rather than kept on the
# layer, which the bridge rebuilds at every call; this module sows it again, Linen style.
CAPTURING_CALL = nnx.capture(attention.MultiHeadAttention.__call__, nnx.Intermediate)


def _default(name: str) -> Any:
    return NNX_ARGUMENTS[name].default


class MultiHeadAttention(nn.Module):
    """`attnlab.nn.MultiHeadAttention` as a Linen module (see the module docstring).

    Fields: the NNX constructor's arguments with the same meanings and defaults, except
    in_features and in_kv_features (taken from the inputs) and rngs, keep_rngs (Linen rngs are
    passed to init and apply). Statistics and weights are sown into "intermediates" (pass
    mutable=["intermediates"] to apply). Decoding with a cache (`decode`) is the NNX layer's only:
    here it raises ValueError.
    """

    num_heads: int
    qkv_features: int | None = _default("qkv_features")
    out_features: int | None = _default("out_features")
    num_kv_heads: int | None = _default("num_kv_heads")
    normalizer: str | NormalizerSpec = _default("normalizer")
    rope_theta: float | None = _default("rope_theta")
    implementation: str | None = _default("implementation")
    key_block: int = _default("key_block")
    query_block: int | None = _default("query_block")
    sow_statistics: bool = _default("sow_statistics")
    dtype: Any = _default("dtype")
    param_dtype: Any = _default("param_dtype")
    broadcast_dropout: bool = _default("broadcast_dropout")
    dropout_rate: float = _default("dropout_rate")
    deterministic: bool | None = _default("deterministic")
    precision: Any = _default("precision")
    kernel_init: Initializer = _default("kernel_init")
    out_kernel_init: Initializer | None = _default("out_kernel_init")
    bias_init: Initializer = _default("bias_init")
    out_bias_init: Initializer | None = _default("out_bias_init")
    use_bias: bool = _default("use_bias")
    normalize_qk: bool = _default("normalize_qk")
    gate: str | None = _default("gate")
    decode: bool = _default("decode")
    adaptive_scale: bool = _default("adaptive_scale")

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
        **kwargs: Any,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """inputs_q [B, T, F] (or [T, F]), inputs_k/v [B, S, F_kv] -> [B, T, out_features].

        Every keyword of `attnlab.nn.MultiHeadAttention.__call__` is passed on as it is (mask, bias,
        is_causal, positions, key_positions, rope_theta, key_value_seq_lengths, deterministic,
        sow_weights, return_statistics, mass_keys, mask_fn, score_fn), with the same results; `rngs` is replaced by
        `dropout_rng`, the key for dropout (default: `make_rng("dropout")`, drawn only when dropout
        is active).
        """
        if "rngs" in kwargs:
            raise TypeError(
                "attnlab.nn.LinenMultiHeadAttention takes dropout_rng (or a 'dropout' rng passed to apply), not rngs"
            )
        if self.decode or kwargs.get("decode"):
            raise ValueError(
                "attnlab.nn.LinenMultiHeadAttention does not decode with a cache (decode=True); decode with the "
                "NNX layer attnlab.nn.MultiHeadAttention (init_cache, then decode=True), whose parameters are "
                "this layer's, or with attnlab.nn.TransformerLM"
            )
        keys, values = core.key_value_inputs(inputs_q, inputs_k, inputs_v)
        core.check_inputs(inputs_q, keys, values, None, None)
        fields = {name: getattr(self, name) for name in NNX_ARGUMENTS if name not in (*FROM_INPUTS, *NNX_ONLY)}
        earlier = dict(self.variables.get("intermediates", {}))
        stored = self.variables.get("params")

        def build(**arguments: Any) -> attention.MultiHeadAttention:
            if stored:
                # Stored parameters replace the initial ones (the bridge loads them at apply; at init
                # they are those of an earlier call, loaded here): build the layer without them.
                layer = nnx.eval_shape(lambda: attention.MultiHeadAttention(**arguments, rngs=nnx.Rngs(0)))
                if self.is_initializing():
                    nnx.update(layer, meta.unbox(stored))
            else:
                layer = attention.MultiHeadAttention(**arguments, rngs=nnx.Rngs(params=self.make_rng("params")))
            # The bridge shares this scope and loads every variable in it into the new layer: what
            # an earlier call of this apply sowed needs a variable there (it goes back unchanged).
            for name, value in earlier.items():
                setattr(layer, name, nnx.Intermediate(value))
            return layer

        bridge = nnx.bridge.ToLinen(
            build,
            kwargs=FrozenDict(
                fields,
                in_features=jnp.shape(inputs_q)[-1],
                in_kv_features=jnp.shape(keys)[-1],
                keep_rngs=False,
            ),
            skip_rng=True,
            name="nnx",
        )
        nn.share_scope(self, bridge)

        def dropout_key() -> jax.Array:
            return self.make_rng("dropout") if dropout_rng is None else dropout_rng

        result, sown = bridge(inputs_q, inputs_k, inputs_v, rngs=dropout_key, nnx_method=CAPTURING_CALL, **kwargs)
        for name, variable in sown.items():
            for value in variable.get_value():
                self.sow("intermediates", name, value)
        return result
