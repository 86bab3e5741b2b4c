"""Length scaling from production models and from theory, as scale policies.

Each policy turns n, the number of valid entries of each row ([..., 1]; in causal self-attention
the keys query i sees, n = i + 1), into a factor [..., 1] that multiplies the row's logits, so it
composes with every mapping and attention folds it into the queries (see
:mod:`attnlab.normalizers.scaling`):

    llama4_temperature  1 + attn_scale log(floor(n / floor_scale) + 1)      Llama 4, its NoPE layers
    qwen_log_n          max(1, log n / log seq_length)                      Qwen, "logn attention"
    critical_log_n      gamma log n                                         Chen et al. 2026
    asentmax_scale      delta + beta (log(n + 1))^gamma                     Vasylenko et al. 2026

The production models write these with the query's position p (0-based) and n = p + 1; here n
is the row's valid entries, which is the same under a plain causal mask and the keys really
seen under padding or a window. An empty row (n = 0) counts as n = 1 where a logarithm needs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnlab.normalizers.describe import RAW, Description, Parameter, described
from attnlab.normalizers.scaling import Align, LogN

LLAMA4_ATTN_SCALE = 0.1
LLAMA4_FLOOR_SCALE = 8192.0


@described(
    Description(
        "llama4_temperature",
        "Llama 4",
        "(1 + attn_scale log(floor(n / floor_scale) + 1)) z, n = valid entries of the row",
        family=None,
        parameters=(
            Parameter(
                "attn_scale",
                LLAMA4_ATTN_SCALE,
                "weight of the log term (Llama 4: 0.1)",
                minimum=0.0,
                learn=RAW,
            ),
            Parameter(
                "floor_scale",
                LLAMA4_FLOOR_SCALE,
                "row length per step of the floor (Llama 4: 8192)",
                minimum=0.0,
                inclusive=False,
            ),
        ),
    )
)
class Llama4Temperature:
    """Llama 4's attention temperature tuning: factor = 1 + attn_scale * log(floor(n / floor_scale) + 1).

    Llama 4 scales the queries of its NoPE (no rotary embedding) layers by this factor with
    n = position + 1 (`attn_temperature_tuning` in meta-llama/llama-models and in transformers'
    Llama4TextAttention; released configs: attn_scale = 0.1, floor_scale = 8192). The factor is 1
    up to n = floor_scale - 1, then rises by steps, 1 + 0.1 log 2 at n = 8192: it leaves short
    contexts untouched. attn_scale >= 0 and floor_scale > 0 when concrete; attn_scale may be
    learned (per head, as is), floor_scale only selects the steps and has no gradient.
    """

    attn_scale: Any = LLAMA4_ATTN_SCALE
    floor_scale: Any = LLAMA4_FLOOR_SCALE

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        steps = jnp.floor(n_valid / align(self.floor_scale, "floor_scale"))
        return 1.0 + align(self.attn_scale, "attn_scale") * jnp.log(steps + 1.0)


QWEN_SEQ_LENGTH = 2048.0


@described(
    Description(
        "qwen_log_n",
        "Qwen log-n",
        "max(1, log n / log seq_length) z, n = valid entries of the row",
        family=None,
        parameters=(
            Parameter(
                "seq_length",
                QWEN_SEQ_LENGTH,
                "the training length L (QWenConfig: 2048)",
                minimum=1.0,
                inclusive=False,
            ),
        ),
    )
)
class QwenLogN:
    """Qwen's log-n attention: factor = max(1, log_L n), L = `seq_length`, the training length.

    Qwen (v1, `use_logn_attn`) multiplies the query at position p by log(p + 1) / log L once
    p + 1 > L, and by 1 before (its `logn_tensor`, applied at inference): with n = p + 1 that is
    max(1, log n / log L), queries scaled by log_L n beyond the training length. L defaults to
    2048, the `seq_length` default of QWenConfig; a released checkpoint's config.json gives its
    own. seq_length > 1; it is not learned.
    """

    seq_length: Any = QWEN_SEQ_LENGTH

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        log_n = jnp.log(jnp.maximum(n_valid, 1.0))
        return jnp.maximum(1.0, log_n / jnp.log(align(self.seq_length, "seq_length")))


CRITICAL_GAMMA = 1.0


@described(
    Description(
        "critical_log_n",
        "critical log-n",
        "gamma log(n) z (critical attention scaling); LogN at s = gamma, bias = 0, gamma = 1 fixed by default",
        family=None,
        parameters=(
            Parameter(
                "gamma",
                CRITICAL_GAMMA,
                "the constant of beta_n = gamma log n (critical: 1 / (1 - rho), 1 at rho = 0)",
                minimum=0.0,
                inclusive=False,
                learn=RAW,
            ),
        ),
    )
)
class CriticalLogN:
    """Critical attention scaling (Chen, Lin, Polyanskiy & Rigollet, ICLR 2026): factor = gamma * log n.

    The paper scales attention scores by beta_n = gamma log n and finds a phase transition at
    gamma = 1 / (1 - rho) for tokens of pairwise inner product rho: below it the tokens collapse
    to one direction, above it attention is the identity. The default gamma = 1 is that point
    for rho = 0.

    This is `LogN(s=gamma, bias=0)` and is computed by it (one definition of log n and of the
    empty row). It is its own policy rather than a second name over LogN because a registry
    entry takes its defaults from its classes' descriptions: over LogN it would be SSMax itself
    (s = 0.43, learned per head by default), where the theory's factor is gamma log n with gamma
    fixed at the critical value (a layer may still learn it: `learn=("gamma",)`).
    """

    gamma: Any = CRITICAL_GAMMA

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        # LogN aligns its `s`, which is this policy's gamma: errors should say gamma.
        def rename(value: Any, name: str) -> jax.Array:
            return align(value, "gamma" if name == "s" else name)

        return LogN(s=self.gamma, bias=0.0).factor(n_valid, rename)


ASENTMAX_DELTA = 1.0
ASENTMAX_BETA = 0.55
ASENTMAX_GAMMA = 0.0


@described(
    Description(
        "asentmax_scale",
        "AS",
        "(delta + beta (log(n + 1))^gamma) z, n = valid entries of the row",
        family=None,
        parameters=(
            Parameter("delta", ASENTMAX_DELTA, "constant part of the scale (code: 1)", minimum=0.0, learn=RAW),
            Parameter(
                "beta",
                ASENTMAX_BETA,
                "weight of the length term (code: learned per head from U(0.1, 1))",
                minimum=0.0,
                learn=RAW,
                learned_by_default=True,
            ),
            Parameter(
                "gamma",
                ASENTMAX_GAMMA,
                "power of log(n + 1) (code: learned per head from N(0, 0.1))",
                learn=RAW,
                learned_by_default=True,
            ),
        ),
    )
)
class ASEntmaxScale:
    """ASEntmax's length scale (Vasylenko, Pitorro, Martins & Treviso, "Long-Context Generalization
    with Sparse Attention", ICLR 2026): factor = delta + beta * (log(n + 1))^gamma.

    The logits of alpha-entmax are multiplied by this factor. As in the public code
    (deep-spin/asentmax, `_apply_length_scaling`), the log is taken of the 0-based position + 2,
    i.e. log(n + 1) with n = position + 1 keys, so that (log .)^gamma stays finite for gamma < 0
    at n = 1. Its variants, all this policy:
      - "learn" (the default here): delta = 1 fixed, beta and gamma learned per head (a layer
        given only the name learns both). The code starts them at random, beta ~ U(0.1, 1) and
        gamma ~ N(0, 0.1); the defaults are those draws' means, beta = 0.55 and gamma = 0, so the
        scale starts flat (1.55) and learns how to grow with n.
      - "nakanishi" (SSMax-style): beta * log(n + 1), i.e. delta = 0, gamma = 1, beta learned from 1.
      - "adapt-softplus-tanh" (adaptive): beta and gamma computed from each query, per head, as
        beta = softplus(x W_beta), gamma = 2 tanh(x W_gamma) from the layer input x. The projections
        are a layer's (`attnlab.nn.MultiHeadAttention(adaptive_scale=True)`, `ModelConfig(
        adaptive_scale=True)`); this policy takes the results as beta and gamma arrays [B, N, T, 1]
        (one per head and query: parameters broadcast against the [B, N, T, S] logits with the key
        axis kept as 1), so the factor is still one number per row and folds into q.
    delta >= 0 and beta >= 0 when concrete; gamma is any finite number.
    """

    delta: Any = ASENTMAX_DELTA
    beta: Any = ASENTMAX_BETA
    gamma: Any = ASENTMAX_GAMMA

    def factor(self, n_valid: jax.Array, align: Align) -> jax.Array:
        log_n = jnp.log(jnp.maximum(n_valid, 1.0) + 1.0)  # >= log 2: any power of it is finite
        return align(self.delta, "delta") + align(self.beta, "beta") * jnp.power(log_n, align(self.gamma, "gamma"))
