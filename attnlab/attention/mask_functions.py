"""Masks and scores as functions of positions (FlexAttention's mask_mod and score_mod, in JAX).

    mask_fn(b, h, q_idx, kv_idx) -> bool                  True: query q_idx sees key kv_idx
    score_fn(score, b, h, q_idx, kv_idx) -> score          the logit of that pair, modified

`dot_product_attention(..., mask_fn=..., score_fn=...)` evaluates them one block of (query, key)
pairs at a time inside every memory-efficient backend, never as a T x S array (the dense backend
builds its T x S logits anyway). They are called on broadcasting index arrays, not scalars:

    b [B, 1, 1, 1, 1]   h [1, K, G, 1, 1] (query head n = k G + g)   q_idx [1, 1, 1, Tq, 1]
    kv_idx [1, 1, 1, 1, Sk]   score [B, K, G, Tq, Sk] (float32)

so write them with jnp operations (`kv_idx <= q_idx`, `jnp.where`, `table[h, kv_idx - q_idx]`);
each returns an array that broadcasts against [B, K, G, Tq, Sk] (a mask that ignores b and h stays
[1, 1, 1, Tq, Sk]). Positions are 0-based within the call (key s of S, query t of T); indices past
the ends (block padding) may reach them, clip before indexing with them (the padded pairs are
hidden whatever the function says). Arrays the functions close over may be traced, and a
score_fn's float arrays get gradients (ALiBi slopes, a relative-position table): the blocked
backends carry them through their custom backward passes.

The mask function joins the call's other rules (is_causal, window, lengths, an explicit mask):
a key is visible when all of them say so. Scores: logits = score_fn(scale q.k + bias), then the
normalizer, with its scale policy (SSMax's s log n ...) applied to score_fn's output.

`block_map` says, per (query block, key block) pair, whether any of its pairs is visible (with
the structured rules), once per call: the online backend visits only those key blocks
(FlexAttention's BlockMask), so document masking with 8 packed documents visits about 1/8 of the
blocks of a full call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp

from attnlab.attention.masks import Visibility

MaskFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

__all__ = [
    "BlockMap",
    "alibi",
    "alibi_slopes",
    "and_masks",
    "block_map",
    "causal_mask",
    "compose_scores",
    "document_mask",
    "or_masks",
    "prefix_lm_mask",
    "relative_position_bias",
    "sliding_window_mask",
    "soft_cap",
]


# ---------------------------------------------------------------------------------------------- masks


def causal_mask() -> MaskFn:
    """kv_idx <= q_idx (as is_causal=True)."""
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx


def sliding_window_mask(left: int, right: int = 0) -> MaskFn:
    """q_idx - left <= kv_idx <= q_idx + right (as local_window_size=(left, right))."""
    for name, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sliding_window_mask: {name} must be an int >= 0; got {value!r}")
    return lambda b, h, q_idx, kv_idx: (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)


def prefix_lm_mask(prefix_length: int | jax.Array) -> MaskFn:
    """Prefix-LM: every query sees the first `prefix_length` keys (bidirectional prefix) and the keys
    up to itself (causal after it). `prefix_length` is an int or ints [B], one per batch row."""
    prefix = jnp.asarray(prefix_length)
    if not jnp.issubdtype(prefix.dtype, jnp.integer) or prefix.ndim > 1:
        raise ValueError(
            f"prefix_lm_mask: prefix_length must be an int or ints [B]; got {prefix.dtype} of shape {prefix.shape}"
        )

    def mask_fn(b, h, q_idx, kv_idx):
        length = prefix if prefix.ndim == 0 else prefix[jnp.clip(b, 0, prefix.shape[0] - 1)]
        return (kv_idx <= q_idx) | (kv_idx < length)

    return mask_fn


def document_mask(segment_ids: jax.Array, key_segment_ids: jax.Array | None = None) -> MaskFn:
    """Packed sequences: query t sees key s only within its document,
    segment_ids[b, t] == key_segment_ids[b, s] (default: the same ids, self-attention).

    segment_ids [B, T] and key_segment_ids [B, S] are ints (any values; padding can take an id of
    its own, or be hidden with key_value_seq_lengths). Combine with causal_mask() (and_masks) or
    is_causal=True for causal document attention.
    """
    query_ids = jnp.asarray(segment_ids)
    key_ids = query_ids if key_segment_ids is None else jnp.asarray(key_segment_ids)
    for name, ids in (("segment_ids", query_ids), ("key_segment_ids", key_ids)):
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"document_mask: {name} must be ints [B, length]; got {ids.dtype} of shape {ids.shape}")
    if query_ids.shape[0] != key_ids.shape[0]:
        raise ValueError(
            f"document_mask: segment_ids {query_ids.shape} and key_segment_ids {key_ids.shape} differ in batch"
        )

    def mask_fn(b, h, q_idx, kv_idx):
        b = jnp.clip(b, 0, query_ids.shape[0] - 1)
        return (
            query_ids[b, jnp.clip(q_idx, 0, query_ids.shape[1] - 1)]
            == key_ids[b, jnp.clip(kv_idx, 0, key_ids.shape[1] - 1)]
        )

    return mask_fn


def and_masks(*mask_fns: MaskFn) -> MaskFn:
    """Visible where every mask function says visible."""
    return lambda b, h, q_idx, kv_idx: _reduce(jnp.logical_and, [f(b, h, q_idx, kv_idx) for f in mask_fns])


def or_masks(*mask_fns: MaskFn) -> MaskFn:
    """Visible where any mask function says visible."""
    return lambda b, h, q_idx, kv_idx: _reduce(jnp.logical_or, [f(b, h, q_idx, kv_idx) for f in mask_fns])


def _reduce(op: Callable, values: Sequence[jax.Array]) -> jax.Array:
    if not values:
        raise ValueError("and_masks / or_masks need at least one mask function")
    result = values[0]
    for value in values[1:]:
        result = op(result, value)
    return result


# ---------------------------------------------------------------------------------------------- scores


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi's head slopes [N] (Press et al. 2022): 2^(-8 i / N) for i = 1..N when N is a power of 2;
    otherwise those of the next lower power of 2, then every other one of the next higher (their code)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int; got {num_heads!r}")

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower)
    if lower < num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    return jnp.asarray(slopes, jnp.float32)


def alibi(slopes: jax.Array) -> ScoreFn:
    """ALiBi: score + slope[h] * (kv_idx - q_idx), a linear penalty on distance (for causal attention,
    kv_idx <= q_idx). slopes [N], one per query head: fixed (`alibi_slopes(N)`) or learned (they get
    gradients)."""
    slopes = jnp.asarray(slopes)
    if slopes.ndim != 1:
        raise ValueError(f"alibi: slopes must be [num_heads]; got shape {slopes.shape}")

    def score_fn(score, b, h, q_idx, kv_idx):
        return score + slopes[h].astype(score.dtype) * (kv_idx - q_idx).astype(score.dtype)

    return score_fn


def soft_cap(cap: float) -> ScoreFn:
    """Logit soft-capping (Gemma 2): cap * tanh(score / cap)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"soft_cap: cap must be a number > 0; got {cap!r}")
    return lambda score, b, h, q_idx, kv_idx: cap * jnp.tanh(score / cap)


