"""The backbone registry (`model.arch`): which network a config builds, and its checks.

Every denoising backbone is called as (x [B,H,W,C], t [B], y [B] | None, train=bool) ->
[B,H,W,C or 2C], so every objective, sampler and evaluation works with each; 'classifier' takes
the same call and returns logits [B, num_classes] (objective 'noisy_classifier' trains it, the
guided samplers read it: sampling/classifier_guidance.py). A new backbone is one module (its
Flax network, `create(model_config, channels)` and `check_config(model_config, resolution)`)
plus one entry in `BACKBONES`.
"""

from __future__ import annotations

from typing import List

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn import classifier, dit, unet

# model.arch -> the module of that network.
BACKBONES = {'unet': unet, 'dit': dit, 'classifier': classifier}


def get(arch: str):
  """The backbone module of `model.arch`, or a ValueError naming the field."""
  if arch not in BACKBONES:
    raise ValueError(f'model.arch={arch!r} is unknown; use one of {tuple(BACKBONES)}.')
  return BACKBONES[arch]


def create_model(model_config, channels: int) -> nn.Module:
  """The network of `config.model` (model.arch) for images with `channels` channels."""
  return get(model_config.arch).create(model_config, channels)


def init_params(model: nn.Module, rng: jax.Array, image_shape) -> dict:
  """Initial parameters of `model` for images [H, W, C] (every backbone takes the same call)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if getattr(model, 'num_classes', 0) else None
  return model.init({'params': rng}, x, t, y, train=False)['params']


def check_model_config(model_config, resolution: int) -> List[str]:
  """Problems with `config.model` for images of `resolution` (empty list = fine); each names the
  field and the fix: the section of model.arch's backbone, then the fields every backbone
  reads."""
  errors: List[str] = []
  if model_config.arch in BACKBONES:
    errors.extend(BACKBONES[model_config.arch].check_config(model_config, resolution))
  else:
    errors.append(f'model.arch={model_config.arch!r} is unknown; use one of {tuple(BACKBONES)}.')
  for field in ('dtype', 'param_dtype'):
    try:
      jnp.dtype(model_config[field])
    except TypeError:
      errors.append(f'model.{field}={model_config[field]!r} is not a dtype; use float32 or '
                    'bfloat16.')
  if model_config.num_classes < 0:
    errors.append(f'model.num_classes={model_config.num_classes} must be >= 0 (0 = unconditional).')
  if not model_config.timestep_scale > 0:
    errors.append(f'model.timestep_scale={model_config.timestep_scale} must be > 0 (1.0 = the '
                  'network sees the training step t).')
  return errors
