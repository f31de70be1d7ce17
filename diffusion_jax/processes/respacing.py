"""Sampling on a subsequence of the training timesteps ("respacing").

`respaced_timesteps` picks which of the T training steps to keep; `respace` turns the kept steps
t_0 < t_1 < ... < t_{S-1} into a shorter `Schedule` whose forward process has the same marginals
at the kept steps:

  beta'_i = 1 - abar[t_i] / abar[t_{i-1}]   (abar[t_{-1}] = 1),   so   abar'_i = abar[t_i],

and whose `timesteps` are the kept network inputs. Every sampler then runs over all S steps of the
respaced schedule; ancestral sampling on it is the exact reverse Markov chain of the subsequence
(Nichol & Dhariwal 2021, Song et al. 2021).

Spacings (diffusers' `timestep_spacing` names and guided-diffusion's section strings). diffusers
gives linspace and leading a different meaning per scheduler, and so does `respaced_timesteps`
with its `convention` argument: 'ddim' (DDPMScheduler, DDIMScheduler) or 'dpm_solver'
(DPMSolverMultistepScheduler / DPMSolverSinglestepScheduler, whose last step goes to the clean
sample itself, so they spread S + 1 points and drop the lowest, t = 0):

                    'ddim'                              'dpm_solver'
  linspace          round(linspace(0, T - 1, S))        round(linspace(0, T - 1, S + 1))[1:]
  leading           arange(S) * (T // S)                arange(1, S + 1) * (T // (S + 1))
  trailing          round(T - arange(S) T / S) - 1, ascending, in both (last step kept)
  uniform           arange(S) * (T // S) in both: the DDIM paper's 'uniform'
  quadratic         int(linspace(0, sqrt(0.8 T), S)^2): the DDIM paper's CIFAR-10 choice
  'ddimN'           0, k, 2k, ... with the stride k giving exactly N steps
  'a,b,c'           T cut into len(sections) near-equal parts, part i evenly strided with a, b, c
                    steps (first and last step of each part kept); S = a + b + c
"""

from __future__ import annotations

import re
from typing import Optional

import jax
import numpy as np

from diffusion_jax.processes import discrete
from diffusion_jax.processes.discrete import Schedule

SPACINGS = ('linspace', 'leading', 'uniform', 'trailing', 'quadratic')
# diffusers' per-scheduler readings of linspace / leading (see the module docstring).
CONVENTIONS = ('ddim', 'dpm_solver')


def is_section_spacing(spacing: str) -> bool:
  """Whether `spacing` is a guided-diffusion string ('ddimN' or 'a,b,c') that fixes the count."""
  return spacing.startswith('ddim') or bool(re.fullmatch(r'[\d\s,]+', spacing))


def _check_steps(num_timesteps: int, steps: Optional[int]) -> int:
  if steps is None or not 0 < int(steps) <= num_timesteps:
    raise ValueError(f'sample.steps={steps} must be in [1, {num_timesteps}] '
                     '(diffusion.ddpm.num_timesteps).')
  return int(steps)


def _ddim_stride(num_timesteps: int, spacing: str) -> np.ndarray:
  """'ddimN': the first stride k with len(range(0, T, k)) == N."""
  count = spacing[len('ddim'):]
  if not count.isdigit() or int(count) < 1:
    raise ValueError(f"sample.spacing={spacing!r} must be 'ddim' followed by a positive step "
                     "count, e.g. 'ddim50'.")
  n = int(count)
  for stride in range(1, num_timesteps + 1):
    if len(range(0, num_timesteps, stride)) == n:
      return np.arange(0, num_timesteps, stride)
  raise ValueError(f'sample.spacing={spacing!r}: no stride gives exactly {n} of the '
                   f'{num_timesteps} steps (diffusion.ddpm.num_timesteps); use a section string '
                   f"such as '{n}' or another count.")


