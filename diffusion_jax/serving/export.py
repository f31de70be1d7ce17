"""`--mode=export`: a self-contained sampler that runs without the model code.

Writes `<workdir>/export/<tag>/` (the tag is --mode=sample's folder name) holding

  sampler.jax_exported  the whole sampling loop of `config.sample` (sampler, steps, spacing, eta,
                        guidance, thresholding) from noise to images, serialized with
                        `jax.export` for `export.platforms`, with a symbolic batch size `b`:
                          (params, rng [key_shape] uint32, labels [b] int32) -> images
                          [b, H, W, C] float32 in [-1, 1]
                        The parameters are an input, not constants, so the artifact stays small
                        and other weights of the same network can be plugged in.
  params.safetensors    the (EMA) parameters of the newest checkpoint, one tensor per leaf under
                        its '/'-joined path ('Conv_0/kernel'); bfloat16 ones as float32 (exact;
                        safetensors' NumPy reader has no bfloat16), cast back by the loader.
  card.json             the run's config, the sampler settings, the input/output shapes and
                        dtypes, the checkpoint step and the sha256 of both files above.

`diffusion_jax.serving.load(dir)` runs it importing only jax, numpy and safetensors. The traced
function is `sampler.make_sample_body`, the body --mode=sample compiles, without the mesh's
sharding constraints and with the batch taken from the labels' (symbolic) length, so for a seed
and a batch it gives the same images (the per-batch key is `fold_in(PRNGKey(seed), batch_index)`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax.training import restore
from diffusion_jax.nn import unet
from diffusion_jax.nn import backbones
from diffusion_jax.pipelines import sampler
from diffusion_jax.serving import loader
from diffusion_jax.serving.loader import ARTIFACT_FILE, CARD_FILE, CARD_FORMAT, WEIGHTS_FILE
from diffusion_jax.parallel import sharding
from diffusion_jax.sampling.class_labels import parse_class_labels

# jax.export's lowering platforms ('rocm' too; every one lowers on any machine).
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
BATCH_DIM = 'b'  # Name of the symbolic batch dimension.
PyTree = Any


def check_export_config(export_config) -> List[str]:
  """Problems with `config.export` (empty list = fine); each names the field and the fix."""
  errors: List[str] = []
  platforms = export_config.platforms
  if isinstance(platforms, str):
    errors.append(f'export.platforms={platforms!r} must be a tuple of platform names, e.g. '
                  f'({platforms!r},).')
    return errors
  platforms = tuple(platforms)
  if not platforms:
    errors.append(f'export.platforms is empty; name at least one of {KNOWN_PLATFORMS}.')
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if unknown:
    errors.append(f'export.platforms={platforms} has unknown platform(s) {unknown}; use a '
                  f'subset of {KNOWN_PLATFORMS}.')
  if len(set(platforms)) != len(platforms):
    errors.append(f'export.platforms={platforms} names a platform twice.')
  return errors


def flatten_params(params: PyTree) -> Dict[str, np.ndarray]:
  """{'Conv_0/kernel': array, ...}: every leaf of the nested dict `params` as NumPy."""
  flat: Dict[str, np.ndarray] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if '/' in str(key):
        raise ValueError(f'Parameter name {prefix}{key!r} contains "/", the separator of the '
                         'exported weight names.')
      if isinstance(value, Mapping):
        walk(value, f'{prefix}{key}/')
      else:
        flat[f'{prefix}{key}'] = np.asarray(jax.device_get(value))
  walk(params, '')
  return flat


def export_sampler(config, params: PyTree, platforms) -> jax.export.Exported:
  """Lowers the sampling loop of `config.sample` for `platforms`, batch size symbolic."""
  model = backbones.create_model(config.model, config.data.channels)
  if isinstance(model, unet.UNet) and model.conv_backend != 'xla':
    # oneDNN's custom calls exist in this process only; the same parameters serve XLA's convs.
    model = model.clone(conv_backend='xla')
  fn = sampler.make_sample_body(model, config)
  key = jax.random.PRNGKey(0)
  (batch,) = jax.export.symbolic_shape(BATCH_DIM, constraints=(f'{BATCH_DIM} >= 1',))
  specs = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params),
           jax.ShapeDtypeStruct(key.shape, key.dtype),
           jax.ShapeDtypeStruct((batch,), jnp.int32))
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)


def _card(config, step: int, exported: jax.export.Exported, flat: Dict[str, np.ndarray],
          files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """The JSON card: what the artifact computes and how to call it."""
  scfg = config.sample
  key = jax.random.PRNGKey(0)
  num_classes = config.model.num_classes
  class_labels = parse_class_labels(scfg.class_labels, num_classes)
  res, channels = config.data.resolution, config.data.channels
  out_aval = exported.out_avals[0]
  return {
      'format': CARD_FORMAT,
      'step': int(step),
      'use_ema': bool(scfg.use_ema),
      'platforms': list(exported.platforms),
      'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
      'sampler': {k: scfg[k] for k in sorted(scfg.keys())
                  if k not in ('num_samples', 'batch_size', 'animation', 'animation_every',
                               'animation_num_images')},
      'labels': {  # Default labels of serving.sample: --mode=sample's, by sample index.
          'num_classes': num_classes,
          'class_labels': None if class_labels is None else class_labels.tolist(),
      },
      'rng': {'prng_impl': str(jax.config.jax_default_prng_impl),
              'default_seed': int(scfg.seed),
              'per_batch': 'fold_in(PRNGKey(seed), batch_index)'},
      'inputs': {
          'params': {'file': WEIGHTS_FILE, 'num_tensors': len(flat),
                     'num_parameters': int(sum(a.size for a in flat.values())),
                     'dtypes': sorted({str(a.dtype) for a in flat.values()})},
          'rng': {'shape': list(key.shape), 'dtype': str(key.dtype)},
          'labels': {'shape': [BATCH_DIM], 'dtype': 'int32'},
      },
      'outputs': {'images': {'shape': [BATCH_DIM, res, res, channels],
                             'dtype': str(out_aval.dtype), 'range': [-1.0, 1.0],
                             'to_uint8': 'clip(round((x + 1) * 127.5), 0, 255)'}},
      'files': files,
      'config': config.to_dict(),
  }


def export(config, workdir: str) -> epath.Path:
  """`--mode=export`: writes the sampler of the newest checkpoint; returns its folder.

  The config is checked by modes/export.py (`validate_config`, with `check_export_config`)
  before this runs; here the checkpoint is found before anything is lowered or written. The
  folder is written next to its final place and renamed into it, so an earlier export of the
  same tag stays whole until the new one is complete.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(config.mesh)  # Restoring raises NoCheckpointError (no writes).
  params, step = restore.restore_params(config, workdir, mesh, config.sample.use_ema,
                                            config.sample.ema)  # The EMA sample mode reads.
  flat = flatten_params(params)
  host_params = loader.unflatten_params(flat)  # Plain nested dicts: the exported input tree.
  platforms = tuple(config.export.platforms)
  logging.info('Exporting the %s sampler of step %d for %s', config.sample.sampler, step,
               platforms)
  exported = export_sampler(config, host_params, platforms)

  out_dir = epath.Path(workdir) / 'export' / sampler.sample_tag(config, step)
  if jax.process_index() != 0:
    return out_dir
  tmp_dir = out_dir.parent / (out_dir.name + '.tmp')
  if tmp_dir.exists():
    tmp_dir.rmtree()
  tmp_dir.mkdir(parents=True)
  (tmp_dir / ARTIFACT_FILE).write_bytes(bytes(exported.serialize()))
  stored = {k: v.astype(np.float32) if v.dtype == jnp.bfloat16 else v for k, v in flat.items()}
  (tmp_dir / WEIGHTS_FILE).write_bytes(safetensors_numpy.save(stored))
  files = {name: {'sha256': loader.sha256(str(tmp_dir / name)),
                  'bytes': (tmp_dir / name).stat().length}
           for name in (ARTIFACT_FILE, WEIGHTS_FILE)}
  card = _card(config, step, exported, flat, files)
  (tmp_dir / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True))
  if out_dir.exists():
    out_dir.rmtree()
  tmp_dir.rename(out_dir)
  logging.info('Wrote the exported sampler of step %d to %s', step, out_dir)
  return out_dir
