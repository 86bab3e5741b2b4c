"""`dot_product_attention` with any normalizer, in the layout of `jax.nn.dot_product_attention`.

This module checks and lays out a call, picks its backend from the table (attention.backends) and
shapes the result; the backends do the computing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attnlab.attention import backends, families
from attnlab.attention.backends import IMPLEMENTATIONS, Call, Options, Result
from attnlab.attention.families import static_entmax_alpha
from attnlab.attention.masks import Visibility, group_queries, to_grouped, ungroup_queries
from attnlab.attention.online_softmax import DEFAULT_KEY_BLOCK
from attnlab.attention.statistics import NAMES as STATISTICS
from attnlab.normalizers import SOFTMAX, get
from attnlab.normalizers._rows import align_param

Implementation = Literal["dense", "xla", "chunked", "online", "blocked_entmax", "query_blocked", "cudnn", "pallas"]

__all__ = [
    "DEFAULT_KEY_BLOCK",
    "IMPLEMENTATIONS",
    "dot_product_attention",
    "resolve_normalizer",
    "static_entmax_alpha",
]


def resolve_normalizer(normalizer: str | Callable) -> Callable:
    """A registry name -> its Normalizer; a callable f(logits, *, axis, where) is used as given."""
    if isinstance(normalizer, str):
        return get(normalizer)
    if callable(normalizer):
        return normalizer
    raise TypeError(
        f"normalizer must be a registry name (attnlab.normalizers.NAMES) or a callable "
        f"f(logits, *, axis=-1, where=None); got {type(normalizer).__name__}"
    )


def _as_float(x: ArrayLike) -> jax.Array:
    """An array; integer and boolean ones as float32 (jax.nn would return their outputs truncated)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _check_shapes(query, key, value) -> tuple[int, int, int, int, int, int]:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, seq, heads, head_dim] (or [seq, heads, head_dim], "
            f"all three); got shapes {query.shape}, {key.shape}, {value.shape}"
        )
    B, T, N, H = query.shape
    Bk, S, K, Hk = key.shape
    if key.shape != (*value.shape[:3], Hk) or value.shape[:3] != (Bk, S, K):
        raise ValueError(f"key {key.shape} and value {value.shape} must agree on batch, length and heads")
    if Bk != B:
        raise ValueError(f"query batch {B} != key batch {Bk} (an input without a batch axis has batch 1)")
    if Hk != H:
        raise ValueError(f"query head_dim {H} != key head_dim {Hk}")
    if K == 0 or N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K}) for grouped-query attention")
    return B, T, N, H, S, K


def _check_broadcast(name: str, x: ArrayLike | None, shape: tuple[int, ...], labels: str) -> jax.Array | None:
    """x as an array that broadcasts against `shape` (named `labels`, e.g. "[B, N, T, S]"), else ValueError."""
    if x is None:
        return None
    x = jnp.asarray(x)
    padded = (1,) * (len(shape) - x.ndim) + x.shape
    if x.ndim > len(shape) or any(a not in (1, b) for a, b in zip(padded, shape, strict=True)):
        raise ValueError(f"{name} has shape {x.shape}, which does not broadcast against {labels} = {shape}")
    return x


def _check_lengths(name: str, lengths: ArrayLike | None, batch: int) -> jax.Array | None:
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be integers of shape [B] = ({batch},), one length per batch row; "
            f"got {lengths.dtype} of shape {lengths.shape}"
        )
    return lengths.astype(jnp.int32)


def _check_window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    single = isinstance(local_window_size, (int, np.integer))
    window = (local_window_size, local_window_size) if single else local_window_size
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0 for w in window)
    ):
        raise ValueError(
            f"local_window_size must be an int >= 0 or a pair (left, right) of ints >= 0; got {local_window_size!r}"
        )
    return int(window[0]), int(window[1])


