"""Serving: `--mode=export` writes a self-contained `jax.export` sampler (export.py); `load`
runs one importing only jax, numpy and safetensors (loader.py, which can be copied alone).

  from diffusion_jax import serving
  sampler = serving.load('RUN/export/<tag>')
  images = sampler.sample(16, seed=0)
"""

from diffusion_jax.serving.loader import (ARTIFACT_FILE, CARD_FILE, CARD_FORMAT, WEIGHTS_FILE,
                                          ChecksumError, IncompatibleExportError,
                                          JaxVersionWarning, Sampler, check_runtime, load,
                                          to_uint8, unflatten_params)

__all__ = ['ARTIFACT_FILE', 'CARD_FILE', 'CARD_FORMAT', 'WEIGHTS_FILE', 'ChecksumError',
           'IncompatibleExportError', 'JaxVersionWarning', 'Sampler', 'check_runtime', 'load',
           'to_uint8', 'unflatten_params']
