"""Generating images from a trained model: the compiled, batch-sharded sampling function, and
`--mode=sample`, which writes `samples.npz` (uint8 NHWC in `arr_0`, labels in `arr_1` for
class-conditional models) and a PNG grid from the newest checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import checkpoints, diffusion, images, models, samplers, sharding, train_state
from diffusion_jax.config_validation import validate_config

PyTree = Any


def make_sample_fn(model: models.UNet, schedule: diffusion.Schedule, config, mesh: Mesh,
                   batch_size: int) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
  """Returns `sample(params, rng, labels [B] numpy) -> images [B,H,W,C]` in [-1, 1], jitted.

  The whole sampler is one XLA program; the batch is sharded over the mesh's data axis.
  `labels` is ignored by unconditional models.
  """
  scfg = config.sample
  sampler = samplers.get_sampler(scfg.sampler)
  res, channels = config.data.resolution, config.data.channels
  batch_shard = sharding.batch_sharding(mesh)
  conditional = config.model.num_classes > 0

  def sample(params, rng, labels):
    noise_key, sampler_key = jax.random.split(rng)
    noise = jax.random.normal(noise_key, (batch_size, res, res, channels), jnp.float32)
    noise = jax.lax.with_sharding_constraint(noise, batch_shard)
    apply_fn = lambda x, t: model.apply({'params': params}, x, t,
                                        labels if conditional else None, train=False)
    denoise = samplers.make_denoiser(apply_fn, schedule, config.diffusion.prediction_type,
                                     scfg.clip_denoised)
    x = sampler(denoise, schedule, noise, sampler_key, steps=scfg.steps, eta=scfg.eta,
                variance=scfg.variance)
    return jnp.clip(x, -1.0, 1.0)

  replicated = sharding.replicated(mesh)
  jitted = jax.jit(sample, in_shardings=(replicated, replicated, batch_shard),
                   out_shardings=batch_shard)

  def sample_with_host_labels(params, rng, labels):
    labels = np.asarray(labels, np.int32)  # The same on every host; made a global array here.
    return jitted(params, rng, jax.make_array_from_callback(labels.shape, batch_shard,
                                                            lambda idx: labels[idx]))
  return sample_with_host_labels


def default_labels(num_classes: int, start: int, batch_size: int) -> np.ndarray:
  """Class labels cycling 0..num_classes-1 (all zeros for unconditional models)."""
  if num_classes <= 0:
    return np.zeros((batch_size,), np.int32)
  return ((start + np.arange(batch_size)) % num_classes).astype(np.int32)


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def restore_params(config, workdir: str, mesh: Mesh, use_ema: bool) -> tuple[PyTree, int]:
  """Loads the (EMA) parameters of the newest checkpoint in `workdir` onto `mesh`."""
  model = models.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  image_shape = (config.data.resolution, config.data.resolution, config.data.channels)
  replicated = sharding.replicated(mesh)
  abstract = jax.eval_shape(
      lambda: train_state.create_train_state(model, tx, jax.random.PRNGKey(0), image_shape, mesh))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          abstract)
  manager = checkpoints.create_manager(workdir, read_only=True, async_save=False)
  state, step = checkpoints.restore_latest(manager, abstract)
  manager.close()
  if state is None:
    raise FileNotFoundError(
        f'No checkpoint in {checkpoints.checkpoint_dir(workdir)}: train first with '
        f'`python main.py --config=... --workdir={workdir}` (--mode=train), or point '
        '--workdir at a run that has checkpoints.')
  return (state.ema_params if use_ema else state.params), step


def generate(config, workdir: str, mesh: Optional[Mesh] = None) -> epath.Path:
  """`--mode=sample`: writes `sample.num_samples` images from the newest checkpoint.

  Output: `<workdir>/samples/<tag>/samples.npz` and `grid.png`; returns that folder.
  """
  validate_config(config, mode='sample')
  mesh = mesh or sharding.create_mesh(config.mesh)
  scfg = config.sample
  params, step = restore_params(config, workdir, mesh, scfg.use_ema)
  model = models.create_model(config.model, config.data.channels)
  schedule = diffusion.make_schedule(config.diffusion)
  sample_fn = make_sample_fn(model, schedule, config, mesh, scfg.batch_size)
  tag = (f'step{step}_{scfg.sampler}_{scfg.steps if scfg.sampler != "ddpm" else "full"}'
         f'_seed{scfg.seed}{"_ema" if scfg.use_ema else ""}')
  out_dir = epath.Path(workdir) / 'samples' / tag
  num_batches = math.ceil(scfg.num_samples / scfg.batch_size)
  rng = jax.random.PRNGKey(scfg.seed)
  all_images, all_labels = [], []
  progress = tqdm.trange(num_batches, desc=f'sampling ({scfg.sampler})', unit='batch',
                         disable=jax.process_index() != 0)
  for i in progress:
    labels_np = default_labels(config.model.num_classes, i * scfg.batch_size, scfg.batch_size)
    x = sample_fn(params, jax.random.fold_in(rng, i), labels_np)
    all_images.append(images.to_uint8(to_host(x)))
    all_labels.append(labels_np)
  arr_0 = np.concatenate(all_images)[:scfg.num_samples]
  arr_1 = np.concatenate(all_labels)[:scfg.num_samples]
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {'arr_0': arr_0}
    if config.model.num_classes > 0:
      arrays['arr_1'] = arr_1
    with (out_dir / 'samples.npz').open('wb') as f:
      np.savez(f, **arrays)
    upscale = max(1, 64 // config.data.resolution)
    images.write_png(str(out_dir / 'grid.png'), images.make_grid(arr_0[:256], upscale=upscale))
    logging.info('Wrote %d samples of step %d to %s', len(arr_0), step, out_dir)
  multihost_utils.sync_global_devices('sampling done')
  return out_dir
