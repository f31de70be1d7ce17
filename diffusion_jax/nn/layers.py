"""Layers the backbones share: the sinusoidal timestep embedding, GroupNorm in float32, and the
conditioning vector (timestep MLP + class embedding) of the U-Net and the DiT."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0,
                       flip_sin_to_cos: bool = False, freq_shift: float = 1.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] of timesteps t [B] (float32).

  [sin(t f_i), cos(t f_i)] (or [cos, sin] with `flip_sin_to_cos`), i < d/2, with
  f_i = P^(-i / (d/2 - freq_shift)): freq_shift=1 is Ho et al.'s (and diffusers' freq_shift=1),
  flip_sin_to_cos=True with freq_shift=0 is improved/guided-diffusion's.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class _GroupNormParams(nn.Module):
  """GroupNorm's per-channel scale (ones) and bias (zeros), under flax's `GroupNorm_0` names."""
  channels: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return (self.param('scale', nn.initializers.ones, (self.channels,), self.param_dtype),
            self.param('bias', nn.initializers.zeros, (self.channels,), self.param_dtype))


class GroupNorm32(nn.Module):
  """GroupNorm over [B, ..., C] computed in float32; the result is cast back to `dtype`.

  The same function and parameters as flax's `nn.GroupNorm` (variance E[x^2] - E[x]^2), computed
  in a cheaper order: sums per channel over the spatial axes, then per group (XLA:CPU runs one
  reduction over (H*W, C/G) ~10x slower than these two), and y = x * a + c with a, c per
  (batch, channel), which makes the backward pass reduce per channel too.
  """
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, c, g = x.shape[0], x.shape[-1], self.num_groups
    if c % g:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {g} groups; '
                       'change model.num_groups.')
    scale, bias = _GroupNormParams(c, self.param_dtype, name='GroupNorm_0')()
    x32 = x.astype(jnp.float32)
    flat = x32.reshape(b, -1, c)
    count = flat.shape[1] * (c // g)
    mean = jnp.sum(flat, axis=1).reshape(b, g, -1).sum(-1) / count           # [B, G]
    mean_sq = jnp.sum(flat * flat, axis=1).reshape(b, g, -1).sum(-1) / count
    rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
    a = rstd[:, :, None] * scale.astype(jnp.float32).reshape(g, -1)          # [B, G, C/G]
    shift = bias.astype(jnp.float32) - (mean[:, :, None] * a).reshape(b, c)
    per_channel = (b,) + (1,) * (x.ndim - 2) + (c,)
    y = x32 * a.reshape(per_channel) + shift.reshape(per_channel)
    return y.astype(self.dtype)
