"""Several EMAs of the parameters at once, EDM2's power-function EMA and post-hoc EMA fitting.

The train state always holds the primary EMA `ema_params` (decay `optim.ema_decay`). Extra
EMAs, configured in `optim`, live in the state's `extra_emas` dict, float32 and in the
parameters' FSDP shardings, updated in the same compiled step:

* `optim.ema_decays`: constant decays d (with `optim.ema_warmup`'s min(d, (1+n)/(10+n)) like
  the primary), e <- d e + (1 - d) theta. Name 'decay:<d>', state key 'decay_<d>'.
* `optim.ema_sigma_rels`: power-function EMAs of Karras et al. 2024 ("Analyzing and Improving
  the Training Dynamics of Diffusion Models", Sec. 3), tracked for each relative standard
  deviation sigma_rel. Name 'sigma_rel:<s>', state key 'sigma_rel_<s>'.

Power-function EMA. After update t = 1, 2, ... (theta_t = the parameters after update t) the
EMA is e_t = beta_t e_{t-1} + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1). Since
prod_{s=tau+1..t} beta_s = (tau / t)^(gamma + 1), it is exactly the weighted sum

    e_t = sum_{tau=1..t} w_tau(t) theta_tau,   w_tau(t) = (tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1),

(weights summing to 1), the discrete version of the paper's profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. The profile's standard deviation
relative to t is

    sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))

(mean (gamma+1)/(gamma+2) t, second moment (gamma+1)/(gamma+3) t^2). It falls monotonically
from 1 / (2 sqrt 3) ~ 0.2887 at gamma = 0 to 0 as gamma -> infinity; `sigma_rel_to_gamma`
inverts it by bisection on gamma > 0 (sigma_rel = 0.05 -> gamma = 16.97, 0.10 -> 6.94).

Post-hoc EMA (paper Sec. 3.2, App. C). Snapshots of the power EMAs saved every
`optim.ema_snapshot_every_steps` are power EMAs with known (gamma_i, t_i). Any target profile
(gamma_r, t_r) is approximated by sum_i x_i p_i; x minimises || sum_i x_i p_i - p_r ||^2, i.e.
solves the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r>. The inner products
are either the exact discrete sums over training steps of the weights above ('discrete', what
our update computes) or the paper's closed form of the continuous profiles ('continuous'):
<p_i, p_j> = (g_i + 1)(g_j + 1) m^(g_i + g_j + 1) / ((g_i + g_j + 1) t_i^(g_i+1) t_j^(g_j+1)),
m = min(t_i, t_j). The reconstructed parameters are sum_i x_i snapshot_i.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

DECAY = 'decay'
SIGMA_REL = 'sigma_rel'
POSTHOC = 'posthoc'
SIGMA_REL_MAX = 1.0 / (2.0 * math.sqrt(3.0))  # sigma_rel at gamma = 0.
PROFILE_KINDS = ('discrete', 'continuous')


# ------------------------------------------------------------------ sigma_rel <-> gamma


def gamma_to_sigma_rel(gamma: float) -> float:
  """Relative standard deviation of the power-function profile of exponent `gamma`."""
  gamma = float(gamma)
  return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent gamma > 0 whose profile has relative std `sigma_rel` in (0, 1/(2 sqrt 3)).

  sigma_rel(gamma) is monotonically decreasing on gamma > 0 (and ~1/gamma for large gamma), so
  bisection on [0, 2/sigma_rel + 10] converges to float64 precision.
  """
  sigma_rel = float(sigma_rel)
  if not 0.0 < sigma_rel < SIGMA_REL_MAX:
    raise ValueError(f'sigma_rel={sigma_rel} must be in (0, {SIGMA_REL_MAX:.4f}) (gamma > 0).')
  lo, hi = 0.0, 2.0 / sigma_rel + 10.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if gamma_to_sigma_rel(mid) > sigma_rel:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-13 * max(1.0, hi):
      break
  return 0.5 * (lo + hi)


