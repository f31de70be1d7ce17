"""The sampling program: one XLA program from noise to images, sharded over the mesh.

`make_sample_fn` puts the network (nn/) into the objective's sampler (`objectives.get(...).sample`
with `config.sample`), shards the batch over the mesh's data axis and returns a function of
(params, rng, labels). Training (sample grids), `--mode=sample`, the evaluations, the API and
`--mode=export` (which serializes `make_sample_body`) all use it. `sample_tag` names a sampling
run's output folder. With classifier guidance (sample.classifier_scale > 0) the noisy
classifier (`GuidanceClassifier`, read by training/restore.py) is a second network of the same
program; its parameters are an argument of the program, like the model's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import flax.linen as nn

from diffusion_jax import objectives
from diffusion_jax.parallel import sharding
from diffusion_jax.sampling.class_labels import parse_class_labels


class GuidanceClassifier(NamedTuple):
  """The noisy classifier of classifier guidance: its network (model.arch='classifier'), its
  parameters (any sharding over the mesh) and its number of classes."""
  model: nn.Module
  params: Any
  num_classes: int


def label_classes(config, classifier: Optional[GuidanceClassifier] = None) -> int:
  """How many classes the samples' labels range over: the model's, or for an unconditional
  model guided by a classifier, the classifier's (0: unlabelled samples)."""
  if config.model.num_classes > 0 or classifier is None:
    return config.model.num_classes
  return classifier.num_classes


def make_sample_body(model: nn.Module, config, *,
                     noise_sharding: Optional[jax.sharding.Sharding] = None,
                     trajectory_every: int = 0, trajectory_images: int = 16,
                     classifier_model: Optional[nn.Module] = None) -> Callable[..., Any]:
  """The traceable sampler: `sample(params, rng, labels [B][, classifier_params]) -> images
  [B,H,W,C]` in [-1, 1].

  B is the labels' length (symbolic when export.py serializes it; `make_sample_fn` compiles it
  sharded). `rng` is split into the initial noise and the sampler's key, so a (seed, batch)
  gives the same images wherever the body runs. Labels are ignored by unconditional models,
  except as the target classes of classifier guidance (`classifier_model`, whose parameters
  are then the fourth argument; sample.classifier_scale). With `trajectory_every` > 0 it
  returns `(images, trajectory)` (see `make_sample_fn`).
  """
  objective = objectives.get(config.diffusion.objective)
  res, channels = config.data.resolution, config.data.channels
  num_classes = config.model.num_classes
  conditional = num_classes > 0

  def sample(params, rng, labels, classifier_params=None):
    batch_size = labels.shape[0]
    noise_key, sampler_key = jax.random.split(rng)
    noise = jax.random.normal(noise_key, (batch_size, res, res, channels), jnp.float32)
    if noise_sharding is not None:
      noise = jax.lax.with_sharding_constraint(noise, noise_sharding)
    apply_fn = lambda x, t, y: model.apply({'params': params}, x, t, y, train=False)
    guided = {}
    if classifier_model is not None:
      guided['classifier_fn'] = lambda x, t: classifier_model.apply(
          {'params': classifier_params}, x, t, None, train=False)
    out = objective.sample(
        apply_fn, config, noise, sampler_key,
        labels=labels if conditional or guided else None,
        null_label=num_classes if conditional else None, trajectory_every=trajectory_every,
        trajectory_images=min(trajectory_images, batch_size) if trajectory_every else None,
        **guided)
    if not trajectory_every:
      return jnp.clip(out, -1.0, 1.0)
    x, trajectory = out
    return jnp.clip(x, -1.0, 1.0), trajectory  # Only the first rows were recorded in the loop.
  return sample