def _sections(num_timesteps: int, spacing: str) -> np.ndarray:
  """'a,b,c': part i of the near-equal split of [0, T) keeps counts[i] evenly strided steps."""
  try:
    counts = [int(c) for c in spacing.split(',')]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise ValueError(f"sample.spacing={spacing!r} must be comma-separated positive step counts "
                     "per section, e.g. '10,15,20'.")
  size, extra = divmod(num_timesteps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    part = size + (1 if i < extra else 0)
    if count > part:
      raise ValueError(f'sample.spacing={spacing!r}: section {i} has {part} of the '
                       f'{num_timesteps} steps (diffusion.ddpm.num_timesteps) and cannot keep {count}.')
    stride = (part - 1) / (count - 1) if count > 1 else 0.0
    kept.extend(start + int(round(j * stride)) for j in range(count))
    start += part
  return np.asarray(kept)


def respaced_timesteps(num_timesteps: int, steps: Optional[int], spacing: str,
                       convention: str = 'ddim') -> np.ndarray:
  """The kept training steps, ascending int32 [S].

  For the named spacings S = `steps` (in [1, T]); the guided-diffusion strings 'ddimN' and
  'a,b,c' fix S themselves and ignore `steps`. `convention` picks diffusers' reading of
  linspace / leading for the scheduler family ('ddim' or 'dpm_solver', module docstring).
  Raises ValueError naming `sample.spacing` or `sample.steps`.
  """
  if convention not in CONVENTIONS:
    raise ValueError(f'convention={convention!r} is unknown; use one of {CONVENTIONS}.')
  t = int(num_timesteps)
  if not isinstance(spacing, str):
    raise ValueError(f'sample.spacing={spacing!r} must be a string.')
  spacing = spacing.strip()
  if spacing.startswith('ddim'):
    kept = _ddim_stride(t, spacing)
  elif is_section_spacing(spacing):
    kept = _sections(t, spacing)
  elif spacing not in SPACINGS:
    raise ValueError(f"sample.spacing={spacing!r} is unknown; use one of {SPACINGS}, 'ddimN' "
                     "(e.g. 'ddim50') or section counts such as '10,15,20'.")
  else:
    s = _check_steps(t, steps)
    dpm = convention == 'dpm_solver'
    if spacing == 'linspace':
      kept = np.round(np.linspace(0, t - 1, s + 1))[1:] if dpm else np.round(
          np.linspace(0, t - 1, s))
    elif spacing == 'leading' and dpm:
      kept = np.arange(1, s + 1) * (t // (s + 1))
    elif spacing in ('leading', 'uniform'):
      kept = np.arange(s) * (t // s)
    elif spacing == 'trailing':
      kept = np.round(t - np.arange(s) * (t / s))[::-1] - 1
    else:  # quadratic
      kept = np.floor(np.linspace(0.0, np.sqrt(0.8 * t), s)**2 + 1e-9)
      # Many steps collide near 0; push each duplicate one step up (at most T - 1 at the end).
      kept = np.maximum.accumulate(kept - np.arange(s)) + np.arange(s)
  kept = np.asarray(kept).astype(np.int64)
  if (kept.ndim != 1 or kept[0] < 0 or kept[-1] >= t or np.any(np.diff(kept) <= 0)):
    raise ValueError(f'sample.spacing={spacing!r} with sample.steps={steps} gives invalid steps '
                     f'{kept.tolist()} for diffusion.ddpm.num_timesteps={t}.')
  return kept.astype(np.int32)


def alphas_cumprod64(schedule: Schedule) -> np.ndarray:
  """abar [T] in float64 with both abar and 1 - abar as precise as the schedule stores them.

  The float32 `alphas_cumprod` loses 1 - abar where abar ~ 1 (t ~ 0); there it is taken from
  `sqrt_one_minus_alphas_cumprod`^2 instead. Needs a concrete schedule.
  """
  if isinstance(schedule.alphas_cumprod, jax.core.Tracer):
    raise ValueError('respacing and sampling need a concrete schedule: close over it instead of '
                     'passing it through jit as an argument.')
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  one_minus = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)**2
  return np.where(abar > 0.5, 1.0 - one_minus, abar)


def respace(schedule: Schedule, kept_timesteps) -> Schedule:
  """The schedule of the kept indices (ascending, into `schedule`), for sampling on them.

  beta'_i = 1 - abar[t_i] / abar[t_{i-1}] (abar[t_{-1}] = 1), so alphas_cumprod' = abar[kept];
  timesteps' = schedule.timesteps[kept] (respacing a respaced schedule composes). Needs a
  concrete (not traced) schedule: build it outside jit or close over it; the result is concrete
  too, also when `respace` runs inside jit.
  """
  kept = np.asarray(kept_timesteps)
  length = schedule.num_timesteps
  if (kept.ndim != 1 or kept.size == 0 or not np.issubdtype(kept.dtype, np.integer)
      or kept[0] < 0 or kept[-1] >= length or np.any(np.diff(kept) <= 0)):
    raise ValueError(f'kept timesteps must be strictly increasing integers in [0, {length}); '
                     f'got {kept.tolist()}.')
  abar = alphas_cumprod64(schedule)[kept]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  with jax.ensure_compile_time_eval():  # Concrete arrays even when called inside jit.
    return discrete.schedule_from_betas(betas, np.asarray(schedule.timesteps)[kept])
