"""Layers the backbones share: the sinusoidal timestep embedding, GroupNorm in float32, and the
conditioning vector (timestep MLP + class embedding) of the U-Net and the DiT."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

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
                       'change model.unet.num_groups.')
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


class Backbone(nn.Module):
  """The fields every backbone has, set from the shared `config.model` fields
  (`backbone_fields`): its conditioning (timestep embedding variant, classes, null row), its
  output (channels, learned variance) and its precision and memory (dtypes, remat)."""
  num_classes: int = 0
  null_class: bool = True
  learn_sigma: bool = False
  out_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  timestep_scale: float = 1.0


def backbone_fields(model_config, channels: int) -> dict:
  """The `Backbone` fields of `config.model` for images with `channels` channels."""
  return dict(num_classes=model_config.num_classes, null_class=model_config.null_class,
              learn_sigma=model_config.learn_sigma, out_channels=channels,
              dtype=jnp.dtype(model_config.dtype), param_dtype=jnp.dtype(model_config.param_dtype),
              remat=model_config.remat, flip_sin_to_cos=model_config.flip_sin_to_cos,
              freq_shift=model_config.freq_shift, timestep_scale=model_config.timestep_scale)


def conditioning(module: nn.Module, t: jax.Array, y: Optional[jax.Array], *, freq_dim: int,
                 width: int, dense_names: Tuple[str, str],
                 kernel_init: Callable = nn.linear.default_kernel_init,
                 embed_init: Callable = nn.linear.default_embed_init,
                 class_embedding: bool = True) -> jax.Array:
  """The conditioning vector [B, width] of a backbone: MLP(sinusoid(t * timestep_scale)) plus
  the class embedding of y [B] (None = the null class; an error without one). Without
  `class_embedding` (a noisy classifier, whose num_classes are its outputs) only the time MLP.

  Called inside a `Backbone`'s compact `__call__`, so its layers are the module's own: the two
  Dense layers are named `dense_names` and the embedding 'class_embed', which keeps each
  backbone's parameter names (checkpoints and the converters read them). Reads the module's
  timestep_scale, flip_sin_to_cos, freq_shift, num_classes, null_class, dtype and param_dtype.
  """
  dense = lambda name: nn.Dense(width, dtype=module.dtype, param_dtype=module.param_dtype,
                                kernel_init=kernel_init, name=name)
  t = jnp.asarray(t, jnp.float32)
  if module.timestep_scale != 1.0:  # e.g. improved-diffusion's rescale_timesteps: t * 1000 / T.
    t = t * jnp.float32(module.timestep_scale)
  features = timestep_embedding(t, freq_dim, flip_sin_to_cos=module.flip_sin_to_cos,
                                freq_shift=module.freq_shift)
  c = dense(dense_names[0])(features.astype(module.dtype))
  c = dense(dense_names[1])(nn.silu(c))
  if module.num_classes > 0 and class_embedding:
    if y is None:
      if not module.null_class:
        raise ValueError('This class-conditional model has no null class (model.null_class='
                         'False): pass class labels y.')
      y = jnp.full((t.shape[0],), module.num_classes, jnp.int32)  # The null class.
    rows = module.num_classes + 1 if module.null_class else module.num_classes
    c = c + nn.Embed(rows, width, embedding_init=embed_init, dtype=module.dtype,
                     param_dtype=module.param_dtype, name='class_embed')(y)
  return c
