"""The training objectives: `diffusion.objective` names one of `OBJECTIVES`, a module that
implements the protocol of base.py (training example and loss, sampling, likelihood ODE, config
checks) with its fields in `config.diffusion.<name>`.

  from diffusion_jax import objectives
  objective = objectives.get(config.diffusion.objective)
  example = objective.training_example(config, x0, noise, key)

A new objective is one module plus one entry here (or `register` at run time). An objective
with `ARCHS` (noisy_classifier: ('classifier',)) trains only those model.arch values, and they
only by it; one with SAMPLERS = () draws no samples (no sample grid, no --mode=sample).
"""

from __future__ import annotations

import types
from typing import Dict, List

from diffusion_jax.nn import backbones
from diffusion_jax.objectives import ddpm, edm, flow_matching, noisy_classifier

OBJECTIVES: Dict[str, types.ModuleType] = {
    ddpm.NAME: ddpm,
    edm.NAME: edm,
    flow_matching.NAME: flow_matching,
    noisy_classifier.NAME: noisy_classifier,
}
_BUILT_IN = (ddpm.NAME, edm.NAME, flow_matching.NAME, noisy_classifier.NAME)


def get(name: str) -> types.ModuleType:
  """The objective module registered as `name`, or a ValueError naming diffusion.objective."""
  if name not in OBJECTIVES:
    raise ValueError(f'diffusion.objective={name!r} is unknown; use one of {tuple(OBJECTIVES)}.')
  return OBJECTIVES[name]


def register(module: types.ModuleType) -> None:
  """Adds an objective module (its `NAME` is the diffusion.objective value that selects it)."""
  OBJECTIVES[module.NAME] = module


def unregister(name: str) -> None:
  """Removes the objective registered as `name` (the built-in ones stay)."""
  if name in _BUILT_IN:
    raise ValueError(f'{name!r} is a built-in objective.')
  OBJECTIVES.pop(name, None)


def check_config(config) -> List[str]:
  """Problems with `diffusion.objective` and the objective's fields (empty list = fine)."""
  name = config.diffusion.objective
  if name not in OBJECTIVES:
    return [f'diffusion.objective={name!r} is unknown; use one of {tuple(OBJECTIVES)}.']
  if name not in config.diffusion:
    return [f'diffusion.objective={name!r} reads the section diffusion.{name}, which the config '
            'lacks; add it (the objective module documents its fields).']
  return _check_arch(config) + list(OBJECTIVES[name].check_config(config))


def draws_samples(name: str) -> bool:
  """Whether objective `name` has samplers (a sample grid, --mode=sample, sample metrics)."""
  return bool(get(name).SAMPLERS)


def _check_arch(config) -> List[str]:
  """model.arch against the objectives' `ARCHS`: an objective that declares them trains only
  those backbones, and those backbones (whose output is not an image: the classifier's logits)
  are trained only by the objectives that declare them."""
  name, arch = config.diffusion.objective, config.model.arch
  archs = getattr(OBJECTIVES[name], 'ARCHS', None)
  if archs is not None:
    if arch in archs:
      return []
    return [f'diffusion.objective={name!r} trains model.arch in {tuple(archs)}, not '
            f'model.arch={arch!r}; set model.arch={archs[0]!r} (its fields: '
            f'model.{archs[0]}).']
  owned = {a: other for other, module in OBJECTIVES.items()
           for a in (getattr(module, 'ARCHS', None) or ())}
  if arch in owned:
    denoisers = tuple(a for a in backbones.BACKBONES if a not in owned)
    return [f'model.arch={arch!r} is trained only by diffusion.objective={owned[arch]!r}, not '
            f'by diffusion.objective={name!r}; set model.arch to one of {denoisers} or '
            f'diffusion.objective={owned[arch]!r}.']
  return []
