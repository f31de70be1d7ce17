"""Why `training.steps_per_call > 1` was ~19x slower on CPU: a convolution's weight gradient
inside an XLA:CPU while loop (lax.scan / fori_loop) is tens of times slower than the same
convolution outside one; the input gradient and the forward are not affected much.

  python benchmarks/scan_backward_cpu.py

Prints one JSON line of milliseconds per call: forward, grad wrt weights, grad wrt input, each
alone, in a 4-step lax.scan, and in the same scan unrolled.
"""

import json
import time

import jax
import jax.numpy as jnp

x = jnp.ones((64, 8, 8, 64))
w = jnp.ones((3, 3, 64, 64)) * 0.01
conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def grad_w(w, x):
  return jnp.sum(jax.grad(lambda w: jnp.sum(conv(w, x) ** 2))(w))


def grad_x(w, x):
  return jnp.sum(jax.grad(lambda x: jnp.sum(conv(w, x) ** 2))(x))


def ms_per_call(f, seconds: float = 2.0) -> float:
  f = jax.jit(f)
  jax.block_until_ready(f(w, x))
  start, n = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(f(w, x))
    n += 1
  return round((time.perf_counter() - start) / n * 1e3, 2)


def main() -> None:
  results = {'backend': jax.default_backend()}
  for name, g in [('forward', lambda w, x: jnp.sum(conv(w, x))), ('grad_w', grad_w),
                  ('grad_x', grad_x)]:
    for form, unroll in (('scan4', 1), ('unrolled4', True)):
      body = lambda c, _, g=g: (c + g(w, x + c), None)
      results[f'{name}_{form}_ms'] = ms_per_call(
          lambda w, x, body=body, unroll=unroll: jax.lax.scan(body, 0.0, None, length=4,
                                                              unroll=unroll)[0])
    results[f'{name}_x1_ms'] = ms_per_call(g)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