def _check_block(name: str, block, *, optional: bool) -> None:
    if optional and block is None:
        return
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a positive int; got {block!r}")


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    normalizer: str | Callable = "softmax",
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    key_block: int = DEFAULT_KEY_BLOCK,
    query_block: int | None = None,
    statistics: bool = False,
    mass_keys: ArrayLike | None = None,
    return_weights: bool = False,
    return_residual: bool = False,
    mask_fn: Callable | None = None,
    score_fn: Callable | None = None,
):
    """Scaled dot-product attention whose weights come from any normalizer.

        out[b, t, n] = sum_s p[b, n, t, s] value[b, s, n // G]
        p[b, n, t, :] = normalizer(scale * query[b, t, n] . key[b, :, n // G] + bias[b, n, t, :],
                                   where=visible[b, n, t, :])

    Layout and keywords follow `jax.nn.dot_product_attention`: query [B, T, N, H] (or [T, N, H]
    with key and value [S, K, H]: no batch axis, none in the results), key and value [B, S, K, H]
    with N a multiple of K (grouped-query attention), `bias` and boolean `mask` broadcasting
    against [B, N, T, S], `scale` defaulting to 1 / sqrt(H), `is_causal` (top-left aligned),
    `query_seq_lengths` / `key_value_seq_lengths` [B] and `local_window_size`. Scale policies see
    each query's own number of visible keys as n (SSMax under a causal mask uses n = t + 1). A
    query with no visible key (every query when S = 0) gets output 0 and zero gradients. Integer
    and boolean inputs are computed, and returned, as float32.

    Args:
      normalizer: a name from `attnlab.normalizers.NAMES`, a `Normalizer` (`normalizers.get(...)`,
        or one registered from outside with `attnlab.normalizers.register`), or any callable
        f(logits, *, axis, where). Normalizer parameters must broadcast against [B, N, T, 1], e.g.
        one per head as [N, 1, 1], or one per query as [B, N, T, 1] (ASEntmax's adaptive beta).
      implementation: a backend of `attnlab.attention.BACKENDS` (see attention.backends for what
        each serves): "dense" ("xla" too) builds the [B, N, T, S] logits once (the reference);
        "online" runs softmax-type and sigmoid normalizers `query_block` queries (default 512) at a
        time through an online pass over the `key_block`-sized key blocks they can see;
        "blocked_entmax" runs the entmax family with one alpha in (1, 2] by query blocks with exact
        thresholds and a closed-form backward; "query_blocked" runs any normalizer on whole rows,
        a query block at a time; "chunked" is the first of those three that serves the call (none
        builds the T x S logits); "cudnn" is `jax.nn.dot_product_attention(implementation="cudnn")`
        (GPU, half precision, softmax without a sink); "pallas" a Pallas entmax kernel (GPU,
        interpreted elsewhere; causal and key lengths only). None takes dense for small inputs or
        when the weights are wanted, cuDNN on GPU for half-precision softmax, else the memory-
        efficient backend of the normalizer's family. A backend that cannot serve the call raises
        ValueError saying why.
      statistics: also return per-query statistics [B, N, T] reduced inside the computation:
        max_weight, entropy, support_size (exact non-zeros) and, with `mass_keys` (bool,
        broadcasting against [B, S]), key_mass = the weight on those keys. Not differentiated.
      return_weights: also return the weights [B, N, T, S] (dense; for small inputs and plots).
      return_residual: also return, as jax.nn does, the log-sum-exp of each query's scaled logits
        [B, T, N], log(e^sink + sum_s e^z) for softmax-type normalizers (-inf for a query that sees
        nothing and has no sink); other families have none (ValueError). Not differentiated.
      mask_fn: mask_fn(b, h, q_idx, kv_idx) -> bool (FlexAttention's mask_mod; built-ins in
        `attnlab.attention.mask_functions`: causal, sliding window, prefix-LM, documents): one more
        visibility rule, evaluated a block at a time, never as a T x S array outside the dense
        backend; the online backend visits only the key blocks it leaves visible.
      score_fn: score_fn(score, b, h, q_idx, kv_idx) -> score (FlexAttention's score_mod: ALiBi,
        soft-capping, a relative-position table): maps the logits scale q.k + bias before the
        normalizer (and its scale policy); arrays it closes over get gradients. Both are called on
        broadcasting index arrays (see attention.mask_functions). cuDNN and Pallas take neither.

    Returns:
      out [B, T, N, H] in the dtype of `query`; with return_residual, (out, residual); with
      `statistics` or `return_weights`, (out, aux) where aux holds the requested arrays; with both,
      (out, residual, aux).
    """
    query, key, value = (_as_float(x) for x in (query, key, value))
    unbatched = query.ndim == 3
    query, key, value = (x[None] if x.ndim == 3 else x for x in (query, key, value))
    B, T, N, H, S, K = _check_shapes(query, key, value)
    G = N // K
    normalizer = resolve_normalizer(normalizer)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    window = _check_window(local_window_size)
    _check_block("key_block", key_block, optional=False)
    _check_block("query_block", query_block, optional=True)
    bias = _check_broadcast("bias", bias, (B, N, T, S), "[B, N, T, S]")
    mask = _check_broadcast("mask", mask, (B, N, T, S), "[B, N, T, S]")
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = visible); got dtype {mask.dtype}")
    query_lengths = _check_lengths("query_seq_lengths", query_seq_lengths, B)
    key_lengths = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, B)
    mass_keys = _check_broadcast("mass_keys", mass_keys, (B, S), "[B, S]")
    if mass_keys is not None:
        mass_keys = mass_keys.astype(bool).reshape((1,) * (2 - mass_keys.ndim) + mass_keys.shape)[:, None, None, None]

    options = Options(
        batch=B, queries=T, keys=S, heads=N, kv_heads=K, head_dim=H, dtype=query.dtype,
        platform=jax.default_backend(), bias=bias is not None, mask=mask is not None, is_causal=bool(is_causal),
        local_window=window, query_lengths=query_lengths is not None, key_lengths=key_lengths is not None,
        statistics=statistics or mass_keys is not None, mass_keys=mass_keys is not None,
        weights=return_weights, residual=return_residual, mask_fn=mask_fn is not None, score_fn=score_fn is not None,
    )  # fmt: skip
    backend = backends.select(implementation, normalizer, options)
    if T == 0 or S == 0:
        result = _empty(normalizer, options)
    else:
        call = Call(
            q=group_queries(query, K),
            k=jnp.moveaxis(key, 1, 2),
            v=jnp.moveaxis(value, 1, 2),
            bias=to_grouped(bias, K, G, "bias"),
            visibility=Visibility(
                num_queries=T,
                num_keys=S,
                is_causal=bool(is_causal),
                local_window=window,
                query_lengths=query_lengths,
                key_lengths=key_lengths,
                mask=to_grouped(mask, K, G, "mask"),
                mask_fn=_check_function("mask_fn", mask_fn),
                heads=(B, K, G),
            ),
            score_fn=_check_function("score_fn", score_fn),
            scale=scale,
            key_block=int(key_block),
            query_block=None if query_block is None else int(query_block),
            mass_keys=mass_keys,
        )
        result = backend.run(normalizer, call, options)
    return _outputs(result, query.dtype, unbatched, options)