def power_beta(t: jax.Array, gamma: float) -> jax.Array:
  """beta_t = (1 - 1/t)^(gamma + 1) for the 1-based update count t (beta_1 = 0)."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def _power_weight(t: jax.Array, gamma: float) -> jax.Array:
  """1 - beta_t, computed without cancellation (1 - 1/t loses digits in float32 for large t)."""
  t = jnp.asarray(t, jnp.float32)
  return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))


# ------------------------------------------------------------------ the EMAs of a config


@dataclasses.dataclass(frozen=True)
class EmaSpec:
  """One extra EMA: kind 'decay' (constant decay `value`) or 'sigma_rel' (power EMA)."""
  kind: str
  value: float

  @property
  def name(self) -> str:
    """What `sample.ema` / `eval.ema` call it: 'decay:0.999', 'sigma_rel:0.05'."""
    return f'{self.kind}:{self.value!r}'

  @property
  def key(self) -> str:
    """Its key in `TrainState.extra_emas` and in checkpoints (no dots: orbax joins keys by '.')."""
    return state_key(self.kind, self.value)

  @property
  def gamma(self) -> float:
    return sigma_rel_to_gamma(self.value)


def state_key(kind: str, value: float) -> str:
  """'decay_0p999', 'sigma_rel_0p05': the dict key of an EMA of `kind` with `value`."""
  return f'{kind}_{float(value)!r}'.replace('.', 'p').replace('-', 'm')


def ema_specs(optim_config) -> Tuple[EmaSpec, ...]:
  """The extra EMAs `optim.ema_decays` and `optim.ema_sigma_rels` ask for, in that order."""
  return (tuple(EmaSpec(DECAY, float(d)) for d in optim_config.ema_decays) +
          tuple(EmaSpec(SIGMA_REL, float(s)) for s in optim_config.ema_sigma_rels))


def ema_keys(optim_config) -> Tuple[str, ...]:
  """State keys of the extra EMAs of `optim_config` (empty: the state has no extra EMAs)."""
  return tuple(spec.key for spec in ema_specs(optim_config))


def power_specs(optim_config) -> Tuple[EmaSpec, ...]:
  """The power-function EMAs (those snapshotted for post-hoc reconstruction)."""
  return tuple(s for s in ema_specs(optim_config) if s.kind == SIGMA_REL)


def init_emas(params: PyTree, keys: Sequence[str]) -> Dict[str, PyTree]:
  """{key: float32 copy of params} for each key (an EMA starts at the parameters)."""
  return {key: jax.tree.map(lambda p: p.astype(jnp.float32), params) for key in keys}


def update_emas(emas: Dict[str, PyTree], params: PyTree, step: jax.Array,
                specs: Sequence[EmaSpec], decay_at: Callable[[float], jax.Array]
                ) -> Dict[str, PyTree]:
  """One update of every extra EMA with the parameters after applied update number `step`
  (0-based: TrainState.num_updates, which a skipped non-finite step does not advance, so the
  profiles are those of the applied updates that `solve_posthoc` assumes).

  Constant decays: e <- d e + (1 - d) theta with d = decay_at(value) (the primary EMA's rule,
  `train_state.ema_decay_at`). Power EMAs: e <- beta_t e + (1 - beta_t) theta, t = step + 1.
  Everything is float32.
  """
  out = {}
  t = jnp.asarray(step, jnp.float32) + 1.0
  for spec in specs:
    if spec.kind == DECAY:
      keep = decay_at(spec.value)
      take = 1.0 - keep
    else:
      gamma = spec.gamma
      keep, take = power_beta(t, gamma), _power_weight(t, gamma)
    out[spec.key] = jax.tree.map(
        lambda e, p, keep=keep, take=take: (keep * e + take * p.astype(jnp.float32)
                                            ).astype(e.dtype),
        emas[spec.key], params)
  return out


# ------------------------------------------------------------------ profiles and least squares


def power_profile(t: int, gamma: float, num_steps: int) -> np.ndarray:
  """Discrete weights w_tau(t) of a power EMA at step t over tau = 1..num_steps (float64).

  w_tau = (tau/t)^(g+1) - ((tau-1)/t)^(g+1) for tau <= t, 0 after; sum = 1. Computed as
  (tau/t)^(g+1) * (1 - (1 - 1/tau)^(g+1)) with expm1/log1p (no cancellation).
  """
  return _profile_rows(np.asarray([t], np.float64), np.asarray([gamma], np.float64),
                       1, num_steps)[0]


def _profile_rows(times: np.ndarray, gammas: np.ndarray, start: int, stop: int) -> np.ndarray:
  """[K, stop - start + 1] discrete weights of K power EMAs at tau = start..stop."""
  tau = np.arange(start, stop + 1, dtype=np.float64)[None, :]
  t, g1 = times[:, None], gammas[:, None] + 1.0
  with np.errstate(divide='ignore'):
    log_step = np.log1p(-1.0 / tau)  # -inf at tau = 1: the whole first weight (tau/t)^(g+1).
  w = np.exp(g1 * np.log(tau / t)) * -np.expm1(g1 * log_step)
  return np.where(tau <= t, w, 0.0)


def discrete_inner_products(times: Sequence[float], gammas: Sequence[float],
                            chunk: int = 1 << 16) -> np.ndarray:
  """Gram matrix [K, K] of the discrete profiles, sum_tau w_i(tau) w_j(tau), in chunks of tau."""
  times = np.asarray(times, np.float64)
  gammas = np.asarray(gammas, np.float64)
  gram = np.zeros((len(times), len(times)), np.float64)
  last = int(times.max())
  for start in range(1, last + 1, chunk):
    rows = _profile_rows(times, gammas, start, min(start + chunk - 1, last))
    gram += rows @ rows.T
  return gram


def continuous_inner_products(times: Sequence[float], gammas: Sequence[float]) -> np.ndarray:
  """Gram matrix [K, K] of the continuous profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t]
  (the paper's closed form, in logs to stay finite for large t and gamma)."""
  t = np.asarray(times, np.float64)
  g = np.asarray(gammas, np.float64)
  ti, tj, gi, gj = t[:, None], t[None, :], g[:, None], g[None, :]
  m = np.minimum(ti, tj)
  log = (np.log(gi + 1) + np.log(gj + 1) + (gi + gj + 1) * np.log(m) - np.log(gi + gj + 1)
         - (gi + 1) * np.log(ti) - (gj + 1) * np.log(tj))
  return np.exp(log)


def solve_posthoc(snapshot_times: Sequence[int], snapshot_gammas: Sequence[float],
                  target_time: int, target_gamma: float, kind: str = 'discrete'
                  ) -> Tuple[np.ndarray, float]:
  """(weights x [K], relative fit error) of the target profile from K snapshot profiles.

  x solves the least-squares normal equations A x = b (A: Gram matrix of the snapshots'
  profiles, b: their inner products with the target's; `np.linalg.lstsq`, float64). The error
  is || sum_i x_i p_i - p_r || / || p_r ||, the L2 distance of the profiles.
  """
  if kind not in PROFILE_KINDS:
    raise ValueError(f'kind={kind!r} must be one of {PROFILE_KINDS}.')
  times = np.concatenate([np.asarray(snapshot_times, np.float64), [float(target_time)]])
  gammas = np.concatenate([np.asarray(snapshot_gammas, np.float64), [float(target_gamma)]])
  gram = (discrete_inner_products(times, gammas) if kind == 'discrete'
          else continuous_inner_products(times, gammas))
  a, b, rr = gram[:-1, :-1], gram[:-1, -1], gram[-1, -1]
  x = np.linalg.lstsq(a, b, rcond=None)[0]
  residual = max(float(x @ a @ x - 2.0 * x @ b + rr), 0.0)
  return x, math.sqrt(residual / rr)


def weighted_sum(trees: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
  """sum_i weights[i] * trees[i] in float32 (host-side helper for small trees and tests)."""
  return jax.tree.map(lambda *xs: sum(np.float32(w) * np.asarray(x, np.float32)
                                      for w, x in zip(weights, xs)), *trees)


# ------------------------------------------------------------------ config


def parse_selection(name: str) -> Tuple[str, float]:
  """'decay:0.999' -> ('decay', 0.999); '' -> ('', 0.0) (the primary EMA). Raises ValueError."""
  if not name:
    return '', 0.0
  kind, sep, value = name.partition(':')
  if not sep or kind not in (DECAY, SIGMA_REL, POSTHOC):
    raise ValueError(f'{name!r} is not an EMA name')
  return kind, float(value)


def _check_selection(errors: List[str], field: str, name: str, optim_config) -> None:
  """`field` (sample.ema / eval.ema) names the primary EMA, one of optim's, or a posthoc one."""
  try:
    kind, value = parse_selection(name)
  except ValueError:
    errors.append(f"{field}={name!r} must be '' (optim.ema_decay), 'decay:<d>' (one of "
                  "optim.ema_decays), 'sigma_rel:<s>' (one of optim.ema_sigma_rels) or "
                  "'posthoc:<s>' (written by --mode=posthoc_ema).")
    return
  if kind == DECAY and value not in [float(d) for d in optim_config.ema_decays]:
    errors.append(f'{field}={name!r} is not among the run\'s optim.ema_decays='
                  f'{tuple(optim_config.ema_decays)}.')
  elif kind == SIGMA_REL and value not in [float(s) for s in optim_config.ema_sigma_rels]:
    errors.append(f'{field}={name!r} is not among the run\'s optim.ema_sigma_rels='
                  f'{tuple(optim_config.ema_sigma_rels)}; reconstruct it with '
                  f'--mode=posthoc_ema --config.posthoc_ema.sigma_rel={value} and select '
                  f"'posthoc:{value}'.")
  elif kind == POSTHOC and not 0.0 < value < SIGMA_REL_MAX:
    errors.append(f'{field}={name!r}: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}).')


def check_ema_config(config, mode: str) -> List[str]:
  """Problems with the EMA fields `mode` reads: optim.ema_decays / ema_sigma_rels /
  ema_snapshot_every_steps (train), sample.ema (sample, export, eval drawing samples), eval.ema
  (eval), posthoc_ema.* (posthoc_ema)."""
  errors: List[str] = []
  ocfg = config.optim
  if mode == 'train':
    decays = [float(d) for d in ocfg.ema_decays]
    for d in decays:
      if not 0.0 < d < 1.0:
        errors.append(f'optim.ema_decays contains {d}; every decay must be in (0, 1).')
    sigma_rels = [float(s) for s in ocfg.ema_sigma_rels]
    for s in sigma_rels:
      if not 0.0 < s < SIGMA_REL_MAX:
        errors.append(f'optim.ema_sigma_rels contains {s}; every sigma_rel must be in (0, '
                      f'{SIGMA_REL_MAX:.4f}) (EDM2 uses (0.05, 0.1)).')
    for field, values in (('ema_decays', decays), ('ema_sigma_rels', sigma_rels)):
      if len(set(values)) != len(values):
        errors.append(f'optim.{field}={tuple(values)} lists a value twice.')
    every = ocfg.ema_snapshot_every_steps
    if every < 0:
      errors.append(f'optim.ema_snapshot_every_steps={every} must be >= 0 (0 = no snapshots).')
    elif every > 0 and not sigma_rels:
      errors.append(f'optim.ema_snapshot_every_steps={every} saves snapshots of the power EMAs, '
                    'but optim.ema_sigma_rels is empty; set e.g. (0.05, 0.1).')
    k = config.training.steps_per_call
    if every > 0 and k > 1 and every % k:
      errors.append(f'optim.ema_snapshot_every_steps={every} must be a multiple of '
                    f'training.steps_per_call={k}.')
  if mode in ('sample', 'eval', 'export'):
    _check_selection(errors, 'sample.ema', config.sample.ema, ocfg)
    if not config.sample.use_ema and config.sample.ema:
      errors.append(f'sample.ema={config.sample.ema!r} needs sample.use_ema=True.')
  if mode == 'eval':
    _check_selection(errors, 'eval.ema', config.eval.ema, ocfg)
    if not config.eval.use_ema and config.eval.ema:
      errors.append(f'eval.ema={config.eval.ema!r} needs eval.use_ema=True.')
  if mode == 'posthoc_ema':
    pcfg = config.posthoc_ema
    if not 0.0 < pcfg.sigma_rel < SIGMA_REL_MAX:
      errors.append(f'posthoc_ema.sigma_rel={pcfg.sigma_rel} must be in (0, '
                    f'{SIGMA_REL_MAX:.4f}); set --config.posthoc_ema.sigma_rel=<target>, e.g. '
                    '0.08.')
    if pcfg.step == 0 or pcfg.step < -1:
      errors.append(f'posthoc_ema.step={pcfg.step} must be -1 (the newest snapshot) or a '
                    'positive training step.')
    if pcfg.profile not in PROFILE_KINDS:
      errors.append(f'posthoc_ema.profile={pcfg.profile!r} must be one of {PROFILE_KINDS}.')
  return errors
