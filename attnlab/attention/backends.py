"""Attention backends as a table: each algorithm is one `Backend`, with one call signature and a
`supports(normalizer, options)` that returns None or the reason it cannot serve the call.

    name            algorithm                                          serves
    dense           the [B, N, T, S] logits once; the reference        every normalizer; weights; residual*
    cudnn           jax.nn.dot_product_attention(implementation=       SOFTMAX family without a sink, float16 or
                    "cudnn")                                           bfloat16, on GPU; no statistics
    online          query blocks, each an online pass over the key     SOFTMAX family (any sink: a concrete one in
                    blocks it can see (attention.online_softmax)       the pass, a traced one after it), THRESHOLD
                                                                       at alpha = 1, ELEMENTWISE; residual*
    blocked_entmax  query blocks, exact thresholds, closed-form        THRESHOLD with one concrete alpha in (1, 2]
                    backward (attention.sparse_blocked)
    query_blocked   query blocks, whole rows through the normalizer    any normalizer (callables included)
                    (causal: cut to the keys a group of blocks sees;
                    attention.query_blocked)
    pallas          Pallas kernels (GPU, else interpreted):            THRESHOLD with one concrete alpha in (1, 2]
                    entmax skipping weightless key blocks              (pallas_sparse); SOFTMAX with no sink or a
                    (attention.pallas_sparse); flash attention with    sink per head, residual*; ELEMENTWISE
                    a sink or sigmoid (attention.pallas_online)        (pallas_online); is_causal, key lengths only

    * return_residual (jax.nn's log-sum-exp) exists for the SOFTMAX family only.

mask_fn and score_fn (attention.mask_functions) run on dense, online (which visits only the key
blocks the mask function leaves: attention.mask_functions.block_map), blocked_entmax and
query_blocked; cuDNN and Pallas say they take neither.

Every backend but dense and pallas returns statistics; only dense returns the weights. Families are
read from the normalizer's description (attention.families), never from its class or name.

`implementation=None` takes the first backend of AUTOMATIC that serves the call: dense when the
weights are wanted or the call is small (at most DENSE_MAX_ELEMENTS logits), cuDNN on GPU for
half-precision softmax, a Pallas kernel on GPU once it has passed its backend check there
(VERIFIED_ON_GPU; none has yet), else the memory-efficient backend of the normalizer's family
(online, blocked_entmax, query_blocked). Names users pass are the backends' and two more: "xla" is dense
(jax.nn's name for it) and "chunked" is the first of online, blocked_entmax, query_blocked that
serves the call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attnlab.attention import families
from attnlab.attention.dense import dense_attention
from attnlab.attention.masks import Visibility, group_queries, ungroup_queries
from attnlab.attention.online_softmax import DEFAULT_QUERY_BLOCK, online_softmax_attention, softmax_statistics
from attnlab.attention.query_blocked import query_blocked_attention
from attnlab.attention.sparse_blocked import sparse_blocked_attention
from attnlab.normalizers import SOFTMAX, Normalizer
from attnlab.normalizers._rows import align_param
from attnlab.normalizers.recent import default_sigmoid_bias

# Below this many logits per call (B * N * T * S), implementation=None takes dense: it is faster there
# and its memory is no concern.
DENSE_MAX_ELEMENTS = 1 << 22
HALF_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Options:
    """What one call asks for: all a backend looks at, besides the normalizer, to say whether it serves it.

    Shapes are those of the call (query [batch, queries, heads, head_dim], key/value [batch, keys,
    kv_heads, head_dim]); `dtype` is the query's (after integer inputs are promoted); `platform` is
    `jax.default_backend()`; the flags say which optional inputs are given and outputs wanted.
    """

    batch: int
    queries: int
    keys: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    platform: str = "cpu"
    bias: bool = False
    mask: bool = False
    is_causal: bool = False
    local_window: tuple[int, int] | None = None
    query_lengths: bool = False
    key_lengths: bool = False
    statistics: bool = False
    mass_keys: bool = False
    weights: bool = False
    residual: bool = False
    mask_fn: bool = False
    score_fn: bool = False

    @property
    def elements(self) -> int:
        """The number of logits, B * N * T * S."""
        return self.batch * self.heads * self.queries * self.keys


class Call(NamedTuple):
    """The operands of one call, in the grouped layout of attention.masks.

    q [B, K, G, T, H] (not yet scaled), k and v [B, K, S, H], bias [B|1, K|1, G|1, T|1, S|1] or None,
    mass_keys [B|1, 1, 1, 1, S] bool or None; `scale` multiplies the logits; key_block and
    query_block (None: the backend's default) size the blocks of the memory-efficient backends;
    score_fn maps the logits (attention.mask_functions; the mask function is in `visibility`).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    visibility: Visibility
    scale: float
    key_block: int
    query_block: int | None
    mass_keys: jax.Array | None
    score_fn: Callable | None = None


class Result(NamedTuple):
    """out [B, K, G, T, H] (float32); aux: the statistics asked for ([B, K, G, T]) and the weights
    ([B, K, G, T, S], dense only); residual: the log-sum-exp [B, K, G, T] when asked for, else None."""

    out: jax.Array
    aux: dict[str, jax.Array]
    residual: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One attention algorithm.

    Fields:
      name: what `implementation=` calls it.
      summary: one line, for documentation and `attnlab list`.
      supports: (normalizer, options) -> None if it can serve the call, else the reason it cannot.
      run: (normalizer, call, options) -> Result; called only when `supports` returned None.
      automatic: (normalizer, options) -> None, or why implementation=None passes it over although
        it could serve the call (dense: the call is large; pallas: off GPU, or not verified there).
    """

    name: str
    summary: str
    supports: Callable[[Callable, Options], str | None]
    run: Callable[[Callable, Call, Options], Result]
    automatic: Callable[[Callable, Options], str | None] = lambda normalizer, options: None


# ---------------------------------------------------------------------------------------------- reasons

FUNCTIONS = (
    "{backend} takes no mask_fn or score_fn (they run on the dense, online, blocked_entmax and "
    "query_blocked backends; implementation='chunked' picks the memory-efficient one)"
)
WEIGHTS = "return_weights needs implementation='dense' (or None): only the dense backend holds the weights"


def _residual(normalizer: Callable) -> str:
    return (
        "return_residual is the log-sum-exp of softmax-type weights (family 'softmax'); "
        f"{families.describe_family(normalizer)} has none"
    )


def _first(*checks: tuple[bool, Callable[[], str]]) -> str | None:
    """The reason of the first failed check (condition True), else None."""
    return next((reason() for failed, reason in checks if failed), None)


# ---------------------------------------------------------------------------------------------- shared steps


def _shape(call: Call) -> tuple[int, int, int, int, int, int]:
    """B, N, T, S, K, G of the call."""
    B, K, G, T, _ = call.q.shape
    return B, K * G, T, call.k.shape[2], K, G


def _per_query(value_of: Callable, call: Call) -> jax.Array:
    """value_of(counts [B|1, N, T, 1], align) per (batch, head, query), grouped [B|1, K, G, T, 1]:
    counts are each query's visible keys (n); align(value, name) shapes a normalizer parameter
    like the [B, N, T, S] logits with the key axis kept as 1."""
    B, N, T, S, K, G = _shape(call)
    counts = call.visibility.visible_counts()
    counts = jnp.broadcast_to(counts, (counts.shape[0], K, G, T, 1)).reshape(counts.shape[0], N, T, 1)

    def align(value, name):
        return align_param(value, name, (B, N, T, S), 3)

    value = value_of(counts, align)
    value = jnp.broadcast_to(value, jnp.broadcast_shapes(value.shape, counts.shape))
    return value.reshape(value.shape[0], K, G, T, 1)


def _row_factor(normalizer: Callable, call: Call) -> jax.Array | None:
    """The scale policy's factor per query [B|1, K, G, T, 1] (it multiplies the row's logits), or None."""
    if isinstance(normalizer, Normalizer) and normalizer.scale is not None:
        return _per_query(normalizer.scale.factor, call)
    return None


def _folded(normalizer: Callable, call: Call) -> tuple[jax.Array, jax.Array | None]:
    """The scaled queries and the bias with the scale policy's factor folded in (it multiplies each
    query's logits by one number), so that the mapping sees plain logits. With a score function the
    factor must follow it: it is left out here (see _score_then_rows)."""
    factor, bias = call.scale, call.bias
    row = None if call.score_fn is not None else _row_factor(normalizer, call)
    if row is not None:
        factor = call.scale * row
        bias = None if bias is None else bias * row
    return (call.q * factor).astype(call.q.dtype), bias


def _rows_at(x: jax.Array, b: jax.Array, h: jax.Array, q_idx: jax.Array) -> jax.Array:
    """x [B|1, K, G, T, 1] (one value per batch row, query head and query) at the index arrays of a
    score function: [B|1, K, G, Tq, 1]."""
    flat = x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    return flat[jnp.clip(b, 0, flat.shape[0] - 1), h, jnp.clip(q_idx, 0, flat.shape[2] - 1)]


def _score_then_rows(call: Call, factor: jax.Array | None, shift: jax.Array | None) -> Callable | None:
    """The call's score function followed by z -> factor z + shift, per query ([B|1, K, G, T, 1] or
    None): the scale policy (and a sigmoid's bias) act on the score function's output, as in the
    dense reference."""
    score_fn = call.score_fn
    if score_fn is None or (factor is None and shift is None):
        return score_fn

    def with_rows(score, b, h, q_idx, kv_idx):
        z = score_fn(score, b, h, q_idx, kv_idx)
        if factor is not None:
            z = z * _rows_at(factor, b, h, q_idx)
        if shift is not None:
            z = z + _rows_at(shift, b, h, q_idx)
        return z

    return with_rows


def _elementwise_bias(normalizer: Normalizer, call: Call) -> jax.Array:
    """b in sigmoid(z + b) per (batch, head, query), grouped [B|1, K, G, T, 1]: the mapping's `bias`,
    or -log n (n = the query's visible keys, at least 1) when it has none."""
    given = normalizer.mapping.bias

    def value_of(counts, align):
        if given is None:
            return default_sigmoid_bias(counts.astype(jnp.float32))
        return align(given, "bias").astype(jnp.float32)

    return _per_query(value_of, call)


# ---------------------------------------------------------------------------------------------- dense


def _dense_supports(normalizer: Callable, options: Options) -> str | None:
    return _first((options.residual and families.family(normalizer) != SOFTMAX, lambda: _residual(normalizer)))


def _dense_automatic(normalizer: Callable, options: Options) -> str | None:
    if options.weights or options.elements <= DENSE_MAX_ELEMENTS:
        return None
    return f"{options.elements} logits > DENSE_MAX_ELEMENTS = {DENSE_MAX_ELEMENTS}: a memory-efficient backend takes it"


def _dense_run(normalizer: Callable, call: Call, options: Options) -> Result:
    out, aux, residual = dense_attention(
        call.q * call.scale, call.k, call.v, call.bias, call.visibility, normalizer,
        want_stats=options.statistics, mass_keys=call.mass_keys, want_weights=options.weights,
        want_residual=options.residual, score_fn=call.score_fn,
    )  # fmt: skip
    return Result(out, aux, residual)


# ---------------------------------------------------------------------------------------------- online


def _online_supports(normalizer: Callable, options: Options) -> str | None:
    kind = families.online_kind(normalizer)
    return _first(
        (
            kind is None,
            lambda: (
                "the online pass runs the 'softmax' family (with or without a sink), alpha-entmax "
                f"at a concrete alpha = 1 and the 'elementwise' family; {families.describe_family(normalizer)} is "
                "none of them"
            ),
        ),
        (options.weights, lambda: WEIGHTS),
        (options.residual and families.family(normalizer) != SOFTMAX, lambda: _residual(normalizer)),
    )


def _online_run(normalizer: Callable, call: Call, options: Options) -> Result:
    kind, sink = families.online_kind(normalizer)
    q, bias = _folded(normalizer, call)
    shift = None
    if kind == "elementwise":
        # sigmoid(z + b): its per-query b (-log n by default) joins the attention bias (or follows
        # the score function).
        b = _elementwise_bias(normalizer, call)
        if call.score_fn is not None:
            shift = b
        else:
            bias = b if bias is None else bias + b
    score_fn = _score_then_rows(call, _row_factor(normalizer, call) if call.score_fn is not None else None, shift)
    if sink is not None and not isinstance(sink, float):
        # A traced or per-head sink, one value per (batch, head, query): applied after the pass.
        sink = _per_query(lambda counts, align: align(normalizer.mapping.sink, "sink").astype(jnp.float32), call)
        sink = sink[..., 0]
    blocks = {"key_block": call.key_block, "query_block": call.query_block or DEFAULT_QUERY_BLOCK}
    out, rows = online_softmax_attention(
        q, call.k, call.v, bias, call.visibility, kind=kind, sink=sink, score_fn=score_fn, **blocks
    )
    aux = {}
    if options.statistics:
        # The rows carry the sink either way; the second pass needs only them.
        concrete = sink if isinstance(sink, float) else None
        aux = softmax_statistics(
            q, call.k, bias, call.visibility, rows, call.mass_keys, kind=kind, sink=concrete, score_fn=score_fn,
            **blocks,
        )  # fmt: skip
    return Result(out, aux, rows.lse if options.residual else None)


# ---------------------------------------------------------------------------------------------- blocked entmax


def _blocked_entmax_supports(normalizer: Callable, options: Options) -> str | None:
    return _first(
        (
            families.static_entmax_alpha(normalizer) is None,
            lambda: (
                "the blocked entmax path runs the 'threshold' family with one concrete alpha in (1, 2] "
                f"(not traced, not one per head); {families.describe_family(normalizer)} is not such a one"
            ),
        ),
        (options.weights, lambda: WEIGHTS),
        (options.residual, lambda: _residual(normalizer)),
    )


def _blocked_entmax_run(normalizer: Callable, call: Call, options: Options) -> Result:
    q, bias = _folded(normalizer, call)
    score_fn = _score_then_rows(call, _row_factor(normalizer, call) if call.score_fn is not None else None, None)
    out, aux = sparse_blocked_attention(
        q, call.k, call.v, bias, call.visibility, families.static_entmax_alpha(normalizer),
        query_block=call.query_block or None, want_stats=options.statistics, mass_keys=call.mass_keys,
        score_fn=score_fn, split_heads=options.platform == "cpu",  # see sparse_blocked_attention
    )  # fmt: skip
    return Result(out, aux)


# ---------------------------------------------------------------------------------------------- query blocked


def _query_blocked_supports(normalizer: Callable, options: Options) -> str | None:
    return _first((options.weights, lambda: WEIGHTS), (options.residual, lambda: _residual(normalizer)))


def _query_blocked_run(normalizer: Callable, call: Call, options: Options) -> Result:
    out, aux = query_blocked_attention(
        call.q * call.scale, call.k, call.v, call.bias, call.visibility, normalizer,
        query_block=call.query_block or None,
        want_stats=options.statistics, mass_keys=call.mass_keys, score_fn=call.score_fn,
    )  # fmt: skip
    return Result(out, aux)


# ---------------------------------------------------------------------------------------------- cuDNN


def _cudnn_supports(normalizer: Callable, options: Options) -> str | None:
    softmax = families.family(normalizer) == SOFTMAX and getattr(normalizer.mapping, "sink", None) is None
    window = options.local_window
    return _first(
        (
            not softmax,
            lambda: (
                "cuDNN attention takes softmax-type normalizers only (family 'softmax' without a sink: "
                f"softmax, scaled_softmax, ssmax); got {families.describe_family(normalizer)}"
            ),
        ),
        (
            options.platform != "gpu",
            lambda: f"cuDNN attention needs a GPU; the default backend is {options.platform!r}",
        ),
        (
            jnp.dtype(options.dtype) not in HALF_PRECISION,
            lambda: f"cuDNN attention takes float16 or bfloat16 inputs; got {jnp.dtype(options.dtype)}",
        ),
        (
            options.statistics,
            lambda: "statistics are not available from the cuDNN kernel; use implementation='chunked'",
        ),
        (options.weights, lambda: WEIGHTS),
        (
            window is not None and window[1] != 0 and not options.is_causal,
            lambda: f"cuDNN attention takes no right window ({window[1]}) without is_causal",
        ),
        (options.mask_fn or options.score_fn, lambda: FUNCTIONS.format(backend="cuDNN attention")),
    )


def _cudnn_run(normalizer: Callable, call: Call, options: Options) -> Result:
    q, bias = _folded(normalizer, call)
    _, K, G, T, _ = q.shape
    visibility = call.visibility
    mask = visibility.mask
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:3], T, call.k.shape[2]))
    flat = lambda x: None if x is None else x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])  # noqa: E731
    result = jax.nn.dot_product_attention(
        ungroup_queries(q),
        jnp.moveaxis(call.k, 1, 2),
        jnp.moveaxis(call.v, 1, 2),
        bias=flat(bias),
        mask=flat(mask),
        scale=1.0,
        is_causal=visibility.is_causal,
        query_seq_lengths=visibility.query_lengths,
        key_value_seq_lengths=visibility.key_lengths,
        local_window_size=visibility.local_window,
        implementation="cudnn",
        return_residual=options.residual,
    )
    out, residual = result if options.residual else (result, None)
    if residual is not None:  # [B, T, N] -> [B, K, G, T]
        residual = jnp.moveaxis(residual, 1, 2).reshape(residual.shape[0], K, G, T).astype(jnp.float32)
    return Result(group_queries(out, K).astype(jnp.float32), {}, residual)


