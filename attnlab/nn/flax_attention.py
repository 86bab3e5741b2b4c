"""`attention_fn(normalizer)`: attnlab attention inside flax's own attention layers.

    nnx.MultiHeadAttention(..., attention_fn=attnlab.nn.attention_fn("entmax15"))
    linen.MultiHeadDotProductAttention(..., attention_fn=attnlab.nn.attention_fn("ssmax"))

What flax 0.12 passes, and what happens to it:
  - query, key, value [batch..., length, heads, head_dim] (key/value heads may divide query heads):
    any number of batch axes (including none) is flattened to one for attnlab and restored after.
  - bias, mask: broadcasting against [batch..., heads, q_len, kv_len]; mask may be bool or 0/1
    numbers (flax's make_attention_mask returns float32); nonzero = visible.
  - is_causal (nnx only): causal masking, top-left aligned.
  - dropout_rate, dropout_rng, broadcast_dropout, deterministic: attention-weight dropout, with
    the policy of `attnlab.nn.core` (softmax-type normalizers on the dense path; ValueError
    otherwise).
  - dtype: query, key and value are cast to it (default: their promoted dtype); the output is in it.
  - module: set by flax when sow_weights=True; the weights [batch..., heads, q_len, kv_len] are sown
    as "attention_weights" (nnx.Intermediate for NNX modules, "intermediates" for Linen).
  - force_fp32_for_softmax (Linen): honoured by construction, whatever its value: the logits are
    computed in float32 from query and key in their own dtype (float32 accumulation), and the
    normalizer runs on them in float32; the weights it sows are float32. False does not lower
    that precision to flax's (flax then runs softmax in `dtype`).
  - precision: accepted and not used (the logits and outputs accumulate in float32, as in
    flax's own fast path through jax.nn.dot_product_attention, which also ignores it).
  - any other keyword (newer flax releases add some) is accepted and ignored, except
    qk_attn_weights_einsum / attn_weights_value_einsum, which cannot be honoured: a value other
    than None raises ValueError.

Linen passes only the keywords the callable's signature names, so every keyword used is named
explicitly and `**kwargs` takes the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.attention import resolve_normalizer
from attnlab.nn import core
from attnlab.normalizers import NAMES, Normalizer
from attnlab.normalizers.spec import NormalizerSpec

OPTIONS = {
    "implementation": None,
    "key_block": 512,
    "query_block": None,
    "local_window_size": None,
    "scale": None,
    "mask_fn": None,
    "score_fn": None,
}
UNSUPPORTED_KEYWORDS = ("qk_attn_weights_einsum", "attn_weights_value_einsum")


def _fixed_normalizer(normalizer: Any) -> Callable:
    if isinstance(normalizer, NormalizerSpec):
        if normalizer.learned:
            raise ValueError(
                f"attention_fn: the spec learns {', '.join(normalizer.learned)}, but attention_fn holds no parameters; "
                "use attnlab.nn.MultiHeadAttention (or LinenMultiHeadAttention) to learn them, or a spec with "
                "learn_s=False for fixed values"
            )
        return normalizer.build({})
    if isinstance(normalizer, str) and normalizer not in NAMES:
        raise ValueError(f"attention_fn: normalizer={normalizer!r}; accepted names: {', '.join(NAMES)}")
    try:
        return resolve_normalizer(normalizer)
    except TypeError as error:
        raise ValueError(f"attention_fn: {error}") from None


def attention_fn(normalizer: str | NormalizerSpec | Normalizer | Callable = "softmax", **options: Any) -> Callable:
    """A flax-compatible attention function that runs `attnlab.attention.dot_product_attention`.

    Args:
      normalizer: a name from `attnlab.normalizers.NAMES` (its default parameters: "ssmax" is
        SSMax with a fixed s = 0.43), a `Normalizer` (`attnlab.normalizers.get("ssmax", s=0.5)`),
        a `NormalizerSpec` without learned parameters, or a callable f(logits, *, axis, where).
      **options: implementation, key_block, query_block, local_window_size, scale, mask_fn,
        score_fn, passed to `dot_product_attention` (mask_fn and score_fn: functions of positions,
        see `attnlab.attention.mask_functions`; b indexes the batch axes flattened into one).
        Anything else raises TypeError listing these.

    Returns:
      fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
      dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
      is_causal=False, force_fp32_for_softmax=False, **kwargs) -> [batch..., q_len, heads, head_dim];
      see the module docstring for how each keyword is used.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"attention_fn got unknown options {unknown}; accepted: {', '.join(OPTIONS)}")
    settings = {**OPTIONS, **options}
    core.check_implementation(
        settings["implementation"], settings["key_block"], settings["query_block"], "attention_fn"
    )
    norm = _fixed_normalizer(normalizer)
    name = getattr(norm, "name", None) or getattr(norm, "__name__", type(norm).__name__)
    softmax_type = core.is_softmax_type(norm)

    def fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
        force_fp32_for_softmax: bool = False,
        **kwargs: Any,
    ) -> jax.Array:
        for keyword in UNSUPPORTED_KEYWORDS:
            if kwargs.get(keyword) is not None:
                raise ValueError(f"attnlab attention_fn cannot use {keyword}; leave it None")
        if dropout_rate > 0.0 and not deterministic:
            core.check_dropout(dropout_rate, softmax_type, settings["implementation"], name, "attention_fn")
        query, key, value = _promote(query, key, value, dtype)
        if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                "attention_fn: query, key, value must be [batch..., length, heads, head_dim] with the same batch "
                f"axes; got shapes {query.shape}, {key.shape}, {value.shape}"
            )
        batch = query.shape[:-3]
        if not batch == key.shape[:-3] == value.shape[:-3]:
            raise ValueError(
                f"attention_fn: query, key and value must have the same batch axes (flax requires it too); got "
                f"query {query.shape}, key {key.shape}, value {value.shape} ([batch..., length, heads, head_dim])"
            )
        flat = lambda x: x.reshape((math.prod(batch), *x.shape[-3:]))  # noqa: E731
        out, aux = core.attend(
            flat(query),
            flat(key),
            flat(value),
            norm,
            bias=_flatten_batch(bias, batch, "bias"),
            mask=_flatten_batch(core.as_bool_mask(mask), batch, "mask"),
            is_causal=is_causal,
            local_window_size=settings["local_window_size"],
            scale=settings["scale"],
            implementation=settings["implementation"],
            key_block=settings["key_block"],
            query_block=settings["query_block"],
            return_weights=module is not None,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            broadcast_dropout=broadcast_dropout,
            deterministic=deterministic,
            mask_fn=settings["mask_fn"],
            score_fn=settings["score_fn"],
        )
        if module is not None:
            _sow_weights(module, aux["weights"].reshape((*batch, *aux["weights"].shape[1:])))
        return out.reshape((*batch, *out.shape[1:]))

    fn.__name__ = fn.__qualname__ = f"attnlab_attention_fn_{name}"
    return fn


def _promote(query, key, value, dtype):
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def _flatten_batch(x: jax.Array | None, batch: tuple[int, ...], name: str) -> jax.Array | None:
    """[batch..., heads, T, S]-broadcastable -> [prod(batch) or 1, heads|1, T|1, S|1]."""
    if x is None:
        return None
    x = jnp.asarray(x)
    full = len(batch) + 3
    if x.ndim > full:
        raise ValueError(f"attention_fn: {name} of shape {x.shape} has more axes than [batch..., heads, q_len, kv_len]")
    x = x.reshape((1,) * (full - x.ndim) + x.shape)
    if all(d == 1 for d in x.shape[: len(batch)]):
        return x.reshape(x.shape[len(batch) :])[None]
    x = jnp.broadcast_to(x, (*batch, *x.shape[len(batch) :]))
    return x.reshape((-1, *x.shape[len(batch) :]))


def _sow_weights(module: Any, weights: jax.Array) -> None:
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    elif isinstance(module, nn.Module):
        module.sow("intermediates", "attention_weights", weights)
    else:
        raise ValueError(f"attention_fn: module must be a flax nnx or linen Module; got {type(module).__name__}")
