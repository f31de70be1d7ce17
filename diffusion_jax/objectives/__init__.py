"""The training objective chosen by `diffusion.objective`: what the train step feeds the network
and which loss it takes, and which sampler family draws from the trained model.

- 'ddpm': discrete-time DDPM / improved DDPM (discrete.py): x_t = sqrt(abar_t) x0 +
  sqrt(1 - abar_t) eps at an integer t, epsilon / x0 / v targets, the hybrid loss with a learned
  variance; samplers ddpm, ddim, dpm_solver_pp, euler, heun (samplers.py).
- 'edm': Karras et al. 2022's preconditioned denoiser D(x; sigma) (edm.py).
- 'flow_matching': the linear path x_t = (1 - t) x0 + t eps with velocity targets (flow_matching.py).

The train step (train_state.py) only sees the dictionary of per-example arrays returned by
`training_example` (the network input 'x_t' at network time 't', plus the loss's targets) and
the per-example loss of `per_example_loss`; every objective shares the step, sharding,
gradient accumulation, EMA, checkpoints and evaluation.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.processes import discrete
from diffusion_jax.config.errors import check_choice

OBJECTIVES = ('ddpm', 'edm', 'flow_matching')


def _module(objective: str):
  """The module implementing a continuous-time objective (imported lazily: no cycles)."""
  if objective == 'edm':
    from diffusion_jax.objectives import edm  # pylint: disable=g-import-not-at-top
    return edm
  if objective == 'flow_matching':
    from diffusion_jax.objectives import flow_matching  # pylint: disable=g-import-not-at-top
    return flow_matching
  raise ValueError(f'diffusion.objective={objective!r} is unknown; use one of {OBJECTIVES}.')


def training_example(schedule: discrete.Schedule, diffusion_config, x0: jax.Array,
                     noise: jax.Array, key: jax.Array) -> Dict[str, jax.Array]:
  """Per-example arrays of one training batch x0 [B,H,W,C] with Gaussian `noise` like x0.

  Always holds the network input 'x_t' [B,H,W,C] and the network's time input 't' [B]; the
  rest is what `per_example_loss` of the objective reads. `key` draws the noise levels.
  """
  if diffusion_config.objective == 'ddpm':
    t = jax.random.randint(key, (x0.shape[0],), 0, schedule.num_timesteps)
    return {'x0': x0, 'noise': noise, 't': t, 'x_t': discrete.q_sample(schedule, x0, t, noise)}
  return _module(diffusion_config.objective).training_example(diffusion_config, x0, noise, key)


def per_example_loss(schedule: discrete.Schedule, diffusion_config, output: jax.Array,
                     example: Dict[str, jax.Array], learn_sigma: bool) -> jax.Array:
  """The loss [B] of the network's `output` on the `example` of `training_example`."""
  if diffusion_config.objective == 'ddpm':
    # L_simple, or with a learned variance the hybrid L_simple + lambda L_vlb.
    return discrete.training_losses(schedule, output, example['x0'], example['noise'],
                                     example['t'], example['x_t'], diffusion_config, learn_sigma)
  return _module(diffusion_config.objective).per_example_loss(diffusion_config, output, example)


def sample(apply_fn: Callable[..., jax.Array], diffusion_config, noise: jax.Array,
           rng: jax.Array, sample_config, *, labels: Optional[jax.Array] = None,
           null_label: Optional[int] = None, trajectory_every: int = 0,
           trajectory_images: Optional[int] = None):
  """Draws x0 [B,H,W,C] from x_T = `noise` with `sample_config.sampler` of the (edm or
  flow_matching) objective; the arguments and results mean what `samplers.sample_from_config`'s
  do (apply_fn(x, t [B], labels or None) -> network output; guidance from the sample config).
  """
  return _module(diffusion_config.objective).sample_from_config(
      apply_fn, diffusion_config, noise, rng, sample_config, labels=labels,
      null_label=null_label, trajectory_every=trajectory_every,
      trajectory_images=trajectory_images)


def weighted_mse(output: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """weight [B] * mean over non-batch dims of (output - target)^2, in float32: [B]."""
  err = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
  return weight * jnp.mean(err, axis=tuple(range(1, err.ndim)))


def check_objective_config(config) -> List[str]:
  """Problems with `diffusion.objective` and its fields (empty list = fine)."""
  errors: List[str] = []
  objective = config.diffusion.objective
  check_choice(errors, 'diffusion.objective', objective, OBJECTIVES)
  if objective in OBJECTIVES and objective != 'ddpm':
    errors.extend(_module(objective).check_config(config))
  return errors
