"""A decoder-only Transformer language model in Flax NNX, with any attnlab normalizer per layer.

For tokens x [B, T] (ints in [0, vocab_size)), width D, L layers:

    h_0 = embed(x)                                             [B, T, D]
    h_l = h_{l-1} + attention_l(rmsnorm(h_{l-1}))             causal; positions by config.positional
                                                               (RoPE on queries and keys, none, or
                                                               ALiBi's distance penalty on the logits),
                                                               an output gate when config.gate is set,
                                                               ASEntmax's adaptive scale with adaptive_scale
    h_l = h_l + mlp_l(rmsnorm(h_l))                            mlp(u) = W_2 gelu(W_1 u), hidden 4D
    logits = rmsnorm(h_L) @ embed^T   (tied; an untied head when tie_embeddings=False)   [B, T, V]

Attention is `attnlab.nn.MultiHeadAttention` with the layer's normalizer spec (per-head learned
parameters live in the layer), so SSMax, sparsemax, entmax, ... are one field of the config.
`model(x, statistics=True)` also returns the attention statistics of every layer, reduced inside
the attention pass (no weights stored), stacked as [L, B, N, T].

Decoding: `model.init_cache(B, max_length)` gives every attention layer a key/value cache, then
`model(x, decode=True)` runs x [B, T_new] at the next positions (a prompt, then one token at a
time), with the logits of the full causal forward over the whole sequence; `attnlab.nn.generate`
samples from it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.attention.mask_functions import alibi, alibi_slopes
from attnlab.losses import OutputNormalizer
from attnlab.nn import core
from attnlab.nn.attention import MultiHeadAttention, check_adaptive_scale, check_gate
from attnlab.normalizers.spec import NormalizerSpec, as_spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POSITIONAL = {
    "rope": "RoPE on queries and keys, base rope_theta",
    "none": "NoPE: no positional encoding (order only through the causal mask)",
    "alibi": "ALiBi: score + slope_n (s - t), the fixed slopes of alibi_slopes(num_heads)",
}


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{field} must be an int >= 1; got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a `TransformerLM`.

    Fields:
      vocab_size: number of token ids (256 for bytes).
      num_layers, width, num_heads: L, D, N; head_dim = width / num_heads (must divide, and be even
        for RoPE).
      num_kv_heads: K for grouped-query attention (None: K = N); must divide num_heads.
      mlp_width: hidden width of the MLP (None: 4 * width).
      normalizer: one normalizer for every layer (a name from `attnlab.normalizers.NAMES` or a
        `NormalizerSpec`), or a tuple with one per layer. Stored as a tuple of L specs.
      positional: how positions reach attention, the same in every layer (`POSITIONAL`):
        "rope" (the default): RoPE on queries and keys with base rope_theta;
        "none" (NoPE): nothing, so the order is known only through the causal mask;
        "alibi": ALiBi (Press et al. 2022), each logit plus slope_n * (s - t) for key s of query t,
          with the fixed per-head slopes `attnlab.attention.mask_functions.alibi_slopes(num_heads)`,
          applied as the score function of every backend (`alibi`), so no T x S bias is built.
        None of them has parameters: a model's parameters and their initial values are the same
        under each. A normalizer's scale policy (SSMax's s log n, ...) multiplies the logits
        after the ALiBi term is added (`attnlab.attention.mask_functions`: score_fn, then the
        scale), so it scales the distance penalty too.
      rope_theta: RoPE base used in training (evaluation can raise it per call); read only with
        positional="rope".
      tie_embeddings: the output projection is the transposed token embedding.
      implementation, key_block, query_block: passed to `attnlab.attention.dot_product_attention`
        (None picks dense for short inputs and the memory-efficient path for long ones).
      dtype: computation dtype ("float32", "bfloat16", "float16"); parameters stay float32 and the
        logits are returned in float32.
      init_std: std of the embedding and of the input kernels; output kernels of each residual
        branch use init_std / sqrt(2 L) (GPT-2's scaling).
      norm_eps: RMSNorm epsilon.
      output: the output normalizer (`attnlab.losses.OutputNormalizer`, or a mapping name such as
        "sparsemax"): predictions are output.probabilities(logits), and training minimises its
        loss (cross-entropy for softmax, the matching Fenchel-Young loss otherwise).
      gate: the output gate of every attention layer (see `attnlab.nn.MultiHeadAttention`): None,
        "headwise" (adds width * num_heads parameters per layer) or "elementwise" (width * width
        per layer); no bias, initialised like the query kernel (normal, init_std).
      adaptive_scale: ASEntmax's query-dependent scale in every attention layer (see
        `attnlab.nn.MultiHeadAttention`): beta = softplus(x W_beta), gamma = 2 tanh(x W_gamma) per
        head from each query's input (2 * width * num_heads parameters per layer, no bias, normal
        init_std: beta starts near log 2, gamma near 0). Every layer's normalizer must have ASEntmax's
        scale policy ("asentmax"). False (the default) adds nothing.
    """

    vocab_size: int = 256
    num_layers: int = 4
    width: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_width: int | None = None
    normalizer: Any = "softmax"
    positional: str = "rope"
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    implementation: str | None = None
    key_block: int = 512
    query_block: int | None = None
    dtype: str = "float32"
    init_std: float = 0.02
    norm_eps: float = 1e-6
    output: Any = "softmax"
    gate: str | None = None
    adaptive_scale: bool = False

    def __post_init__(self):
        object.__setattr__(self, "output", OutputNormalizer.parse(self.output, "ModelConfig.output"))
        for field in ("vocab_size", "num_layers", "width", "num_heads"):
            _positive_int(getattr(self, field), field)
        if self.num_kv_heads is not None:
            _positive_int(self.num_kv_heads, "num_kv_heads")
        if self.mlp_width is not None:
            _positive_int(self.mlp_width, "mlp_width")
        core.check_heads(self.num_heads, self.num_kv_heads or self.num_heads, self.width, "ModelConfig")
        if not isinstance(self.positional, str) or self.positional not in POSITIONAL:
            accepted = "; ".join(f"{name!r} ({what})" for name, what in POSITIONAL.items())
            raise ValueError(
                f"ModelConfig.positional={self.positional!r} is not a positional encoding; accepted: {accepted}"
            )
        if self.positional == "rope":
            if self.rope_theta is None:
                raise ValueError(
                    "ModelConfig.rope_theta=None with positional='rope': RoPE needs a base > 0; for no positional "
                    "encoding set positional='none'"
                )
            core.check_rope_theta(self.rope_theta, self.head_dim, "ModelConfig")
        core.check_implementation(self.implementation, self.key_block, self.query_block, "ModelConfig")
        check_gate(self.gate, "ModelConfig")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}; accepted: {', '.join(DTYPES)}")
        for field in ("init_std", "norm_eps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{field} must be a number > 0; got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be True or False; got {self.tie_embeddings!r}")
        object.__setattr__(self, "normalizer", self._layer_specs(self.normalizer))
        for i, spec in enumerate(self.normalizer):
            check_adaptive_scale(self.adaptive_scale, spec, f"ModelConfig (layer {i})")

    def _layer_specs(self, normalizer: Any) -> tuple[NormalizerSpec, ...]:
        if isinstance(normalizer, (list, tuple)):
            if len(normalizer) != self.num_layers:
                raise ValueError(
                    f"ModelConfig.normalizer: a per-layer list needs num_layers={self.num_layers} entries; "
                    f"got {len(normalizer)}"
                )
            return tuple(as_spec(spec, f"ModelConfig.normalizer[{i}]") for i, spec in enumerate(normalizer))
        return (as_spec(normalizer, "ModelConfig.normalizer"),) * self.num_layers

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values (specs as dicts of their non-default fields)."""
        out = dataclasses.asdict(self)
        out["normalizer"] = [_spec_json(spec) for spec in self.normalizer]
        out["output"] = self.output.to_json()
        return out


def _spec_json(spec: NormalizerSpec) -> dict[str, Any]:
    """The spec's table less its display label (which does not change the model)."""
    return {key: value for key, value in spec.to_json().items() if key != "label"}


