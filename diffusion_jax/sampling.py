"""The compiled, batch-sharded sampling function: one XLA program from noise to images.

`make_sample_fn` wraps `samplers.sample_from_config` (the sampler chosen by `config.sample`) around a
model, shards the batch over the mesh's data axis and returns a function of (params, rng, labels).
Training (sample grids), `--mode=sample` (sample_mode.py) and evaluation all use it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import diffusion, models, samplers, sharding


def make_sample_fn(model: models.UNet, schedule: diffusion.Schedule, config, mesh: Mesh,
                   batch_size: int, trajectory_every: int = 0, trajectory_images: int = 16
                   ) -> Callable[..., Any]:
  """Returns `sample(params, rng, labels [B] numpy) -> images [B,H,W,C]` in [-1, 1], jitted.

  The whole sampler (`samplers.sample_from_config` with `config.sample`) is one XLA program;
  the batch is sharded over the mesh's data axis. `labels` is ignored by unconditional models.
  With `trajectory_every` > 0 it returns `(images, trajectory)` instead, where `trajectory`
  holds x_t and the predicted x0 of the first `trajectory_images` samples every
  `trajectory_every` steps ([K, n, H, W, C] each, replicated on every device).
  """
  scfg = config.sample
  res, channels = config.data.resolution, config.data.channels
  num_classes = config.model.num_classes
  conditional = num_classes > 0
  batch_shard = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  num_traj = min(trajectory_images, batch_size)

  def sample(params, rng, labels):
    noise_key, sampler_key = jax.random.split(rng)
    noise = jax.random.normal(noise_key, (batch_size, res, res, channels), jnp.float32)
    noise = jax.lax.with_sharding_constraint(noise, batch_shard)
    apply_fn = lambda x, t, y: model.apply({'params': params}, x, t, y, train=False)
    out = samplers.sample_from_config(
        apply_fn, schedule, noise, sampler_key, scfg,
        prediction_type=config.diffusion.prediction_type,
        learn_sigma=config.model.learn_sigma,
        labels=labels if conditional else None,
        null_label=num_classes if conditional else None,
        trajectory_every=trajectory_every)
    if not trajectory_every:
      return jnp.clip(out, -1.0, 1.0)
    x, trajectory = out
    return jnp.clip(x, -1.0, 1.0), jax.tree.map(lambda a: a[:, :num_traj], trajectory)

  out_shardings = (batch_shard, replicated) if trajectory_every else batch_shard
  jitted = jax.jit(sample, in_shardings=(replicated, replicated, batch_shard),
                   out_shardings=out_shardings)

  def sample_with_host_labels(params, rng, labels):
    labels = np.asarray(labels, np.int32)  # The same on every host; made a global array here.
    return jitted(params, rng, jax.make_array_from_callback(labels.shape, batch_shard,
                                                            lambda idx: labels[idx]))
  return sample_with_host_labels
