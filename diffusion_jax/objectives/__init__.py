"""The training objectives: `diffusion.objective` names one of `OBJECTIVES`, a module that
implements the protocol of base.py (training example and loss, sampling, likelihood ODE, config
checks) with its fields in `config.diffusion.<name>`.

  from diffusion_jax import objectives
  objective = objectives.get(config.diffusion.objective)
  example = objective.training_example(config, x0, noise, key)

A new objective is one module plus one entry here (or `register` at run time).
"""

from __future__ import annotations

import types
from typing import Dict, List

from diffusion_jax.objectives import ddpm, edm, flow_matching

OBJECTIVES: Dict[str, types.ModuleType] = {
    ddpm.NAME: ddpm,
    edm.NAME: edm,
    flow_matching.NAME: flow_matching,
}


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
  if name in (ddpm.NAME, edm.NAME, flow_matching.NAME):
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
  return list(OBJECTIVES[name].check_config(config))