def make_sample_fn(model: nn.Module, config, mesh: Mesh,
                   batch_size: int, trajectory_every: int = 0, trajectory_images: int = 16,
                   classifier: Optional[GuidanceClassifier] = None) -> Callable[..., Any]:
  """Returns `sample(params, rng, labels [B] numpy) -> images [B,H,W,C]` in [-1, 1], jitted.

  `params` may have any sharding over `mesh`: FSDP-sharded as `checkpoints.restore_params` and
  training hold them (each weight is gathered inside the program where it is used), or
  replicated. `sample.lower(params, rng, labels)` lowers it ahead of time. The whole sampler
  (`make_sample_body`: the objective's sampler with `config.sample`) is one XLA program;
  the batch of `batch_size` is sharded over the mesh's data axis. `labels` is ignored by unconditional models.
  With `trajectory_every` > 0 it returns `(images, trajectory)` instead, where `trajectory`
  holds x_t and the predicted x0 of the first `trajectory_images` samples every
  `trajectory_every` steps ([K, n, H, W, C] each, replicated on every device).
  With `classifier` the program is guided by it (sample.classifier_scale): its gradient is
  taken inside the sampler loop, and its parameters are passed to every call as they are held.
  """
  batch_shard = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  sample = make_sample_body(model, config, noise_sharding=batch_shard,
                            trajectory_every=trajectory_every,
                            trajectory_images=trajectory_images,
                            classifier_model=None if classifier is None else classifier.model)
  # Unguided, the program keeps its three arguments (compiled ahead of time by training and
  # --mode=compile and called as such); guided, the classifier's parameters are the fourth.
  extra = () if classifier is None else (classifier.params,)

  out_shardings = (batch_shard, replicated) if trajectory_every else batch_shard
  # Params: no declared sharding, so the program takes them as they are (FSDP-sharded as
  # restored or trained, or replicated) and XLA all-gathers each weight where it is used; no
  # device needs a full copy of the parameters up front.
  jitted = jax.jit(lambda params, rng, labels, *guide: sample(params, rng, labels, *guide),
                   in_shardings=(None, replicated, batch_shard) + (None,) * len(extra),
                   out_shardings=out_shardings)

  def global_labels(labels) -> jax.Array:
    labels = np.asarray(labels, np.int32)  # The same on every host; made a global array here.
    if labels.shape != (batch_size,):
      raise ValueError(f'labels of shape {labels.shape} for a sampler of batch {batch_size}.')
    return jax.make_array_from_callback(labels.shape, batch_shard, lambda idx: labels[idx])

  def sample_with_host_labels(params, rng, labels):
    return jitted(params, rng, global_labels(labels), *extra)

  def lower(params, rng, labels):
    """Ahead-of-time lowering (`.lower(...).compile()`, e.g. for its memory_analysis()) with
    the arguments of a call, or with ShapeDtypeStructs for all three (a mesh of devices this
    process cannot address, as --mode=compile's TPU topology)."""
    if not isinstance(labels, jax.ShapeDtypeStruct):
      labels = global_labels(labels)
    return jitted.lower(params, rng, labels, *extra)

  sample_with_host_labels.lower = lower
  return sample_with_host_labels


# Sample fields that do not change which images are drawn (only what else is written).
_TAG_IGNORED_FIELDS = ('animation', 'animation_every', 'animation_num_images')
_CLASSIFIER_FIELDS = ('classifier_scale', 'classifier_workdir', 'classifier_use_ema')


def sample_tag(config, step: int) -> str:
  """Folder name of a sampling run: a readable prefix and a hash of every image-changing field.

  'step3000_ddim_100_seed0_ema_1a2b3c4d': step, sampler, steps, eta, guidance, labels, seed and
  EMA are spelled out; the 8-hex suffix hashes the whole `sample` section (spacing, variance,
  thresholding, solver, rho, churn, batch size, ...) and the checkpoint step, so two runs that
  differ in any such field never share a folder (each deletes its own shards when it starts).
  """
  scfg = config.sample
  tag = f'step{step}_{scfg.sampler}_{scfg.steps if scfg.sampler != "ddpm" else "full"}'
  if scfg.eta and scfg.sampler != 'ddpm':
    tag += f'_eta{scfg.eta:g}'
  if config.model.num_classes > 0:
    tag += f'_g{scfg.guidance_scale:g}'
  if scfg.classifier_scale:
    tag += f'_cg{scfg.classifier_scale:g}'
  if config.model.num_classes > 0 or scfg.classifier_scale:
    # An unconditional model's labels name the guiding classifier's classes (validate_config
    # checked them against it), so only their form is read here.
    labels = parse_class_labels(scfg.class_labels,
                                config.model.num_classes or np.iinfo(np.int32).max)
    if labels is not None:
      tag += '_y' + '-'.join(str(v) for v in labels[:8]) + ('-etc' if len(labels) > 8 else '')
  # Unguided runs hash as they did before classifier guidance had fields.
  ignored = _TAG_IGNORED_FIELDS + (() if scfg.classifier_scale else _CLASSIFIER_FIELDS)
  fields = {name: value for name, value in scfg.to_dict().items() if name not in ignored}
  digest = hashlib.sha256(
      json.dumps([step, fields], sort_keys=True, default=str).encode()).hexdigest()[:8]
  return tag + f'_seed{scfg.seed}{"_ema" if scfg.use_ema else ""}_{digest}'
