"""Sampling from a `TransformerLM` with its key/value cache: `generate`, and the pieces it is made of.

    generate(model, prompt [B, P], max_new_tokens=M, key=k) -> [B, P + M]

runs in two compiled programs over a copy of the model that holds the cache (the model itself
is left as it was, without one):

    prefill:  the prompt in one decoding call at positions 0 .. P - 1    -> the last position's logits
    decode:   M times: sample a token from the logits, then (but for the last) run it at the next
              position                                                    -> M tokens, in one lax.scan

The decode loop is a `jax.lax.scan` inside one jit, not a Python loop over a jitted step: a step of
a small model costs less than a dispatch from Python, so the loop stays on the device; the cache is
the scan's carry and the parameters are closed over. Both programs are compiled once per model
structure, batch, prompt length and M (and top_k, greedy), and reused; the temperature is traced.

Sampling (`sample`) from logits z [B, V]:
  - greedy: argmax z (every output normalizer is order-preserving, so this is also argmax p);
  - else the top_k largest logits are kept (ties at the k-th value kept too; None: all), divided by
    the temperature, and a token is drawn from p = output.probabilities(z / temperature) over those
    kept, `output` being the model's output normalizer (`ModelConfig.output`): softmax's p is
    drawn as `jax.random.categorical` of the scaled logits; a sparse normalizer's (sparsemax,
    entmax) as categorical over log p, so its exact zeros are never drawn. Token i uses the i-th
    key of `jax.random.split(key, M)`: the same key gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.losses import OutputNormalizer
from attnlab.nn.transformer import TransformerLM, check_token_range


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a next token is drawn from logits (see the module docstring).

    Fields:
      temperature: > 0; the logits are divided by it before the output normalizer (ignored when
        greedy).
      top_k: None (every token) or an int >= 1: draw among the k largest logits only.
      greedy: take the argmax; no key is used.
    """

    temperature: float = 1.0
    top_k: int | None = None
    greedy: bool = False

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(
                f"Sampling.temperature must be a finite number > 0; got {t!r} (for the argmax use greedy=True)"
            )
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"Sampling.top_k must be None (every token) or an int >= 1; got {k!r}")
        if not isinstance(self.greedy, bool):
            raise ValueError(f"Sampling.greedy must be True or False; got {self.greedy!r}")


def sample(
    logits: jax.Array,
    key: jax.Array,
    sampling: Sampling = Sampling(),
    output: OutputNormalizer | str = "softmax",
    *,
    temperature: Any = None,
) -> jax.Array:
    """Draw one token per row of logits [B, V] (float); returns int32 [B].

    `output` is the model's output normalizer (`ModelConfig.output`, or a mapping name);
    `temperature`, when given, replaces `sampling.temperature` (it may be traced).
    """
    output = OutputNormalizer.parse(output, "sample: output")
    logits = jnp.asarray(logits, jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keep = None
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        keep = logits >= kth
    scaled = logits / (sampling.temperature if temperature is None else temperature)
    if output.mapping == "softmax":
        choice = scaled if keep is None else jnp.where(keep, scaled, -jnp.inf)
    else:
        p = output.probabilities(scaled, where=keep)
        choice = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
    return jax.random.categorical(key, choice, axis=-1).astype(jnp.int32)


def decoding_state(model: TransformerLM, batch_size: int, max_length: int) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, cache, rest): a copy of `model` (sharing its parameters' arrays) with an empty cache
    for [batch_size, max_length], split for `prefill` and `decode`. `model` is not changed."""
    decoder = nnx.clone(model)
    decoder.init_cache(batch_size, max_length)
    return nnx.split(decoder, nnx.Cache, ...)


def _run(graphdef: Any, cache: nnx.State, rest: nnx.State, tokens: jax.Array) -> tuple[nnx.State, jax.Array]:
    """tokens [B, T] at the cache's next positions -> (the cache after them, the last logits [B, V])."""
    model = nnx.merge(graphdef, cache, rest)
    logits = model(tokens, decode=True)
    return nnx.state(model, nnx.Cache), logits[:, -1]


@functools.partial(jax.jit, static_argnums=0)
def prefill(graphdef: Any, cache: nnx.State, rest: nnx.State, prompt: jax.Array) -> tuple[nnx.State, jax.Array]:
    """Run the prompt [B, P] at the cache's next positions (0 .. P - 1 for a new cache); returns the
    cache holding it and the next-token logits [B, V] (float32) after its last position."""
    return _run(graphdef, cache, rest, prompt)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "top_k", "greedy"))
def decode(
    graphdef: Any,
    cache: nnx.State,
    rest: nnx.State,
    logits: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    temperature: Any = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> tuple[nnx.State, jax.Array]:
    """`steps` tokens [B, steps] (int32), each drawn from the logits [B, V] before it (the first from
    `logits`) and run at the next position; returns the cache after the last run and the tokens.
    The last token is not run (nothing would read its logits), so the cache gains steps - 1
    positions. Token i is drawn with the i-th key of jax.random.split(key, steps)."""
    output = nnx.merge(graphdef, cache, rest).config.output
    # Checked by the caller (generate); a traced temperature cannot be checked here.
    sampling = Sampling(top_k=top_k, greedy=greedy)
    keys = jax.random.split(key, steps)
    first = sample(logits, keys[0], sampling, output, temperature=temperature)

    def step(carry, step_key):
        cache, token = carry
        cache, next_logits = _run(graphdef, cache, rest, token[:, None])
        token = sample(next_logits, step_key, sampling, output, temperature=temperature)
        return (cache, token), token

    (cache, _), later = jax.lax.scan(step, (cache, first), keys[1:])
    return cache, jnp.concatenate([first[:, None], later.T], axis=1)


def generate(
    model: TransformerLM,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Continue each prompt row by `max_new_tokens` tokens sampled from `model`.

    Args:
      model: a `TransformerLM` (not changed: the cache lives in a copy).
      prompt: int [B, P], P >= 1, each in [0, vocab_size).
      max_new_tokens: M >= 1.
      key: a `jax.random.key`; the same key gives the same tokens. Required unless greedy.
      temperature, top_k, greedy: how each token is drawn (`Sampling`; module docstring), from the
        model's output normalizer's probabilities.

    Returns:
      int32 [B, P + M]: the prompt followed by the new tokens. Token P + i is what the model would
      sample after the full causal forward over the first P + i tokens (the cache is exact).
    """
    Sampling(temperature=temperature, top_k=top_k, greedy=greedy)  # checks them
    if not isinstance(model, TransformerLM):
        raise TypeError(f"generate: model must be an attnlab.nn.TransformerLM; got {type(model).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"generate: prompt must be an int array [batch, length] with length >= 1; got {prompt.dtype}{prompt.shape}"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    if key is None:
        if not greedy:
            raise ValueError("generate: sampling needs a key (jax.random.key(...)); or pass greedy=True")
        key = jax.random.key(0)  # drawn from by nothing
    check_token_range(prompt, model.config.vocab_size)
    (B, P), M = prompt.shape, max_new_tokens
    graphdef, cache, rest = decoding_state(model, B, P + M - 1)  # the last token is never run
    cache, logits = prefill(graphdef, cache, rest, prompt)
    _, tokens = decode(
        graphdef, cache, rest, logits, key, steps=M, temperature=jnp.float32(temperature), top_k=top_k, greedy=greedy
    )
    return jnp.concatenate([prompt.astype(jnp.int32), tokens], axis=1)