def _check_function(name: str, fn: Callable | None) -> Callable | None:
    if fn is not None and not callable(fn):
        raise ValueError(f"{name} must be None or a function of index arrays (attention.mask_functions); got {fn!r}")
    return fn


def _empty(normalizer: Callable, options: Options) -> Result:
    """The result of a call with no query or no key: zeros (and the residual of a row that sees nothing)."""
    B, N, T, S, K = options.batch, options.heads, options.queries, options.keys, options.kv_heads
    rows = (B, K, N // K, T)
    aux = {}
    if options.statistics:
        names = STATISTICS if options.mass_keys else tuple(n for n in STATISTICS if n != "key_mass")
        aux = {name: jnp.zeros(rows, jnp.float32) for name in names}
    if options.weights:
        aux["weights"] = jnp.zeros((*rows, S), jnp.float32)
    residual = None
    if options.residual:
        sink = getattr(normalizer.mapping, "sink", None) if families.family(normalizer) == SOFTMAX else None
        if sink is None:
            residual = jnp.full(rows, -jnp.inf, jnp.float32)
        else:
            sink = jnp.broadcast_to(align_param(sink, "sink", (B, N, T, S), 3), (B, N, T, 1))
            residual = sink.reshape(rows).astype(jnp.float32)
    return Result(jnp.zeros((*rows, options.head_dim), jnp.float32), aux, residual)


def _outputs(result: Result, dtype, unbatched: bool, options: Options):
    """The caller's layout: out [B, T, N, H], residual [B, T, N], aux [B, N, T, ...]; no batch axis if none came."""
    out = ungroup_queries(result.out).astype(dtype)
    drop = (lambda x: x[0]) if unbatched else (lambda x: x)
    outputs = [drop(out)]
    if options.residual:
        residual = result.residual.reshape(options.batch, options.heads, options.queries)
        outputs.append(drop(jnp.swapaxes(residual, 1, 2).astype(dtype)))
    if options.statistics or options.weights:
        outputs.append(
            {name: drop(x.reshape(x.shape[0], options.heads, *x.shape[3:])) for name, x in result.aux.items()}
        )
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