def relative_position_bias(table: jax.Array, max_distance: int) -> ScoreFn:
    """score + table[h, clip(kv_idx - q_idx, -D, D) + D]: a learned bias per head and relative
    position (T5-style, without buckets), table [N, 2 D + 1], D = max_distance."""
    table = jnp.asarray(table)
    if table.ndim != 2 or table.shape[1] != 2 * max_distance + 1:
        raise ValueError(
            f"relative_position_bias: table must be [num_heads, 2 * max_distance + 1] = [N, {2 * max_distance + 1}]; "
            f"got shape {table.shape}"
        )

    def score_fn(score, b, h, q_idx, kv_idx):
        offset = jnp.clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance
        return score + table[h, offset].astype(score.dtype)

    return score_fn


def compose_scores(*score_fns: ScoreFn) -> ScoreFn:
    """The score functions applied in order: f_n(... f_1(score) ...)."""
    if not score_fns:
        raise ValueError("compose_scores needs at least one score function")

    def score_fn(score, b, h, q_idx, kv_idx):
        for f in score_fns:
            score = f(score, b, h, q_idx, kv_idx)
        return score

    return score_fn


# ---------------------------------------------------------------------------------------------- block map


class BlockMap(NamedTuple):
    """Which key blocks each query block visits.

    visible [num_query_blocks, num_key_blocks] bool: some (query, key) pair of the block is visible
    for some batch row and head; count [num_query_blocks] int32: how many; indices
    [num_query_blocks, num_key_blocks] int32: those key blocks first, in increasing order.
    """

    visible: jax.Array
    count: jax.Array
    indices: jax.Array


