"""Flax layers built on `attnlab.attention`: three ways to put any normalizer in a Flax model.

- `MultiHeadAttention`: an `flax.nnx` layer (the constructor of `flax.nnx.MultiHeadAttention`, plus
  a normalizer with per-head learned parameters, RoPE and attention statistics);
- `LinenMultiHeadAttention`: the same layer for `flax.linen`;
- `attention_fn(normalizer)`: for flax's own layers, `nnx.MultiHeadAttention(attention_fn=...)` and
  `linen.MultiHeadDotProductAttention(attention_fn=...)`.

`NormalizerSpec` says which normalizer a layer uses and which of its parameters it learns;
`apply_rope` is the rotary embedding the layers apply.

`TransformerLM` (configured by a frozen `ModelConfig`) is a decoder-only language model built on
`MultiHeadAttention`, with a normalizer per layer and per-layer attention statistics on request;
it decodes with a key/value cache (`init_cache`, `decode=True`), and `generate` samples from it
(greedy, temperature, top-k; `attnlab.nn.decoding`).
"""

from attnlab.nn.attention import LearnedNormalizer, MultiHeadAttention
from attnlab.nn.decoding import Sampling, generate
from attnlab.nn.flax_attention import attention_fn
from attnlab.nn.linen import MultiHeadAttention as LinenMultiHeadAttention
from attnlab.nn.rope import apply_rope
from attnlab.nn.transformer import ModelConfig, TransformerLM
from attnlab.normalizers.describe import alpha_from_logit
from attnlab.normalizers.spec import NormalizerSpec, inverse_mean_log_n

__all__ = [
    "LearnedNormalizer",
    "LinenMultiHeadAttention",
    "ModelConfig",
    "MultiHeadAttention",
    "NormalizerSpec",
    "Sampling",
    "TransformerLM",
    "alpha_from_logit",
    "apply_rope",
    "attention_fn",
    "generate",
    "inverse_mean_log_n",
]
