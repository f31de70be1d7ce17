"""diffusion-jax: train, sample and evaluate diffusion models with JAX/Flax, from a laptop CPU
to TPU pods.

The documented API (the README's "Python API" section), imported when first used:

  config     get_config(), load_config_file(path), ConfigError
  modes      train_and_evaluate(config, workdir), generate(config, workdir) (--mode=sample),
             evaluate(config, workdir), export(config, workdir), reconstruct_posthoc_ema(...),
             compile_for_topology(config, workdir) (--mode=compile: a pod's programs, here)
  runs       load_run(workdir), sample(run, n, **sample_fields), sample_config(run, n, ...),
             network_evaluations(run, ...), digits_quality(run, images, labels),
             image_grid(images), read_train_metrics(workdir) (train_metrics.jsonl as arrays),
             write_animation(path, trajectory, config) (the denoising GIF of --mode=sample)
  data       load_digits() -> scikit-learn's 8x8 digits as uint8 images and int32 labels
  interop    import_diffusers(source, workdir, ...) (a diffusers UNet2DModel folder -> a run)
  serving    load_export(folder) -> a sampler that runs without this package's model code
  registries objectives (diffusion.objective), backbones (model.arch), solvers (sample.sampler)

The package's layers, bottom to top: config -> parallel -> contrib -> nn, data -> processes ->
sampling -> objectives -> pipelines -> training -> interop -> evaluation, serving -> modes ->
api (tests/test_layers.py holds the order).
"""

import importlib
from typing import Any

# Public name -> (module, attribute or None for the module itself).
_API = {
    'get_config': ('diffusion_jax.config', 'get_config'),
    'load_config_file': ('diffusion_jax.config', 'load_config_file'),
    'ConfigError': ('diffusion_jax.config', 'ConfigError'),
    'train_and_evaluate': ('diffusion_jax.modes.train', 'train_and_evaluate'),
    'generate': ('diffusion_jax.modes.sample', 'generate'),
    'evaluate': ('diffusion_jax.modes.evaluate', 'evaluate'),
    'export': ('diffusion_jax.modes.export', 'export'),
    'reconstruct_posthoc_ema': ('diffusion_jax.modes.posthoc_ema', 'reconstruct'),
    'compile_for_topology': ('diffusion_jax.modes.compile', 'compile_for_topology'),
    'load_run': ('diffusion_jax.api', 'load_run'),
    'sample': ('diffusion_jax.api', 'sample'),
    'network_evaluations': ('diffusion_jax.api', 'network_evaluations'),
    'digits_quality': ('diffusion_jax.api', 'digits_quality'),
    'image_grid': ('diffusion_jax.api', 'image_grid'),
    'sample_config': ('diffusion_jax.api', 'sample_config'),
    'read_train_metrics': ('diffusion_jax.training.run_log', 'read_train_metrics'),
    'write_animation': ('diffusion_jax.modes.sample', 'write_animation'),
    'load_digits': ('diffusion_jax.data.digits', 'load_digits'),
    'import_diffusers': ('diffusion_jax.interop.diffusers', 'import_diffusers'),
    'load_export': ('diffusion_jax.serving', 'load'),
    'objectives': ('diffusion_jax.objectives', None),
    'backbones': ('diffusion_jax.nn.backbones', None),
    'solvers': ('diffusion_jax.sampling.solvers', None),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f'module diffusion_jax has no attribute {name!r}')
  module, attribute = _API[name]
  value = importlib.import_module(module)
  return value if attribute is None else getattr(value, attribute)