def block_map(visibility: Visibility, query_block: int, key_block: int) -> BlockMap:
    """The BlockMap of `visibility`'s structured rules and mask function (not its explicit mask),
    evaluated one (query block, key block) pair at a time."""
    num_q = math.ceil(visibility.num_queries / query_block)
    num_k = math.ceil(visibility.num_keys / key_block)

    def pair(i, j):
        visible = visibility.rules(i * query_block + jnp.arange(query_block), j * key_block + jnp.arange(key_block))
        return jnp.any(visible)

    visible = jax.lax.map(lambda i: jax.lax.map(lambda j: pair(i, j), jnp.arange(num_k)), jnp.arange(num_q))
    order = jnp.argsort(~visible, axis=1, stable=True).astype(jnp.int32)
    return BlockMap(visible, jnp.sum(visible, axis=1, dtype=jnp.int32), order)


# ---------------------------------------------------------------------------------------------- inside custom passes


class Converted(NamedTuple):
    """A mask or score function with every array it closes over made an explicit argument, for the
    custom-gradient passes: call(*args, *consts). Traced arrays (a jit argument, a learned table)
    must not be closed over inside those passes; as arguments, the float ones get cotangents."""

    call: Callable
    consts: tuple[Any, ...]


def convert(fn: Callable | None, *example_args: Any) -> Converted | None:
    """`fn` traced for arguments shaped like `example_args` (the shapes it is then called at), its
    closed-over arrays, traced or not, hoisted into `consts` (jax.closure_convert hoists only those
    that may carry a tangent, leaving traced integers such as segment ids closed over)."""
    if fn is None:
        return None
    closed = jax.make_jaxpr(fn)(*example_args)
    jaxpr, num_args = closed.jaxpr, len(example_args)

    def call(*args_and_consts):
        args, consts = args_and_consts[:num_args], args_and_consts[num_args:]
        (out,) = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, list(consts)))(*args)
        return out

    return Converted(call, tuple(closed.consts))


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def zero_cotangents(consts: tuple) -> tuple:
    """float32 zeros for a score function's float arrays, None for the others (they get no gradient)."""
    return tuple(jnp.zeros(jnp.shape(c), jnp.float32) if _is_float(c) else None for c in consts)


def add_cotangents(total: tuple, update: tuple) -> tuple:
    """total + update on the float arrays (the accumulation of `zero_cotangents` over blocks)."""
    return tuple(None if t is None else t + u.astype(jnp.float32) for t, u in zip(total, update, strict=True))


def cast_cotangents(total: tuple, consts: tuple) -> tuple:
    """The accumulated cotangents in the dtypes of the arrays they belong to (None stays None)."""
    return tuple(None if t is None else t.astype(jnp.result_type(c)) for t, c in zip(total, consts, strict=True))
