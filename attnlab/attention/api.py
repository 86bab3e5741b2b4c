"""`dot_product_attention` with any normalizer, in the layout of `jax.nn.dot_product_attention`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from attnlab.attention.dense import dense_attention
from attnlab.attention.masks import Visibility, to_grouped
from attnlab.attention.online_softmax import online_softmax_attention, softmax_statistics
from attnlab.attention.query_blocked import query_blocked_attention
from attnlab.attention.sparse_blocked import sparse_blocked_attention
from attnlab.normalizers import Entmax, Entmax15, Normalizer, Sigmoid, Softmax, Softmax1, Sparsemax, get
from attnlab.normalizers._rows import align_param, concrete_values
from attnlab.normalizers.recent import default_sigmoid_bias

Implementation = Literal["dense", "chunked", "cudnn", "pallas"] | None
IMPLEMENTATIONS = ("dense", "chunked", "cudnn", "pallas")
DEFAULT_KEY_BLOCK = 512
# Query block of the online softmax path: [B, N, 512, 512] logits per step.
DEFAULT_SOFTMAX_QUERY_BLOCK = 512
# Query blocks hold [B, N, query_block, S] logits; this many elements keeps that near 64 MiB.
QUERY_BLOCK_ELEMENTS = 1 << 24
# Query blocks of the entmax-family fast path hold about this many logits ([B, N, query_block, S]):
# small enough that the threshold passes over a block stay in cache.
SPARSE_QUERY_BLOCK_ELEMENTS = 1 << 20
# ... but never fewer queries than this (thinner blocks make the matmuls inefficient).
SPARSE_MIN_QUERY_BLOCK = 32
# Below this many logits per call, the dense path is faster and its memory is no concern.
DENSE_MAX_ELEMENTS = 1 << 22


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


def _softmax_type(normalizer: Callable) -> bool:
    return isinstance(normalizer, Normalizer) and isinstance(normalizer.mapping, Softmax)


# Mappings whose rows the key-blocked pass of attention.online_softmax computes, by its name for them.
ONLINE_MAPPINGS = {Softmax: "softmax", Softmax1: "softmax1", Sigmoid: "sigmoid"}


def _online_mapping(normalizer: Callable) -> str | None:
    """ "softmax" (softmax-type), "softmax1" or "sigmoid" when `normalizer` takes the online
    key-blocked path (attention.online_softmax), else None."""
    if not isinstance(normalizer, Normalizer):
        return None
    return ONLINE_MAPPINGS.get(type(normalizer.mapping))


def static_entmax_alpha(normalizer: Callable) -> float | None:
    """alpha in (1, 2] when `normalizer` is an entmax-family Normalizer with one concrete alpha.

    Those take the fast blocked path (sparse_blocked); anything else (a traced or per-head alpha,
    alpha > 2, a custom callable) takes the generic query-blocked path.
    """
    if not isinstance(normalizer, Normalizer):
        return None
    mapping = normalizer.mapping
    if isinstance(mapping, Sparsemax):
        return 2.0
    if isinstance(mapping, Entmax15):
        return 1.5
    if isinstance(mapping, Entmax):
        values = concrete_values(mapping.alpha)
        if values is None or values.size == 0 or not (values == values.flat[0]).all():
            return None
        alpha = float(values.flat[0])
        return alpha if 1.0 < alpha <= 2.0 else None
    return None


def _check_shapes(query, key, value) -> tuple[int, int, int, int, int, int]:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, seq, heads, head_dim]; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    B, T, N, H = query.shape
    Bk, S, K, Hk = key.shape
    if key.shape != (*value.shape[:3], Hk) or value.shape[:3] != (Bk, S, K):
        raise ValueError(f"key {key.shape} and value {value.shape} must agree on batch, length and heads")
    if Bk != B:
        raise ValueError(f"query batch {B} != key batch {Bk}")
    if Hk != H:
        raise ValueError(f"query head_dim {H} != key head_dim {Hk}")
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K}) for grouped-query attention")
    return B, T, N, H, S, K


def _pick_implementation(
    implementation: Implementation, normalizer: Callable, elements: int, want_weights: bool, dtype: Any
) -> str:
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r}; accepted: None, {', '.join(map(repr, IMPLEMENTATIONS))}"
            )
        if implementation == "cudnn" and not _softmax_type(normalizer):
            raise ValueError(
                "implementation='cudnn' supports softmax-type normalizers only (softmax, scaled_softmax, ssmax)"
            )
        if implementation == "pallas" and static_entmax_alpha(normalizer) is None:
            raise ValueError(
                "implementation='pallas' supports the entmax family with one alpha in (1, 2] only "
                "(sparsemax, entmax15, entmax(alpha), and their logn_ versions)"
            )
        return implementation
    if want_weights or elements <= DENSE_MAX_ELEMENTS:
        return "dense"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if _softmax_type(normalizer) and half and jax.default_backend() == "gpu":
        return "cudnn"
    return "chunked"


def _per_query(value_of: Callable, visibility: Visibility, B: int, N: int, T: int, S: int, K: int) -> jax.Array:
    """value_of(counts [B|1, N, T, 1], align) per (batch, head, query), grouped [B|1, K, G, T, 1]:
    counts are each query's visible keys (n), align(value, name) shapes a normalizer parameter
    like the [B, N, T, S] logits with the key axis kept as 1."""
    G = N // K
    counts = jnp.broadcast_to(visibility.visible_counts(), (visibility.visible_counts().shape[0], K, G, T, 1))
    counts = counts.reshape(counts.shape[0], N, T, 1)

    def align(value, name):
        return align_param(value, name, (B, N, T, S), 3)

    value = value_of(counts, align)
    value = jnp.broadcast_to(value, jnp.broadcast_shapes(value.shape, counts.shape))
    return value.reshape(value.shape[0], K, G, T, 1)


def _row_factor(normalizer: Normalizer, visibility: Visibility, B: int, N: int, T: int, S: int, K: int) -> jax.Array:
    """The scale policy's factor per (batch, head, query), grouped [B|1, K, G, T, 1]."""
    return _per_query(normalizer.scale.factor, visibility, B, N, T, S, K)


