"""`--mode=export`: the run's sampler as a self-contained `jax.export` artifact
(serving/export.py)."""

from __future__ import annotations

from etils import epath

from diffusion_jax.modes.validation import validate_config
from diffusion_jax.serving import export as export_lib


def export(config, workdir: str) -> epath.Path:
  """Checks `config` for export, then writes `<workdir>/export/<tag>/`; returns that folder."""
  validate_config(config, mode='export')
  return export_lib.export(config, workdir)
