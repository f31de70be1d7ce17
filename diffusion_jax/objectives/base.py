"""What every objective module provides (`diffusion.objective` names one; objectives/__init__.py
registers them), and the pieces they share.

An objective is a module with these names (`Objective` spells out the signatures):

  NAME                  its `diffusion.objective` value; its fields are `config.diffusion.<NAME>`
  SAMPLERS              the `sample.sampler` names it draws with
  LIKELIHOOD_METRICS    the `eval.metrics` likelihoods it has ('ode_nll'; 'vlb' for ddpm)
  training_example      (config, x0 [B,H,W,C], noise like x0, key) -> {'x_t', 't', ...}: the
                        network input and time, plus what its loss reads
  per_example_loss      (config, output, example) -> [B]; the train step adds the batch's true
                        labels to `example` as 'label' (int32 [B]) when the data has labels
                        (never dropped to the null class: the network's labels input is)
  sample                (apply_fn, config, noise, rng, *, labels, null_label, trajectory_every,
                        trajectory_images) -> x0 [B,H,W,C] (or (x0, loop.Trajectory)), from
                        `config.sample`; apply_fn(x, t [B], labels or None) -> network output
  sampling_steps        (config) -> the sampler's steps (grid captions)
  network_evaluations   (config) -> network calls per sample, guidance not counted
  probability_flow      (apply_fn, config) -> ProbabilityFlow: the ODE of its exact likelihood
  check_config          (config) -> [error, ...]: its section and its sampler fields

Optional names (the train step and the checks work without them):

  step_metrics          (config, output, example) -> {name: (sum, count)}: extra train-step
                        metrics as a sum over the examples and their count (float32 scalars);
                        the step adds both over micro-batches and devices, the log window over
                        steps, and logs `name` = sum / count (a count of 0 weighs nothing)
  ARCHS                 the model.arch values it trains, and that no other objective may train
                        (noisy_classifier: the classifier, whose output is logits)
  USE_INSTEAD           with SAMPLERS = (): what its runs are for, in the message that refuses
                        --mode=sample / eval / export on one

An objective with SAMPLERS = () (a noisy classifier) draws no sample grid and has no sampling,
eval or export mode.

The train step, the sampling program, the likelihood evaluation and the config checks call only
these, so a new objective is one module plus one registry entry.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp

# f(s, x [B, ...]) -> dx/ds [B, ...].
Drift = Callable[[jax.Array, jax.Array], jax.Array]


class ProbabilityFlow(NamedTuple):
  """An ODE dx/ds = drift(s, x) that carries the data at s = t0 to the prior N(0, prior_std^2 I)
  at s = t1: what evaluation/likelihood.py integrates for the exact log-likelihood."""
  drift: Drift
  t0: float
  t1: float
  prior_std: float = 1.0


class Objective(Protocol):
  """The signatures of an objective module (see the module docstring)."""
  NAME: str
  SAMPLERS: Tuple[str, ...]
  LIKELIHOOD_METRICS: Tuple[str, ...]

  def training_example(self, config, x0: jax.Array, noise: jax.Array,
                       key: jax.Array) -> Dict[str, jax.Array]: ...

  def per_example_loss(self, config, output: jax.Array,
                       example: Dict[str, jax.Array]) -> jax.Array: ...

  def sample(self, apply_fn: Callable[..., jax.Array], config, noise: jax.Array,
             rng: jax.Array, *, labels: Optional[jax.Array] = None,
             null_label: Optional[int] = None, trajectory_every: int = 0,
             trajectory_images: Optional[int] = None): ...

  def sampling_steps(self, config) -> int: ...

  def network_evaluations(self, config) -> int: ...

  def probability_flow(self, apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
                       config) -> ProbabilityFlow: ...

  def check_config(self, config) -> List[str]: ...


class HasStepMetrics(Protocol):
  """The optional train-step metrics of an objective (see the module docstring)."""

  def step_metrics(self, config, output: jax.Array, example: Dict[str, jax.Array]
                   ) -> Dict[str, Tuple[jax.Array, jax.Array]]: ...


def weighted_mse(output: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """weight [B] * mean over non-batch dims of (output - target)^2, in float32: [B]."""
  err = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
  return weight * jnp.mean(err, axis=tuple(range(1, err.ndim)))