def _sigmoid_bias(normalizer: Normalizer, visibility: Visibility, B: int, N: int, T: int, S: int, K: int) -> jax.Array:
    """Sigmoid attention's b in sigmoid(z + b) per (batch, head, query), grouped [B|1, K, G, T, 1]:
    -log n (n = the query's visible keys, at least 1) unless the mapping has its own bias."""
    given = normalizer.mapping.bias

    def value_of(counts, align):
        if given is None:
            return default_sigmoid_bias(counts.astype(jnp.float32))
        return align(given, "bias").astype(jnp.float32)

    return _per_query(value_of, visibility, B, N, T, S, K)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    normalizer: str | Callable = "softmax",
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation = None,
    key_block: int = DEFAULT_KEY_BLOCK,
    query_block: int | None = None,
    statistics: bool = False,
    mass_keys: jax.Array | None = None,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Scaled dot-product attention whose weights come from any normalizer.

        out[b, t, n] = sum_s p[b, n, t, s] value[b, s, n // G]
        p[b, n, t, :] = normalizer(scale * query[b, t, n] . key[b, :, n // G] + bias[b, n, t, :],
                                   where=visible[b, n, t, :])

    Layout and keywords follow `jax.nn.dot_product_attention`: query [B, T, N, H], key and value
    [B, S, K, H] with N a multiple of K (grouped-query attention), `bias` and boolean `mask`
    broadcasting against [B, N, T, S], `scale` defaulting to 1 / sqrt(H), `is_causal` (top-left
    aligned), `query_seq_lengths` / `key_value_seq_lengths` [B] and `local_window_size`.
    Scale policies see each query's own number of visible keys as n (SSMax under a causal mask
    uses n = t + 1). A query with no visible key gets output 0 and zero gradients.

    Args:
      normalizer: a name from `attnlab.normalizers.NAMES`, a `Normalizer` (`normalizers.get(...)`),
        or any callable f(logits, *, axis, where) (dense and chunked paths only). Normalizer
        parameters must broadcast against [B, N, 1, 1], e.g. one per head as [N, 1, 1].
      implementation: "dense" builds the [B, N, T, S] logits once (the reference); "chunked" never
        does. There, softmax-type normalizers take `query_block` queries (default 512) at a time
        through an online pass over the `key_block`-sized key blocks they can see (causal and
        window rules skip the rest), with a recomputing backward; the entmax family with one alpha
        in (1, 2] takes query blocks (default: about 2^20 logits each) with whole rows cut to the
        keys they can see, exact thresholds seeded from 128-key chunk maxima, and a closed-form
        backward (attention.sparse_blocked); any other normalizer takes query blocks (about 2^24
        logits) through the normalizer itself, rematerialised in the backward. "cudnn" routes
        softmax-type normalizers to `jax.nn.dot_product_attention(implementation="cudnn")` with
        the row factor folded into the queries (GPU only). "pallas" runs the entmax family (one
        alpha in (1, 2]) as a Pallas kernel that skips key blocks with no weight (meant for GPU,
        interpreted elsewhere, slowly; causal and key lengths only; see attention.pallas_sparse).
        None picks dense for small inputs, cuDNN on GPU for softmax-type normalizers, chunked
        otherwise.
      statistics: also return per-query statistics [B, N, T] reduced inside the computation:
        max_weight, entropy, support_size (exact non-zeros) and, with `mass_keys` (bool,
        broadcasting against [B, S]), key_mass = the weight on those keys. Not differentiated.
      return_weights: also return the weights [B, N, T, S] (dense; for small inputs and plots).

    Returns:
      out [B, T, N, H] in the dtype of `query`; with `statistics` or `return_weights`, the pair
      (out, aux) where aux holds the requested arrays.
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    B, T, N, H, S, K = _check_shapes(query, key, value)
    G = N // K
    normalizer = resolve_normalizer(normalizer)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = visible); got dtype {jnp.asarray(mask).dtype}")
    if mass_keys is not None:
        mass_keys = jnp.asarray(mass_keys, bool)
        mass_keys = mass_keys.reshape((1,) * (2 - mass_keys.ndim) + mass_keys.shape)[:, None, None, None, :]
    want_stats = statistics or mass_keys is not None
    choice = _pick_implementation(implementation, normalizer, B * N * T * S, return_weights, query.dtype)

    visibility = Visibility(
        num_queries=T,
        num_keys=S,
        is_causal=is_causal,
        local_window=tuple(local_window_size) if local_window_size is not None else None,
        query_lengths=None if query_seq_lengths is None else jnp.asarray(query_seq_lengths, jnp.int32),
        key_lengths=None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths, jnp.int32),
        mask=to_grouped(mask, K, G, "mask"),
    )
    bias = to_grouped(bias, K, G, "bias")
    q = _group_queries(query, K, G)
    k = jnp.moveaxis(key, 1, 2)
    v = jnp.moveaxis(value, 1, 2)

    aux: dict[str, jax.Array] = {}
    if choice == "dense":
        out, aux = dense_attention(
            q * scale, k, v, bias, visibility, normalizer,
            want_stats=want_stats, mass_keys=mass_keys, want_weights=return_weights,
        )  # fmt: skip
    elif choice == "chunked" and _online_mapping(normalizer) is None and static_entmax_alpha(normalizer) is None:
        block = query_block or max(1, QUERY_BLOCK_ELEMENTS // max(1, B * N * S))
        out, aux = query_blocked_attention(
            q * scale, k, v, bias, visibility, normalizer,
            query_block=block, want_stats=want_stats, mass_keys=mass_keys,
        )  # fmt: skip
    else:
        # Scale policies (a temperature, SSMax's s log n) multiply each query's logits by one
        # factor: fold it into the query and the bias, and the mapping sees plain logits.
        factor = scale
        if normalizer.scale is not None:
            row = _row_factor(normalizer, visibility, B, N, T, S, K)
            factor = scale * row
            bias = None if bias is None else bias * row
        q_folded = (q * factor).astype(query.dtype)
        if return_weights:
            raise ValueError("return_weights needs implementation='dense' (or None)")
        mapping = _online_mapping(normalizer)
        if mapping == "sigmoid":
            # sigmoid(z + b): its per-query bias b (-log n by default) joins the attention bias.
            b = _sigmoid_bias(normalizer, visibility, B, N, T, S, K)
            bias = b if bias is None else bias + b
        if choice == "chunked" and mapping is None:
            block = query_block or max(SPARSE_MIN_QUERY_BLOCK, SPARSE_QUERY_BLOCK_ELEMENTS // max(1, B * N * S))
            out, aux = sparse_blocked_attention(
                q_folded, k, v, bias, visibility, static_entmax_alpha(normalizer),
                query_block=block, want_stats=want_stats, mass_keys=mass_keys,
            )  # fmt: skip
        elif choice == "pallas":
            out = _pallas(q_folded, key, value, bias, visibility, static_entmax_alpha(normalizer), want_stats)
        elif choice == "cudnn":
            if want_stats:
                raise ValueError("statistics are not available from the cuDNN kernel; use implementation='chunked'")
            out = _cudnn(q_folded, k, v, bias, visibility)
        else:
            softmax_query_block = query_block or DEFAULT_SOFTMAX_QUERY_BLOCK
            out, lse = online_softmax_attention(
                q_folded, k, v, bias, visibility,
                key_block=key_block, query_block=softmax_query_block, mapping=mapping,
            )  # fmt: skip
            if want_stats:
                aux = softmax_statistics(
                    q_folded, k, bias, visibility, lse, mass_keys,
                    key_block=key_block, query_block=softmax_query_block, mapping=mapping,
                )  # fmt: skip
    out = _ungroup(out).astype(query.dtype)
    if not (want_stats or return_weights):
        return out
    aux = {name: value.reshape(value.shape[0], N, *value.shape[3:]) for name, value in aux.items()}
    return out, aux


def _group_queries(query: jax.Array, K: int, G: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]."""
    B, T, _, H = query.shape
    return jnp.moveaxis(query.reshape(B, T, K, G, H), 1, 3)


def _ungroup(out: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H]."""
    B, K, G, T, H = out.shape
    return jnp.moveaxis(out, 3, 1).reshape(B, T, K * G, H)


def _pallas(q, key, value, bias, visibility: Visibility, alpha: float, want_stats: bool) -> jax.Array:
    """The Pallas entmax-family kernel (attention.pallas_sparse): causal and key lengths only."""
    unsupported = {
        "bias": bias is not None,
        "mask": visibility.mask is not None,
        "local_window_size": visibility.local_window is not None,
        "query_seq_lengths": visibility.query_lengths is not None,
        "statistics": want_stats,
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, given in unsupported.items() if given)
        raise ValueError(
            f"implementation='pallas' does not support {names} yet; it takes is_causal and "
            "key_value_seq_lengths only (use implementation='chunked')"
        )
    from attnlab.attention.pallas_sparse import pallas_sparse_attention  # imports Pallas only when used

    _, K, G, _, _ = q.shape
    out = pallas_sparse_attention(
        _ungroup(q), key, value, alpha=alpha, is_causal=visibility.is_causal, key_lengths=visibility.key_lengths
    )
    return _group_queries(out, K, G)


def _cudnn(q, k, v, bias, visibility: Visibility) -> jax.Array:
    _, K, G, T, _ = q.shape
    query = _ungroup(q)
    mask = (
        None
        if visibility.mask is None
        else jnp.broadcast_to(visibility.mask, (*visibility.mask.shape[:3], T, k.shape[2]))
    )
    flat = lambda x: None if x is None else x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])  # noqa: E731
    out = jax.nn.dot_product_attention(
        query,
        jnp.moveaxis(k, 1, 2),
        jnp.moveaxis(v, 1, 2),
        bias=flat(bias),
        mask=flat(mask),
        scale=1.0,
        is_causal=visibility.is_causal,
        query_seq_lengths=visibility.query_lengths,
        key_value_seq_lengths=visibility.key_lengths,
        local_window_size=visibility.local_window,
        implementation="cudnn",
    )
    return _group_queries(out, K, G)
