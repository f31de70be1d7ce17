"""The loop every sampler runs: one `lax.fori_loop` over the sampling steps (one XLA program),
optionally recording the trajectory of the first samples (x_t and the predicted x0)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

class Trajectory(NamedTuple):
  """Recorded every `trajectory_every` steps: x_t after the step and the x0 it used, [K, n, ...]
  for the first n = `trajectory_images` samples of the batch."""
  x_t: jax.Array
  x0: jax.Array


def run_loop(step: Callable, carry: Tuple, num_steps: int, trajectory_every: int,
          trajectory_images: Optional[int] = None):
  """Runs `step(i, carry) -> (carry, x_t, x0)` for i < num_steps in one fori_loop.

  carry[0] is the sample [B, ...]. Returns it, or (it, Trajectory) with slot j holding the records
  of the last step of chunk j = i // trajectory_every (every step writes its slot, the last write
  wins) for the first n = min(trajectory_images, B) samples: buffers [K, n, ...].
  """
  k = int(trajectory_every)
  if k < 0:
    raise ValueError(f'trajectory_every={trajectory_every} must be >= 0.')
  if k == 0:
    return jax.lax.fori_loop(0, num_steps, lambda i, c: step(i, c)[0], carry)[0]
  batch = carry[0].shape[0]
  rows = batch if trajectory_images is None else int(trajectory_images)
  if rows < 1:
    raise ValueError(f'trajectory_images={trajectory_images} must be >= 1 '
                     '(sample.animation_num_images).')
  rows = min(rows, batch)
  slots = -(-num_steps // k)
  empty = jnp.zeros((slots, rows) + carry[0].shape[1:], jnp.float32)

  def body(i, state):
    c, xs, x0s = state
    c, x_t, x0 = step(i, c)
    j = i // k
    return (c, jax.lax.dynamic_update_index_in_dim(xs, x_t[:rows], j, 0),
            jax.lax.dynamic_update_index_in_dim(x0s, x0[:rows], j, 0))

  c, xs, x0s = jax.lax.fori_loop(0, num_steps, body, (carry, empty, empty))
  return c[0], Trajectory(xs, x0s)


def step_normal(rng: jax.Array, i: jax.Array, shape) -> jax.Array:
  """Standard normal noise of loop step `i`: fold_in(rng, i), so every step draws fresh noise."""
  return jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