# ---------------------------------------------------------------------------------------------- Pallas


def _padded_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a normalizer parameter padded to the 4 axes of [B, N, T, S] (None: more axes)."""
    shape = jnp.shape(value)
    return None if len(shape) > 4 else (1,) * (4 - len(shape)) + shape


def per_head_sink(sink: Any) -> bool:
    """Whether a sink is one logit per head at most (a number, [N, 1, 1], [1, N, 1, 1], ...): the
    Pallas kernel takes a sink [N]; one per batch row or query it does not."""
    shape = _padded_shape(sink)
    return shape is not None and shape[0] == shape[2] == shape[3] == 1


def pallas_kernel(normalizer: Callable) -> str | None:
    """Which Pallas kernel runs `normalizer`: "entmax" (attention.pallas_sparse: the THRESHOLD family
    with one concrete alpha in (1, 2]), "softmax" (attention.pallas_online: the SOFTMAX family with no
    sink, or a sink per head at most, concrete or traced: a learned one gets its gradient from the
    kernel), "elementwise" (attention.pallas_online: the ELEMENTWISE family), or None."""
    if families.static_entmax_alpha(normalizer) is not None:
        return "entmax"
    kind = families.online_kind(normalizer)
    if kind is None or (kind[0] == "softmax" and families.family(normalizer) != SOFTMAX):
        return None  # alpha-entmax at alpha near 1 is softmax, which cuDNN and the online pass run
    if kind[1] is not None and not isinstance(kind[1], float) and not per_head_sink(normalizer.mapping.sink):
        return None  # a sink per batch row or query: the online pass applies it
    return kind[0]


VERIFIED_ON_GPU: frozenset[str] = frozenset()
"""The Pallas kernels ("entmax", "softmax", "elementwise") that `implementation=None` may pick on a GPU:
those whose backend check (benchmarks/gpu.sh, experiments/backend_check_gpu.toml) passed on a GPU. Empty
until a device run has passed: until then a GPU call takes cuDNN or the XLA paths, and the kernels run
only when named (implementation="pallas")."""


def _pallas_supports(normalizer: Callable, options: Options) -> str | None:
    kernel = pallas_kernel(normalizer)
    unsupported = {
        "bias": options.bias,
        "mask": options.mask,
        "local_window_size": options.local_window is not None,
        "query_seq_lengths": options.query_lengths,
        "statistics": options.statistics,
        "return_weights": options.weights,
        "return_residual": options.residual and kernel != "softmax",
        "mask_fn": options.mask_fn,
        "score_fn": options.score_fn,
    }
    names = ", ".join(name for name, given in unsupported.items() if given)
    accepted = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    return _first(
        (
            kernel is None,
            lambda: (
                "the Pallas kernels run the 'threshold' family with one alpha in (1, 2] (sparsemax, entmax15, "
                "entmax(alpha), their logn_ versions), the 'softmax' family with no sink or a sink per head "
                f"at most, and the 'elementwise' family; got {families.describe_family(normalizer)}"
            ),
        ),
        (
            bool(names),
            lambda: (
                f"implementation='pallas' does not support {names}; it takes is_causal and "
                "key_value_seq_lengths only (use implementation='chunked')"
            ),
        ),
        (
            jnp.dtype(options.dtype) not in accepted,
            lambda: f"the Pallas kernels take float32 or bfloat16 inputs; got {jnp.dtype(options.dtype)}",
        ),
    )


def _pallas_automatic(normalizer: Callable, options: Options) -> str | None:
    if options.platform != "gpu":
        return f"the Pallas kernels compile for GPU; on {options.platform!r} they would run in the interpreter"
    kernel = pallas_kernel(normalizer)
    if kernel not in VERIFIED_ON_GPU:
        return f"the Pallas {kernel} kernel has not yet passed its backend check on a GPU (VERIFIED_ON_GPU)"
    return None


def _pallas_run(normalizer: Callable, call: Call, options: Options) -> Result:
    # Imported here: importing Pallas costs time that only this backend needs.
    from attnlab.attention.pallas_online import pallas_online_attention
    from attnlab.attention.pallas_sparse import pallas_sparse_attention

    q, _ = _folded(normalizer, call)
    K = q.shape[1]
    operands = (ungroup_queries(q), jnp.moveaxis(call.k, 1, 2), jnp.moveaxis(call.v, 1, 2))
    visible = {"is_causal": call.visibility.is_causal, "key_lengths": call.visibility.key_lengths}
    kernel = pallas_kernel(normalizer)
    residual = None
    if kernel == "entmax":
        out = pallas_sparse_attention(*operands, alpha=families.static_entmax_alpha(normalizer), **visible)
    elif kernel == "softmax":
        _, sink = families.online_kind(normalizer)
        if sink is not None and not isinstance(sink, float):  # one per head at most: [N] for the kernel
            N = q.shape[1] * q.shape[2]
            sink = jnp.broadcast_to(jnp.reshape(normalizer.mapping.sink, _padded_shape(normalizer.mapping.sink)),
                                    (1, N, 1, 1)).reshape(N)  # fmt: skip
        result = pallas_online_attention(
            *operands, kind="softmax", sink=sink, return_residual=options.residual, **visible
        )
        out, residual = result if options.residual else (result, None)
        if residual is not None:  # [B, N, T] -> [B, K, G, T]
            residual = residual.reshape(residual.shape[0], K, -1, residual.shape[-1])
    else:
        B, N, T, _, _, _ = _shape(call)
        row_bias = jnp.broadcast_to(_elementwise_bias(normalizer, call), (B, K, N // K, T, 1)).reshape(B, N, T)
        out = pallas_online_attention(*operands, kind="elementwise", row_bias=row_bias, **visible)
    return Result(group_queries(out, K).astype(jnp.float32), {}, residual)


# ---------------------------------------------------------------------------------------------- the table

BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("dense", "the [B, N, T, S] logits once (the reference)", _dense_supports, _dense_run, _dense_automatic),
        Backend("cudnn", "jax.nn.dot_product_attention with cuDNN (GPU, half precision)", _cudnn_supports, _cudnn_run),
        Backend(
            "online", "key blocks in one online pass per query block (softmax, sink, sigmoid)",
            _online_supports, _online_run,
        ),
        Backend(
            "blocked_entmax", "query blocks with exact entmax thresholds and a closed-form backward",
            _blocked_entmax_supports, _blocked_entmax_run,
        ),
        Backend(
            "query_blocked", "query blocks through the normalizer itself, rematerialised",
            _query_blocked_supports, _query_blocked_run,
        ),
        Backend(
            "pallas", "Pallas kernels: entmax skipping weightless key blocks; softmax with a sink; sigmoid",
            _pallas_supports, _pallas_run, _pallas_automatic,
        ),
    )
}  # fmt: skip
"""Every backend, by name."""

AUTOMATIC = ("dense", "cudnn", "pallas", "online", "blocked_entmax", "query_blocked")
"""implementation=None: the first of these that serves the call (and that `automatic` does not pass over)."""

MEMORY_EFFICIENT = ("online", "blocked_entmax", "query_blocked")
"""implementation="chunked": the first of these that serves the call; none builds the T x S logits."""

ALIASES = {"xla": ("dense",), "chunked": MEMORY_EFFICIENT}
"""Names that stand for the first backend of a list that serves the call."""

IMPLEMENTATIONS = ("dense", "xla", "chunked", *(name for name in BACKENDS if name != "dense"))
"""Every name `implementation=` accepts (besides None)."""


def select(implementation: str | None, normalizer: Callable, options: Options) -> Backend:
    """The backend that runs the call: see the module docstring.

    Raises ValueError for an unknown name, and for a name (or None) whose backends cannot serve the
    call, with each one's reason.
    """
    if implementation is None:
        reasons = []
        for name in AUTOMATIC:
            backend = BACKENDS[name]
            reason = backend.supports(normalizer, options) or backend.automatic(normalizer, options)
            if reason is None:
                return backend
            reasons.append(f"{name}: {reason}")
        raise ValueError("no attention backend serves this call: " + "; ".join(reasons))
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; accepted: None, {', '.join(map(repr, IMPLEMENTATIONS))}")
    names = ALIASES.get(implementation, (implementation,))
    reasons = []
    for name in names:
        reason = BACKENDS[name].supports(normalizer, options)
        if reason is None:
            return BACKENDS[name]
        reasons.append(reason if len(names) == 1 else f"{name}: {reason}")
    raise ValueError(f"implementation={implementation!r} cannot serve this call: " + "; ".join(reasons))