def check_token_range(tokens: jax.Array, vocab_size: int) -> None:
    """ValueError naming the first token outside [0, vocab_size), when the tokens are concrete.

    (The embedding lookup would give NaN logits for it, as flax's Embed does. Under jit the values
    are not known here; the training loop then stops on the non-finite loss.)"""
    if isinstance(tokens, jax.core.Tracer):
        return
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(jnp.any(bad)):
        index = tuple(int(i) for i in jnp.argwhere(bad)[0])
        raise ValueError(
            f"TransformerLM: token {int(tokens[index])} at {index} is outside [0, vocab_size={vocab_size}); "
            "use a tokenizer with this vocabulary or a larger ModelConfig.vocab_size"
        )


class MLP(nnx.Module):
    """mlp(u) = W_2 gelu(W_1 u + b_1) + b_2, [..., D] -> [..., D]."""

    def __init__(self, width: int, hidden: int, *, std: float, out_std: float, dtype: Any, rngs: nnx.Rngs):
        normal = nnx.initializers.normal
        self.up = nnx.Linear(width, hidden, kernel_init=normal(std), dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, width, kernel_init=normal(out_std), dtype=dtype, rngs=rngs)

    def __call__(self, u: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(u)))


class Block(nnx.Module):
    """One pre-norm layer: h + attention(rmsnorm(h)), then + mlp(rmsnorm(.))."""

    def __init__(self, config: ModelConfig, spec: NormalizerSpec, *, rngs: nnx.Rngs):
        dtype = DTYPES[config.dtype]
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.attention_norm = nnx.RMSNorm(config.width, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        self.attention = MultiHeadAttention(
            config.num_heads,
            config.width,
            num_kv_heads=config.num_kv_heads,
            normalizer=spec,
            rope_theta=config.rope_theta if config.positional == "rope" else None,
            gate=config.gate,
            adaptive_scale=config.adaptive_scale,
            implementation=config.implementation,
            key_block=config.key_block,
            query_block=config.query_block,
            use_bias=False,
            kernel_init=nnx.initializers.normal(std),
            out_kernel_init=nnx.initializers.normal(out_std),
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp_norm = nnx.RMSNorm(config.width, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(
            config.width, config.mlp_width or 4 * config.width, std=std, out_std=out_std, dtype=dtype, rngs=rngs
        )
        self.positional = config.positional

    def score_fn(self) -> Any:
        """The score function that carries the positions into this layer's logits: ALiBi's with
        positional="alibi", else None (RoPE lives in the layer's projections)."""
        return alibi(alibi_slopes(self.attention.num_heads)) if self.positional == "alibi" else None

    def __call__(
        self,
        h: jax.Array,
        *,
        positions: Any,
        rope_theta: Any,
        statistics: bool,
        mass_keys: Any,
        decode: bool | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        attended = self.attention(
            self.attention_norm(h),
            is_causal=True,
            positions=positions,
            rope_theta=rope_theta,
            return_statistics=statistics,
            mass_keys=mass_keys,
            decode=decode,
            score_fn=self.score_fn(),
        )
        attended, stats = attended if isinstance(attended, tuple) else (attended, None)
        h = h + attended
        return h + self.mlp(self.mlp_norm(h)), stats


class TransformerLM(nnx.Module):
    """Decoder-only language model; see the module docstring for the computation.

    Example:
        model = TransformerLM(ModelConfig(normalizer="ssmax"), rngs=nnx.Rngs(0))
        logits = model(tokens)                                  # [B, T, V] float32
        logits, stats = model(tokens, statistics=True)          # stats[name]: [L, B, N, T]
        logits = model(tokens, rope_theta=50 * 10_000.0)        # evaluation with a raised RoPE base
        model.init_cache(batch_size=B, max_length=P + 16)       # then decode: a prompt, then a token at a time
        logits = model(prompt, decode=True)                     # [B, P, V]
        logits = model(next_token, decode=True)                 # [B, 1, V]
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"TransformerLM: config must be a ModelConfig; got {type(config).__name__}")
        self.config = config
        dtype = DTYPES[config.dtype]
        self.embed = nnx.Embed(
            config.vocab_size,
            config.width,
            embedding_init=nnx.initializers.normal(config.init_std),
            dtype=dtype,
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(config, spec, rngs=rngs) for spec in config.normalizer])
        self.final_norm = nnx.RMSNorm(config.width, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        if config.tie_embeddings:
            self.head = nnx.data(None)
        else:
            self.head = nnx.Linear(
                config.width,
                config.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.normal(config.init_std),
                dtype=dtype,
                rngs=rngs,
            )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        rope_theta: float | jax.Array | None = None,
        statistics: bool = False,
        mass_keys: jax.Array | None = None,
        decode: bool | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Next-token logits for tokens [B, T].

        Args:
          tokens: int [B, T], each in [0, vocab_size).
          positions: RoPE positions [T] or [B, T] (default arange(T); when decoding, the cache
            index + arange(T)). Only with positional="rope" (ALiBi reads each token's index in
            the sequence, or in the cache when decoding).
          rope_theta: RoPE base for this call (default the config's; the SSMax paper evaluates
            long contexts at 50x the training base). When decoding it reaches the new tokens only
            (the cache holds keys already rotated): keep it the same over a whole decode. Only
            with positional="rope".
          statistics: also return the attention statistics of every layer.
          mass_keys: bool [B, T] (or [T]): also return "key_mass", the attention weight each query
            puts on these positions (e.g. a needle), per layer and head; implies statistics. When
            decoding, [B, max_length] over the cache's positions.
          decode: run the tokens at the cache's next positions, attending to everything cached
            before them, and append them to the cache (after `init_cache`; see
            `attnlab.nn.MultiHeadAttention` for what a decoding call accepts). The logits equal
            those of the full causal forward over the whole sequence at these positions. None:
            the layers' own `decode` (False unless set with `nnx.view(model, decode=True, ...)`).

        Returns:
          logits float32 [B, T, V]; with statistics, (logits, stats) where stats maps
          max_weight, entropy, support_size (and key_mass) to float32 [L, B, N, T].
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"TransformerLM: tokens must be an int array [batch, seq]; got {tokens.dtype}{tokens.shape}"
            )
        check_token_range(tokens, self.config.vocab_size)
        if self.config.positional != "rope":
            for name, value in (("positions", positions), ("rope_theta", rope_theta)):
                if value is not None:
                    raise ValueError(
                        f"TransformerLM: {name} is a RoPE setting, but this model has positional="
                        f"{self.config.positional!r}; leave it out (or build the model with positional='rope')"
                    )
        statistics = statistics or mass_keys is not None
        h = self.embed(tokens)
        layer_stats = []
        for block in self.blocks:
            h, stats = block(
                h,
                positions=positions,
                rope_theta=rope_theta,
                statistics=statistics,
                mass_keys=mass_keys,
                decode=decode,
            )
            layer_stats.append(stats)
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        logits = logits.astype(jnp.float32)
        if not statistics:
            return logits
        stacked = {name: jnp.stack([s[name] for s in layer_stats]) for name in layer_stats[0]}
        return logits, stacked

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> None:
        """An empty key/value cache in every attention layer, for decoding sequences of up to
        `max_length` positions (prompt included) in a batch of `batch_size`: each layer's
        `cached_key` / `cached_value` [batch_size, max_length, K, head_dim] (K = num_kv_heads) and
        `cache_index` (`MultiHeadAttention.init_cache`). dtype: the cache's (default the config's
        computation dtype, that of the keys). An existing cache is replaced (decoding restarts)."""
        for field, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerLM.init_cache: {field} must be an int >= 1; got {value!r}")
        dtype = DTYPES[self.config.dtype] if dtype is None else dtype
        for block in self.blocks:
            block.attention.init_cache((batch_size, max_length, self.config.width), dtype)

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """Next-token probabilities [B, T, V] from this model's logits, by its output normalizer
        (exact zeros for a sparse one)."""
        return self.config.output.probabilities(logits)

    def token_losses(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """The training loss per position [B, T] of logits [B, T, V] against targets [B, T]: the
        output normalizer's loss (cross-entropy for softmax)."""
        return self.config.output.loss(logits, targets)

    def num_params(self) -> int:
        """The number of trainable scalars (embedding counted once when tied)."""
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
