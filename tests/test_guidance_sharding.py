"""Classifier-free guidance on a batch-sharded sampler adds no collectives.

The conditional and unconditional rows are interleaved, so each device evaluates the pair of
every row it holds; concatenating the two halves instead compiles to an all-gather plus
collective-permutes per model call. The test counts collectives in the compiled HLO of one
guided denoiser call on the 8 test devices, and checks the guided output against an unsharded
reference.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.sampling import guidance

COLLECTIVES = ('all-gather', 'all-reduce', 'collective-permute', 'all-to-all', 'reduce-scatter')


def _toy_net(x, t, y):
  """A per-row network whose output depends on the row's label and timestep."""
  scale = 1.0 + 0.1 * y.astype(jnp.float32) + 0.001 * t.astype(jnp.float32)
  return jnp.tanh(x) * scale[:, None, None, None]


def _guided(labels_null: int, scale: float):
  def fn(x, t, y):
    out, _ = guidance.make_network_fn(_toy_net, labels=y, null_label=labels_null,
                                      guidance_scale=scale, takes_labels=True)(x, t)
    return out
  return fn


def _count_collectives(hlo: str) -> int:
  return sum(len(re.findall(rf'\b{name}(-start)?\(', hlo)) for name in COLLECTIVES)


def test_guidance_keeps_rows_on_their_device_and_equals_the_formula():
  devices = np.array(jax.devices()[:8])
  mesh = Mesh(devices, ('data',))
  rows = NamedSharding(mesh, P('data'))
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 1))
  t = jnp.arange(16, dtype=jnp.int32) * 7
  y = jnp.arange(16, dtype=jnp.int32) % 5
  fn = _guided(labels_null=5, scale=3.0)
  compiled = jax.jit(fn, in_shardings=(rows, rows, rows), out_shardings=rows).lower(x, t, y).compile()
  assert _count_collectives(compiled.as_text()) == 0
  out = np.asarray(compiled(jax.device_put(x, rows), jax.device_put(t, rows),
                            jax.device_put(y, rows)))
  cond = np.asarray(_toy_net(x, t, y))
  uncond = np.asarray(_toy_net(x, t, jnp.full_like(y, 5)))
  np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), rtol=1e-6, atol=1e-6)
