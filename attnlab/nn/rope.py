"""Rotary position embeddings (RoPE; Su et al. 2021), in the half-split convention of GPT-NeoX and Llama."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DEFAULT_THETA = 10_000.0


def rope_frequencies(head_dim: int, theta: Any = DEFAULT_THETA) -> jax.Array:
    """omega_i = theta^(-2i / head_dim) for i = 0 .. head_dim/2 - 1, float32 [head_dim // 2]."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return jnp.asarray(theta, jnp.float32) ** -exponents


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: Any = DEFAULT_THETA) -> jax.Array:
    """Rotate each head vector of `x` by angles proportional to its position.

    With head dimension H = 2D, split x = [x1, x2] into halves of size D ("rotate_half" layout).
    Pair i, (x1_i, x2_i), is rotated by the angle p * omega_i, omega_i = theta^(-2i/H):

        rope(x, p) = [x1 cos(p omega) - x2 sin(p omega),  x2 cos(p omega) + x1 sin(p omega)]

    Each pair turns by an orthogonal 2 x 2 rotation R(p omega_i), so norms are kept, position 0 is
    the identity, and for any q, k:  rope(q, m) . rope(k, n) = q . R((n - m) omega) k, which depends
    on positions only through n - m. Raising `theta` slows every rotation (the SSMax paper
    evaluates at 50x the training theta to reach longer contexts); it is a call-time argument so it
    can be changed at evaluation without touching parameters.

    Args:
      x: [B, T, N, H] with H even; any float dtype.
      positions: integer positions, [T] (shared by the batch) or [B, T].
      theta: the base; > 0, a Python float or a scalar array (traced values are fine).

    Returns:
      Array of x's shape and dtype; the rotation is computed in float32.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must be [batch, seq, heads, head_dim]; got shape {x.shape}")
    B, T, _, H = x.shape
    if H % 2:
        raise ValueError(f"apply_rope: head_dim must be even to split into rotation pairs; got {H}")
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"apply_rope: positions must be integers; got dtype {positions.dtype}")
    if positions.shape not in ((T,), (B, T), (1, T)):
        raise ValueError(
            f"apply_rope: positions must have shape [T] = ({T},) or [B, T] = ({B}, {T}); got {positions.shape}"
        )
    if isinstance(theta, (int, float)) and not theta > 0:
        raise ValueError(f"apply_rope: theta must be > 0; got {theta}")
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(H, theta)  # [(B,) T, D]
    angles = angles.reshape((-1, T, 1, H // 2))  # [B|1, T, 1, D]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : H // 2], x32[..., H // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
