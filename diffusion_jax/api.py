"""A small Python API over a run directory, for notebooks and scripts (main.py not needed).

  from diffusion_jax import api
  run = api.load_run('runs/digits')                        # config.json + newest checkpoint
  images = api.sample(run, 64, sampler='dpm_solver_pp', steps=20)   # uint8 [64, H, W, C]
  images, labels = api.sample(run, 64, return_labels=True)          # labels: the classes drawn
  api.digits_quality(run, images, labels)                  # classifier_fd (digits runs)

`sample` takes any `sample.*` field as a keyword (sampler, steps, eta, guidance_scale,
thresholding, ...) on top of the run's own config, checks the result as `--mode=sample` does,
and compiles the whole sampler as one program (`sampler.make_sample_fn`). The run is read
as `--mode=sample` reads it: its `config.json` and the EMA (or raw) parameters of the newest
checkpoint, in the FSDP layout of the run's mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from diffusion_jax.training import restore
from diffusion_jax.sampling import class_labels
from diffusion_jax import images, objectives
from diffusion_jax.evaluation import classifier_fd, feature_sets
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import multihost
from diffusion_jax.config import run_config
from diffusion_jax.sampling import loop
from diffusion_jax.pipelines import sampler
from diffusion_jax.parallel import sharding
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config

PyTree = Any


@dataclasses.dataclass
class Run:
  """A trained (or imported) run: its resolved config, parameters and checkpoint step."""
  workdir: str
  config: ml_collections.ConfigDict
  params: PyTree
  step: int
  mesh: Mesh


def load_run(workdir: str, *, use_ema: bool = True, mesh: Optional[Mesh] = None) -> Run:
  """Reads `<workdir>/config.json` and the newest checkpoint's EMA (`use_ema`) or raw params.

  Raises FileNotFoundError when the workdir has no config.json (train or convert first) and
  checkpoints.NoCheckpointError when it has no checkpoint.
  """
  config = run_config.load_run_config(workdir)
  if config is None:
    raise FileNotFoundError(
        f'{run_config.config_path(workdir)} is missing: train first (diffusion_jax.train_and_evaluate '
        'or main.py) or import a checkpoint (python -m diffusion_jax.convert) into this workdir.')
  mesh = mesh or sharding.create_mesh(config.mesh)
  params, step = restore.restore_params(config, workdir, mesh, use_ema)
  return Run(workdir=str(workdir), config=config, params=params, step=int(step), mesh=mesh)


def sample_config(run: Run, num_samples: int, **sample_fields: Any) -> ml_collections.ConfigDict:
  """The run's config with `sample.<name>=value` for each keyword, checked for sampling.

  The sampling batch is `num_samples` rounded up to a multiple of the mesh's devices. An
  unknown field or a bad value raises ConfigError naming `sample.<field>`.
  """
  config = ml_collections.ConfigDict(run.config.to_dict())
  unknown = sorted(set(sample_fields) - set(config.sample.keys()))
  if unknown:
    raise ConfigError('Unknown field(s) ' + ', '.join(f'sample.{k}' for k in unknown) +
                      f'; the sample fields are {sorted(config.sample.keys())} '
                      '(documented in diffusion_jax/config/defaults.py).')
  if num_samples < 1:
    raise ConfigError(f'num_samples={num_samples} must be >= 1.')
  devices = run.mesh.devices.size
  batch = -(-num_samples // devices) * devices
  config.sample.update(dict(sample_fields, num_samples=batch, batch_size=batch))
  validate_config(config, mode='sample', num_devices=devices)
  return config


def sample(run: Run, num_samples: int, *, seed: int = 0,
           labels: Optional[Union[Sequence[int], np.ndarray]] = None,
           return_labels: bool = False, trajectory_every: int = 0, trajectory_images: int = 16,
           **sample_fields: Any) -> Any:
  """Draws `num_samples` images from `run` with the run's `config.sample` plus `sample_fields`.

  Returns uint8 [N, H, W, C] images; with `return_labels` also the int32 [N] labels they were
  drawn for (class-conditional runs; zeros otherwise); with `trajectory_every` > 0 also the
  `loop.Trajectory` (x_t and predicted x0, floats in about [-1, 1], [K, n, H, W, C]) of the
  first `trajectory_images` samples every `trajectory_every` steps. Output order:
  (images[, labels][, trajectory]).

  Labels default to `sample.class_labels` (all classes when empty) cycled by sample index, as
  `--mode=sample` does. The key is `fold_in(PRNGKey(seed), 0)`, `--mode=sample`'s for its first
  batch, so `sample(run, n, seed=s)` draws the images of batch 0 of `--mode=sample` with
  `sample.batch_size=n` and of `serving.load(export).sample(n, seed=s)` (bit for bit on one
  device).
  """
  config = sample_config(run, num_samples, **sample_fields)
  batch = config.sample.batch_size
  classifier = restore.restore_guidance_classifier(config, run.mesh)  # classifier_scale > 0.
  num_classes = sampler.label_classes(config, classifier)
  if labels is None:
    wanted = class_labels.parse_class_labels(config.sample.class_labels, num_classes)
    all_labels = class_labels.labels_for(np.arange(batch), wanted, num_classes)
  else:
    given = np.asarray(labels, np.int32).reshape(-1)
    if given.shape[0] != num_samples:
      raise ValueError(f'labels has {given.shape[0]} entries for num_samples={num_samples}.')
    if num_classes and (given.min() < 0 or given.max() >= num_classes):
      raise ValueError(f'labels must be in [0, {num_classes}) (model.num_classes).')
    all_labels = np.concatenate([given, np.resize(given, batch - num_samples)])
  model = backbones.create_model(config.model, config.data.channels)
  sample_fn = sampler.make_sample_fn(model, config, run.mesh, batch,
                                      trajectory_every=trajectory_every,
                                      trajectory_images=min(trajectory_images, num_samples),
                                      classifier=classifier)
  out = sample_fn(run.params, jax.random.fold_in(jax.random.PRNGKey(seed), 0), all_labels)
  x, trajectory = out if trajectory_every else (out, None)
  result = [images.to_uint8(multihost.to_host(x)[:num_samples])]
  if return_labels:
    result.append(all_labels[:num_samples])
  if trajectory_every:
    result.append(loop.Trajectory(*(np.asarray(jax.device_get(a)) for a in trajectory)))
  return result[0] if len(result) == 1 else tuple(result)


def network_evaluations(run: Run, **sample_fields: Any) -> int:
  """Network evaluations per image of the run's sampler with `sample_fields` on top of its
  `config.sample` (the cost axis of quality plots): the objective's count (one per step; heun
  corrects every step but the last, 2 steps - 1; flow matching's midpoint takes 2 per step),
  doubled under classifier-free guidance (a scale other than 1 and 0, which call one network)."""
  config = sample_config(run, 1, **sample_fields)
  calls = objectives.get(config.diffusion.objective).network_evaluations(config)
  guided = config.model.num_classes > 0 and config.sample.guidance_scale not in (0.0, 1.0)
  return calls * (2 if guided else 1)


@functools.lru_cache(maxsize=4)
def _digits_scorer(cache_path: str, dataset: str):
  return classifier_fd.Scorer(cache_path, dataset)


def digits_quality(run: Run, samples: np.ndarray,
                   labels: Optional[np.ndarray] = None) -> Dict[str, Any]:
  """classifier_fd of uint8 digits samples [N, 8, 8, 1] (lower is better), as the run's eval.

  The small digits classifier is the run's own (`<eval.fid_stats_dir>/classifier_digits.npz`,
  trained there in seconds if absent), so figures match the in-training eval's. With `labels`
  (the classes the samples were drawn for) the result adds 'label_agreement'.
  """
  dataset = run.config.data.dataset
  path = epath.Path(feature_sets.stats_dir(run.config, run.workdir))
  path.mkdir(parents=True, exist_ok=True)
  scorer = _digits_scorer(str(path / f'classifier_{dataset}.npz'), dataset)
  return scorer(np.asarray(samples), None if labels is None else np.asarray(labels))


def image_grid(samples: np.ndarray, ncols: int = 0, upscale: int = 0) -> np.ndarray:
  """A uint8 grid of `samples` [N, H, W, C] for display (`images.make_grid`); upscale 0 picks
  one that makes the grid about 64 pixels per image."""
  if upscale <= 0:
    upscale = max(1, 64 // int(samples.shape[1]))
  return images.make_grid(np.asarray(samples), ncols=ncols, upscale=upscale)


__all__ = ['Run', 'load_run', 'sample_config', 'sample', 'network_evaluations',
           'digits_quality', 'image_grid']
