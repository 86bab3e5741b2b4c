"""Framework-free pieces shared by the NNX layer (and so the Linen layer built from it) and `attention_fn`.

Everything here is a pure function of arrays and static options: configuration and input checks,
RoPE on queries and keys, and `attend`, which calls `attnlab.attention.dot_product_attention` and
adds attention-weight dropout.

Dropout policy: attention-weight dropout (the kind flax applies, p -> keep * p / (1 - rate)) is
implemented for softmax-type normalizers (softmax, scaled_softmax, ssmax) on the dense path,
which is the only path that holds the weights. Anything else raises ValueError when dropout is
active: sparse maps (sparsemax, entmax, their log-n variants) because their point is an exact
support and exact zeros, and dropping survivors rescales that support into something that is
neither; the chunked and cuDNN paths because they never hold the weights to drop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention import IMPLEMENTATIONS, dot_product_attention
from attnlab.nn.rope import apply_rope
from attnlab.normalizers import Normalizer

STATISTICS = ("max_weight", "entropy", "support_size")


def check_heads(num_heads: Any, num_kv_heads: Any, qkv_features: Any, where: str) -> int:
    """Validate the head layout; returns head_dim = qkv_features // num_heads."""
    for field, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("qkv_features", qkv_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {field} must be a positive int; got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{where}: num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads}) "
            "for grouped-query attention"
        )
    if qkv_features % num_heads:
        raise ValueError(f"{where}: qkv_features ({qkv_features}) must be divisible by num_heads ({num_heads})")
    return qkv_features // num_heads


def check_rope_theta(rope_theta: Any, head_dim: int | None, where: str) -> None:
    if rope_theta is None:
        return
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
        raise ValueError(f"{where}: rope_theta must be None (no RoPE) or a number > 0; got {rope_theta!r}")
    if head_dim is not None and head_dim % 2:
        raise ValueError(f"{where}: RoPE needs an even head_dim (qkv_features / num_heads); got {head_dim}")


def resolve_rope_theta(layer_theta: float | None, call_theta: Any) -> Any:
    """The theta for this call: the call's override (a number > 0 or a scalar array) or the layer's."""
    if call_theta is None:
        return layer_theta
    if layer_theta is None:
        raise ValueError(
            "rope_theta was given at call time, but the layer was built without RoPE (rope_theta=None); "
            "build it with rope_theta=... to use rotary embeddings"
        )
    if not isinstance(call_theta, jax.Array):
        check_rope_theta(call_theta, None, "rope_theta (call)")
    return call_theta


def key_value_inputs(inputs_q: Any, inputs_k: Any, inputs_v: Any) -> tuple[Any, Any]:
    """flax's defaults: keys default to the queries, values to the keys; values without keys are refused."""
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError(
                "inputs_k cannot be None when inputs_v is given (as in flax's MultiHeadAttention): pass the keys "
                "as inputs_k, or pass the values as inputs_k and leave inputs_v None to use them for both"
            )
        inputs_k = inputs_q
    return inputs_k, inputs_k if inputs_v is None else inputs_v


def check_inputs(
    inputs_q: Any, inputs_k: Any, inputs_v: Any, in_features: int | None, in_kv_features: int | None
) -> bool:
    """Inputs must all be [batch, length, features] or all [length, features] (returns True for the
    latter: no batch axis); features must match the layer's when it declares them."""
    for name, x, features in (
        ("inputs_q", inputs_q, in_features),
        ("inputs_k", inputs_k, in_kv_features),
        ("inputs_v", inputs_v, in_kv_features),
    ):
        if jnp.ndim(x) not in (2, 3):
            raise ValueError(
                f"{name} must be [batch, length, features] or [length, features]; got shape {jnp.shape(x)} "
                "(for several batch axes, reshape them into one, or vmap the layer)"
            )
        if features is not None and jnp.shape(x)[-1] != features:
            raise ValueError(f"{name} has {jnp.shape(x)[-1]} features; the layer expects {features}")
    if not jnp.ndim(inputs_q) == jnp.ndim(inputs_k) == jnp.ndim(inputs_v):
        raise ValueError(
            "inputs_q, inputs_k, inputs_v must all have a batch axis or all have none; got shapes "
            f"{jnp.shape(inputs_q)}, {jnp.shape(inputs_k)}, {jnp.shape(inputs_v)}"
        )
    if jnp.ndim(inputs_q) == 3 and not jnp.shape(inputs_q)[0] == jnp.shape(inputs_k)[0] == jnp.shape(inputs_v)[0]:
        raise ValueError(
            f"inputs_q, inputs_k, inputs_v must share the batch size; got {jnp.shape(inputs_q)}, "
            f"{jnp.shape(inputs_k)}, {jnp.shape(inputs_v)}"
        )
    if jnp.shape(inputs_k)[-2] != jnp.shape(inputs_v)[-2]:
        raise ValueError(
            f"inputs_k and inputs_v must have the same length; got {jnp.shape(inputs_k)}, {jnp.shape(inputs_v)}"
        )
    return jnp.ndim(inputs_q) == 2


