"""`MultiHeadAttention`: an `flax.nnx` attention layer with any attnlab normalizer, per-head learned
normalizer parameters, optional RoPE, an optional output gate, and attention statistics."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.nn import core
from attnlab.normalizers import Normalizer, registry
from attnlab.normalizers.length_scaling import ASEntmaxScale
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


ADAPTIVE_GAMMA_RANGE = 2.0
"""gamma = ADAPTIVE_GAMMA_RANGE * tanh(...) in the adaptive ASEntmax scale (the code's attn_scale_gamma_range)."""
ADAPTIVE = ("beta", "gamma")


def check_adaptive_scale(adaptive_scale: Any, spec: NormalizerSpec, where: str) -> NormalizerSpec:
    """ValueError unless `adaptive_scale` is a bool and, when True, `spec`'s scale policy is ASEntmax's
    (`ASEntmaxScale`) with beta and gamma neither given nor explicitly learned. Returns the spec whose
    parameters the layer learns per head: `spec` itself, or, with the adaptive scale, `spec` without
    beta and gamma among those learned (the projections compute them instead, [B, N, T, 1]: every
    backend takes per-query parameters, the query-blocked one cutting them by query block).
    """
    if not isinstance(adaptive_scale, bool):
        raise ValueError(f"{where}: adaptive_scale must be True or False; got {adaptive_scale!r}")
    if not adaptive_scale:
        return spec
    if spec.entry.scale is not ASEntmaxScale:
        accepted = [entry.name for entry in registry.entries() if entry.scale is ASEntmaxScale]
        raise ValueError(
            f"{where}: adaptive_scale=True computes ASEntmax's beta and gamma from each query, so it needs a "
            f"normalizer whose scale policy is ASEntmaxScale ({', '.join(map(repr, accepted))}); got {spec.name!r}"
        )
    given = sorted(set(spec.fixed) & set(ADAPTIVE))
    explicit = sorted(set(spec.learn) & set(ADAPTIVE)) if spec.learn != NormalizerSpec(spec.name).learn else []
    if given or explicit:
        what = f"params {given}" if given else f"learn {explicit}"
        raise ValueError(
            f"{where}: with adaptive_scale=True beta and gamma are computed from each query; the normalizer "
            f"{spec.name!r} cannot also set them ({what}); leave them out (delta and alpha may be given)"
        )
    return dataclasses.replace(spec, learn=tuple(name for name in spec.learn if name not in ADAPTIVE))


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

    With `adaptive_scale` (ASEntmax's adaptive variant, Vasylenko et al. 2026, "Long-Context
    Generalization with Sparse Attention"; "adapt-softplus-tanh" in deep-spin/asentmax), the
    scale's beta and gamma are computed from each query's input x = inputs_q[b, t], per head:

        beta[b, n, t]  = softplus(x @ W_beta[:, n] + b_beta[n])
        gamma[b, n, t] = 2 tanh(x @ W_gamma[:, n] + b_gamma[n])
        p[b, n, t, :]  = alpha-entmax((delta + beta[b, n, t] (log(n_t + 1))^gamma[b, n, t]) z[b, n, t, :])

    n_t the query's visible keys; they reach the normalizer as beta and gamma [B, N, T, 1]. The
    factor depends only on the query row, so attention folds it into q (the blocked entmax path
    runs unchanged).

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
      decode: whether calls decode with the cache by default (a call's `decode` overrides it).
      adaptive_scale: ASEntmax's query-dependent scale (above), for a normalizer whose scale policy
        is `ASEntmaxScale` ("asentmax"; ValueError otherwise). Adds `self.scale_beta` and
        `self.scale_gamma`, `LinearGeneral` from in_features to the heads (kernel [F, N], bias [N]
        with use_bias), initialised as the query projection and made after every other
        projection, so the other parameters start as without it. beta and gamma then come from
        them: the spec's beta and gamma are not learned per head (and may not be given); delta
        keeps the spec's meaning (fixed or learned), as does alpha (see `check_adaptive_scale`).
        False (the default): no such parameters.

    Decoding with a cache, as in flax (`decode=True` at construction or call, after
    `init_cache(input_shape)` or `nnx.view(layer, decode=True, batch_size=..., max_length=...)`):
    the cache holds the keys (after the key layer norm and RoPE) and values of the positions seen
    so far, `cached_key` / `cached_value` [B, max_length, K, H] (K = num_kv_heads: grouped-query
    shaped), and `cache_index`, the next free position p, all `nnx.Cache`. A decoding call takes a
    chunk of T >= 1 new tokens [B, T, F], self-attention only: it writes their keys and values at
    p .. p + T - 1, and the query at p + t attends to the cached keys 0 .. p + t:

        T = 1: key_value_seq_lengths = p + 1             (no mask: every backend serves it)
        T > 1: mask_fn(b, h, t, s) = s <= p + t          (a prompt at p = 0, or more of one later;
                                                          a mask function, no T x max_length array)

    which are the keys a causal call over the whole sequence shows that query, so every normalizer
    gives what the full forward gives: the entmax thresholds run over the visible cached keys, the
    scale policies (SSMax, log-n, Llama 4, Qwen, critical, ASEntmax) see n = p + t + 1,
    stick-breaking skips the hidden keys, and sinks and gates apply as in any call. RoPE positions
    default to p + arange(T). Decoding is always causal (`is_causal` has no effect); a `mask` or
    `bias` given to the call is combined with the cache's visibility over [B, N, T, max_length],
    a `mask_fn` or `score_fn` sees q_idx = p + t;
    `key_value_seq_lengths` is refused (the cache index says which keys exist). The cached keys
    keep the RoPE base they were written with, so a call's `rope_theta` reaches only its new
    tokens. Writing past max_length raises ValueError when the index is known (outside jit); under
    jit, where it is traced, the outputs of an overflowing call are NaN, never silently wrong.

    Inputs have one batch axis or none ([T, F], e.g. inside vmap). Not supported: several batch
    axes (ValueError). `precision` applies to the projections; the attention itself accumulates
    in float32.

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
        decode: bool = False,
        adaptive_scale: bool = False,
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
        spec = as_spec(normalizer, f"{where}: normalizer")
        self.normalizer_spec = check_adaptive_scale(adaptive_scale, spec, where)
        self.adaptive_scale = adaptive_scale
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
        if not isinstance(decode, bool):
            raise ValueError(f"{where}: decode must be True or False; got {decode!r}")
        self.decode = decode

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
        # After the gate too: adding the adaptive scale leaves every other initial value as it was.
        if adaptive_scale:
            self.scale_beta = linear(in_features, num_heads)
            self.scale_gamma = linear(in_features, num_heads)
        else:
            self.scale_beta = self.scale_gamma = nnx.data(None)
        self.normalizer = LearnedNormalizer(self.normalizer_spec, num_heads, param_dtype=param_dtype)
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)
        # The decoding cache, made by init_cache (or nnx.view(..., decode=True, ...)), as in flax.
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

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
        decode: bool | None = None,
        mask_fn: Callable | None = None,
        score_fn: Callable | None = None,
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
            these keys (e.g. the needle's positions); implies return_statistics. When decoding,
            S = max_length (the cache's positions).
          decode: decode with the cache (see the class docstring); None: the layer's `decode`.
            Shapes then read S = max_length: `mask`, `bias` and the sown weights are over the cache.
          mask_fn, score_fn: masks and scores as functions of positions, mask_fn(b, h, q_idx, kv_idx)
            and score_fn(score, b, h, q_idx, kv_idx) (see `attnlab.attention.mask_functions`:
            documents, prefix-LM, ALiBi, soft-capping...), evaluated a block at a time; arrays they
            close over (ALiBi slopes, a relative-position table) get gradients. When decoding,
            q_idx is the query's position in the sequence (cache index + t) and kv_idx the cache's.
        """
        inputs_k, inputs_v = core.key_value_inputs(inputs_q, inputs_k, inputs_v)
        unbatched = core.check_inputs(inputs_q, inputs_k, inputs_v, self.in_features, self.in_kv_features)
        if unbatched:
            inputs_q, inputs_k, inputs_v = inputs_q[None], inputs_k[None], inputs_v[None]
            if key_value_seq_lengths is not None:
                key_value_seq_lengths = jnp.reshape(key_value_seq_lengths, (1,))
        decode = self.decode if decode is None else decode
        if decode:
            index = self._check_decoding(inputs_q, inputs_k, key_value_seq_lengths)
            if positions is None:
                positions = index + jnp.arange(inputs_q.shape[1])
        query, key, value = self.project(inputs_q, inputs_k, inputs_v, positions, key_positions, rope_theta)
        if decode:
            key, value, key_value_seq_lengths, chunk_mask = self._update_cache(key, value, index)
            is_causal = False  # the cache's visibility is causal over the whole sequence
            mask_fn, score_fn = _at_positions(mask_fn, index), _at_positions(score_fn, index, score=True)
            mask_fn = chunk_mask if mask_fn is None else (mask_fn if chunk_mask is None else _both(chunk_mask, mask_fn))

        deterministic, dropout_rng = self._dropout_state(deterministic, rngs)
        returned = return_statistics or mass_keys is not None
        normalizer = self.normalizer()
        if self.adaptive_scale:
            beta, gamma = self.adaptive_scale_parameters(inputs_q)
            normalizer = dataclasses.replace(
                normalizer, scale=dataclasses.replace(normalizer.scale, beta=beta, gamma=gamma)
            )
        out, aux = core.attend(
            query,
            key,
            value,
            normalizer,
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
            mask_fn=mask_fn,
            score_fn=score_fn,
        )
        # Unbatched inputs give unbatched results, sown ones included (as flax's layer does).
        unbatch = (lambda tree: jax.tree.map(lambda x: x[0], tree)) if unbatched else (lambda tree: tree)
        if self.sow_statistics:
            self.sow(nnx.Intermediate, "attention_statistics", unbatch({name: aux[name] for name in core.STATISTICS}))
        if sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", unbatch(aux["weights"]))
        if self.gate is not None:
            out = out * self.output_gate(inputs_q).astype(out.dtype)
        out = self.out(out)
        if decode:
            # Under jit an overflowing index is not known when tracing: its outputs are NaN, not wrong.
            fits = index + inputs_q.shape[1] <= self.cached_key.shape[1]
            out = jnp.where(fits, out, jnp.nan)
        out = unbatch(out)
        if returned:
            names = (*core.STATISTICS, "key_mass") if mass_keys is not None else core.STATISTICS
            return out, unbatch({name: aux[name] for name in names})
        return out

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> None:
        """Make an empty decoding cache, as `flax.nnx.MultiHeadAttention.init_cache` does.

        input_shape: the shape of the whole sequence's inputs, [B, max_length, F] (or [max_length, F]
        for inputs without a batch axis; the cache then has B = 1); the features are not read.
        Creates `cached_key` and `cached_value`, zeros [B, max_length, K, H] of `dtype`, and
        `cache_index` = 0 (int32), all `nnx.Cache`; an existing cache is replaced.
        """
        shape = tuple(input_shape)
        positive = all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        if len(shape) not in (2, 3) or not positive:
            raise ValueError(
                "attnlab.nn.MultiHeadAttention.init_cache: input_shape must be [batch, max_length, features] "
                f"(or [max_length, features]) of positive ints; got {input_shape!r}"
            )
        batch, max_length = (1, shape[0]) if len(shape) == 2 else shape[:2]
        cache_shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        """For `nnx.view`, as in flax: set `deterministic` and `decode`; `decode=True` on a layer without
        a cache makes one for [batch_size, max_length] (in the layer's dtype, float32 by default)."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if decode and self.cached_key is None:
                if batch_size is None or max_length is None:
                    raise TypeError(
                        "attnlab.nn.MultiHeadAttention: nnx.view(..., decode=True) needs batch_size and "
                        "max_length to make the cache"
                    )
                self.init_cache((batch_size, max_length, self.in_features), self.dtype or jnp.float32)

    def _check_decoding(
        self, inputs_q: jax.Array, inputs_k: jax.Array, key_value_seq_lengths: jax.Array | None
    ) -> jax.Array:
        """ValueError unless a decoding call fits the cache; returns the cache index (int32 scalar)."""
        where = "attnlab.nn.MultiHeadAttention (decode)"
        if self.cached_key is None:
            raise ValueError(
                f"{where}: no cache; call layer.init_cache((batch, max_length, features)) first, or make a "
                "decoding view with nnx.view(layer, decode=True, batch_size=..., max_length=...)"
            )
        batch, max_length = self.cached_key.shape[:2]
        (inputs_batch, new), keys = inputs_q.shape[:2], inputs_k.shape[1]
        if keys != new:
            raise ValueError(
                f"{where}: decoding is self-attention over the cache: the keys' inputs must be the {new} new "
                f"positions of the queries; got {keys}"
            )
        if inputs_batch != batch:
            raise ValueError(f"{where}: the inputs have batch {inputs_batch}; the cache was made for batch {batch}")
        if key_value_seq_lengths is not None:
            raise ValueError(
                f"{where}: key_value_seq_lengths is set by the cache (cache_index + new positions); "
                "hide cached keys with mask instead"
            )
        index = self.cache_index[...]
        traced = isinstance(index, jax.core.Tracer)
        if new > max_length or (not traced and int(index) + new > max_length):
            raise ValueError(
                f"{where}: the cache is full: {new} new positions at index {'?' if traced else int(index)} do not "
                f"fit max_length={max_length}; make the cache longer (init_cache with a larger max_length)"
            )
        return index

    def _update_cache(
        self, key: jax.Array, value: jax.Array, index: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, Callable | None]:
        """Write key, value [B, T, K, H] at `index`; returns the whole cache (in key's dtype) and the
        key lengths (one token) or the mask function (a chunk) that show query t the cached keys
        0 .. index + t."""
        T = key.shape[1]
        start = (0, index, 0, 0)
        cached_key = jax.lax.dynamic_update_slice(self.cached_key[...], key.astype(self.cached_key.dtype), start)
        cached_value = jax.lax.dynamic_update_slice(
            self.cached_value[...], value.astype(self.cached_value.dtype), start
        )
        self.cached_key[...] = cached_key
        self.cached_value[...] = cached_value
        self.cache_index[...] = index + T
        cached_key, cached_value = cached_key.astype(key.dtype), cached_value.astype(value.dtype)
        if T == 1:
            # Key lengths, no mask: every backend (the Pallas kernels included) serves a step.
            return cached_key, cached_value, jnp.full((key.shape[0],), index + 1, jnp.int32), None
        # A chunk: query t (at position index + t) sees the cached keys up to its own position, a
        # rule evaluated a block at a time (no T x max_length array; the online pass skips the
        # cache's empty blocks).
        return cached_key, cached_value, None, lambda b, h, q_idx, kv_idx: kv_idx <= index + q_idx

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

    def adaptive_scale_parameters(self, inputs_q: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ASEntmax's adaptive beta = softplus(inputs_q @ W_beta + b_beta) and gamma = 2 tanh(inputs_q @
        W_gamma + b_gamma) for inputs_q [B, T, F]: float32 [B, N, T, 1] each, one per head and query (the
        normalizer's layout: logits [B, N, T, S] with the key axis kept as 1). Only for a layer built
        with adaptive_scale=True."""
        if self.scale_beta is None:
            raise ValueError("attnlab.nn.MultiHeadAttention: the layer was built without adaptive_scale")

        def rows(x: jax.Array) -> jax.Array:  # [B, T, N] -> [B, N, T, 1]
            return jnp.swapaxes(x.astype(jnp.float32), -1, -2)[..., None]

        beta = jax.nn.softplus(rows(self.scale_beta(inputs_q)))
        gamma = ADAPTIVE_GAMMA_RANGE * jnp.tanh(rows(self.scale_gamma(inputs_q)))
        return beta, gamma

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


def _at_positions(fn: Callable | None, offset: jax.Array, *, score: bool = False) -> Callable | None:
    """A mask or score function called with q_idx the query's position in the sequence: when
    decoding, a chunk's query t sits at cache index + t."""
    if fn is None:
        return None
    if score:
        return lambda s, b, h, q_idx, kv_idx: fn(s, b, h, q_idx + offset, kv_idx)
    return lambda b, h, q_idx, kv_idx: fn(b, h, q_idx + offset, kv_idx)


def _both(first: Callable, second: Callable) -> Callable:
    return lambda b, h, q_idx, kv_idx: first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)
