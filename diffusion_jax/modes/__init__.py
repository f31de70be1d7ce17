"""The modes of `python main.py --mode=...`, each one module of this package with one entry
function `(config, workdir) -> result`; `validation.py` checks a config for a mode.

  train        train.train_and_evaluate   trains (resumes), with the in-training eval
  sample       sample.generate            samples.npz, grid.png (and animation.gif)
  eval         evaluate.evaluate          likelihood and sample-quality figures
  export       export.export              a jax.export sampler, its weights and card
  posthoc_ema  posthoc_ema.reconstruct    EDM2's post-hoc EMA from the run's snapshots
  compile      compile.compile_for_topology  the run's programs compiled for a TPU pod, here

A new mode is one module plus one entry in `MODES`. Modes are imported when asked for, so
`--mode=sample` never imports TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Tuple

# mode -> (module of this package, its entry function).
MODES: Dict[str, Tuple[str, str]] = {
    'train': ('train', 'train_and_evaluate'),
    'sample': ('sample', 'generate'),
    'eval': ('evaluate', 'evaluate'),
    'export': ('export', 'export'),
    'posthoc_ema': ('posthoc_ema', 'reconstruct'),
    'compile': ('compile', 'compile_for_topology'),
}


def entry(mode: str) -> Callable[[Any, str], Any]:
  """The entry function of `mode` (its module imported now), or a ValueError naming --mode."""
  if mode not in MODES:
    raise ValueError(f'--mode={mode!r} is unknown; use one of {tuple(MODES)}.')
  module, function = MODES[mode]
  return getattr(importlib.import_module(f'{__name__}.{module}'), function)