def check_implementation(implementation: Any, key_block: Any, query_block: Any, where: str) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: implementation={implementation!r}; accepted: None, {', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    if isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 1:
        raise ValueError(f"{where}: key_block must be a positive int; got {key_block!r}")
    if query_block is not None and (
        isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 1
    ):
        raise ValueError(f"{where}: query_block must be None or a positive int; got {query_block!r}")


def check_dropout(dropout_rate: Any, softmax_type: bool, implementation: Any, name: str, where: str) -> None:
    """Raise ValueError if attention-weight dropout at `dropout_rate` cannot be honoured (module docstring)."""
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{where}: dropout_rate must be a number in [0, 1); got {dropout_rate!r}")
    if dropout_rate == 0.0:
        return
    if not softmax_type:
        raise ValueError(
            f"{where}: attention-weight dropout (dropout_rate={dropout_rate}) is unsupported with normalizer "
            f"{name!r}: dropping weights of a sparse map breaks its exact support. Supported with softmax, "
            "scaled_softmax and ssmax; otherwise use dropout_rate=0 (or deterministic=True) and put dropout elsewhere"
        )
    if implementation not in (None, "dense"):
        raise ValueError(
            f"{where}: attention-weight dropout (dropout_rate={dropout_rate}) needs implementation=None or 'dense' "
            f"(the path that holds the weights); got implementation={implementation!r}"
        )


def is_softmax_type(normalizer: Callable) -> bool:
    return isinstance(normalizer, Normalizer) and normalizer.softmax_type


def rope_query_key(
    query: jax.Array,
    key: jax.Array,
    theta: Any,
    positions: jax.Array | None,
    key_positions: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """RoPE on query [B, T, N, H] and key [B, S, K, H].

    Query positions default to arange(T); key positions to `positions` when S == T (self-attention)
    and to arange(S) otherwise.
    """
    T, S = query.shape[1], key.shape[1]
    if positions is None:
        positions = jnp.arange(T)
    if key_positions is None:
        key_positions = positions if S == T else jnp.arange(S)
    return apply_rope(query, positions, theta=theta), apply_rope(key, key_positions, theta=theta)


def as_bool_mask(mask: Any) -> jax.Array | None:
    """A flax-style mask (bool, or numbers with nonzero = visible) -> bool."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    normalizer: Callable,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    key_block: int = 512,
    query_block: int | None = None,
    statistics: bool = False,
    mass_keys: jax.Array | None = None,
    return_weights: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    broadcast_dropout: bool = True,
    deterministic: bool = True,
    mask_fn: Callable | None = None,
    score_fn: Callable | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`dot_product_attention` on [B, T, N, H] / [B, S, K, H] with attention-weight dropout (mask_fn
    and score_fn are passed on: see attnlab.attention.mask_functions).

    Returns (out [B, T, N, H], aux), aux holding the statistics [B, N, T] when `statistics` and the
    weights [B, N, T, S] (before dropout, as flax sows them) when `return_weights`. Dropout, when
    dropout_rate > 0 and not deterministic, multiplies the weights by keep / (1 - dropout_rate),
    keep ~ Bernoulli(1 - dropout_rate) of shape [1, 1, T, S] (`broadcast_dropout`, shared over batch
    and heads) or [B, N, T, S]; see the module docstring for where it is supported.
    """
    dropout = dropout_rate > 0.0 and not deterministic
    if dropout:
        name = getattr(normalizer, "name", type(normalizer).__name__)
        check_dropout(dropout_rate, is_softmax_type(normalizer), implementation, name, "attention")
        if dropout_rng is None:
            raise ValueError("attention: dropout_rate > 0 and deterministic=False need a dropout_rng")
    result = dot_product_attention(
        query,
        key,
        value,
        bias,
        as_bool_mask(mask),
        normalizer=normalizer,
        scale=scale,
        is_causal=is_causal,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        implementation=implementation,
        key_block=key_block,
        query_block=query_block,
        statistics=statistics,
        mass_keys=mass_keys,
        return_weights=return_weights or dropout,
        mask_fn=mask_fn,
        score_fn=score_fn,
    )
    out, aux = result if isinstance(result, tuple) else (result, {})
    if dropout:
        weights = aux["weights"]
        keep_prob = 1.0 - dropout_rate
        shape = (1, 1, *weights.shape[2:]) if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        dropped = jnp.where(keep, weights / keep_prob, 0.0)
        out = _weighted_values(dropped, value).astype(out.dtype)
        if not return_weights:
            del aux["weights"]
    return out, aux


def _weighted_values(weights: jax.Array, value: jax.Array) -> jax.Array:
    """weights [B, N, T, S], value [B, S, K, H] (N = K * G) -> [B, T, N, H] in float32."""
    B, N, T, S = weights.shape
    K, H = value.shape[2], value.shape[3]
    grouped = weights.reshape(B, K, N // K, T, S)
    out = jnp.einsum("bkgts,bskh->btkgh", grouped, value.astype(jnp.float32), preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H)
