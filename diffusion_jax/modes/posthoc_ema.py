"""`--mode=posthoc_ema`: an EMA of any sigma_rel reconstructed from the run's snapshots
(training/posthoc_ema.py)."""

from __future__ import annotations

from etils import epath

from diffusion_jax.modes.validation import validate_config
from diffusion_jax.training import posthoc_ema


def reconstruct(config, workdir: str) -> epath.Path:
  """Checks `config` for the mode, then writes the reconstruction; returns its folder."""
  validate_config(config, mode='posthoc_ema')
  return posthoc_ema.reconstruct(config, workdir)
