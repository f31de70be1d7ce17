"""3x3 convolutions on the CPU: XLA's, an im2col matmul, oneDNN's custom call (direct and
Winograd), and PyTorch's.

  python benchmarks/conv_formulations_cpu.py                       # per-layer, U-Net shapes
  python benchmarks/conv_formulations_cpu.py --whole_model=digits  # the digits U-Net's gradient

Per layer (NHWC, C -> C channels, 'SAME' padding) it times the forward, the input gradient and
the weight gradient of `lax.conv_general_dilated` and of the same convolution written as nine
shifted slices concatenated on channels and one matmul (im2col), of `model.conv_backend='onednn'`'s
and `'onednn_winograd'`'s custom calls when oneDNN is installed
(`diffusion_jax/contrib/onednn/conv.py`; the Winograd rule may leave a small layer direct), and,
when torch is installed, torch's Conv2d forward and forward + backward (oneDNN) on as many
threads as JAX's CPU client.
With --whole_model it instead times the loss gradient of a whole U-Net config with its
convolutions swapped for the im2col form (through flax's `nn.Conv(conv_general_dilated=...)`),
strictly alternating. One JSON line per shape or per variant; median milliseconds.
"""

import functools
import json
import os
import sys
import time
from typing import Callable, Dict, List

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SHAPES = flags.DEFINE_list(
    'shapes', ['64x8x32', '64x8x64', '64x4x64', '16x32x128', '16x16x256', '16x8x256'],
    'batch x side x channels per layer (the digits U-Net at batch 64, cifar10_ddpm at 16).')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Timed calls per measurement.')
_WHOLE = flags.DEFINE_enum('whole_model', '', ['', 'digits', 'cifar10_ddpm'],
                           'Time a whole U-Net gradient instead of single layers.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch for --whole_model.')


def conv_xla(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_im2col(x, w, window_strides=(1, 1), padding='SAME', lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                precision=None) -> jax.Array:
  """`lax.conv_general_dilated`'s NHWC/HWIO case as shifted slices + one matmul."""
  del lhs_dilation, rhs_dilation, dimension_numbers  # Undilated NHWC/HWIO only.
  assert feature_group_count == 1
  kh, kw, cin, cout = w.shape
  b, h, wd, _ = x.shape
  sh, sw = window_strides
  if isinstance(padding, str):  # 'SAME': XLA's split of the total padding.
    pads = []
    for k, s, n in ((kh, sh, h), (kw, sw, wd)):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
  else:
    pads = [tuple(p) for p in padding]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (h + sum(pads[0]) - kh) // sh + 1
  wo = (wd + sum(pads[1]) - kw) // sw + 1
  cols = [lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)
  return jnp.einsum('bhwk,kd->bhwd', patches, w.reshape(kh * kw * cin, cout), precision=precision)


def conv_onednn(x: jax.Array, w: jax.Array, winograd: bool = False) -> jax.Array:
  from diffusion_jax.contrib.onednn import conv as onednn_conv  # pylint: disable=g-import-not-at-top
  return onednn_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                          winograd=winograd)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return round(1000 * float(np.median(times)), 3)


def layer_rows(repeats: int) -> List[Dict[str, object]]:
  rows = []
  for spec in _SHAPES.value:
    b, side, c = (int(v) for v in spec.split('x'))
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (b, side, side, c))
    w = jax.random.normal(k[1], (3, 3, c, c)) * 0.1
    gy = jax.random.normal(k[2], (b, side, side, c))
    row: Dict[str, object] = {'benchmark': 'conv_layer', 'batch': b, 'side': side, 'channels': c}
    from diffusion_jax.contrib.onednn import conv as onednn_conv  # pylint: disable=g-import-not-at-top
    convs = [('xla', conv_xla), ('im2col', conv_im2col)]
    if onednn_conv.unavailable_reason() is None:
      convs.append(('onednn', conv_onednn))
      convs.append(('winograd', functools.partial(conv_onednn, winograd=True)))
    for name, conv in convs:
      fwd = jax.jit(conv)
      dx = jax.jit(lambda x, w, gy, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](gy)[0])
      dw = jax.jit(lambda x, w, gy, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](gy)[0])
      row[f'{name}_fwd_ms'] = median_ms(lambda: fwd(x, w), repeats)
      row[f'{name}_dx_ms'] = median_ms(lambda: dx(x, w, gy), repeats)
      row[f'{name}_dw_ms'] = median_ms(lambda: dw(x, w, gy), repeats)
    for name, _ in convs:
      row[f'{name}_total_ms'] = round(sum(row[f'{name}_{part}_ms'] for part in ('fwd', 'dx', 'dw')),
                                      3)
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      rows.append(row)
      continue
    torch.set_num_threads(os.cpu_count() or 1)
    tconv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    tx = torch.randn(b, c, side, side, requires_grad=True)
    tgy = torch.randn(b, c, side, side)

    def torch_fwd():
      with torch.no_grad():
        return tconv(tx)

    def torch_both():
      tconv(tx).backward(tgy)

    row['torch_fwd_ms'] = median_ms(torch_fwd, repeats)
    row['torch_total_ms'] = median_ms(torch_both, repeats)
    for name, _ in convs:
      row[f'{name}_over_torch_total'] = round(row[f'{name}_total_ms'] / row['torch_total_ms'], 3)
    rows.append(row)
  return rows


def whole_model_rows(config_name: str, batch: int, repeats: int) -> List[Dict[str, object]]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import cifar10_ddpm, digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax.nn import unet  # pylint: disable=g-import-not-at-top
  from diffusion_jax.nn import backbones
  config = {'digits': digits, 'cifar10_ddpm': cifar10_ddpm}[config_name].get_config()
  res, ch = config.data.resolution, config.data.channels
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, res, res, ch))
  t = jnp.arange(batch) % config.diffusion.ddpm.num_timesteps
  original = unet._conv  # pylint: disable=protected-access
  grads, params = {}, None
  try:
    for variant in ('xla', 'im2col'):
      impl = None if variant == 'xla' else conv_im2col

      def conv(features, module, kernel=3, stride=1, zero_init=False, name=None,
               padding='SAME', impl=impl):
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                       dtype=module.dtype, param_dtype=module.param_dtype, name=name,
                       kernel_init=(nn.initializers.zeros if zero_init
                                    else nn.initializers.lecun_normal()),
                       conv_general_dilated=impl)

      unet._conv = conv  # pylint: disable=protected-access
      model = backbones.create_model(config.model, ch)
      rngs = {'params': jax.random.PRNGKey(1), 'dropout': jax.random.PRNGKey(2)}
      params = params if params is not None else model.init(rngs, x, t)

      def loss(p, model=model):
        out = model.apply(p, x, t, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
        return jnp.mean((out - x) ** 2)

      # Compiled here: tracing reads unet._conv, which is restored below.
      grads[variant] = jax.jit(jax.grad(loss)).lower(params).compile()
  finally:
    unet._conv = original  # pylint: disable=protected-access
  reference = grads['xla'](params)
  other = grads['im2col'](params)
  max_rel = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
                for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other)))
  times: Dict[str, List[float]] = {v: [] for v in grads}
  for _ in range(repeats):  # Strict alternation: load hits both alike.
    for variant, fn in grads.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params))
      times[variant].append(time.perf_counter() - t0)
  base = float(np.median(times['xla']))
  return [{'benchmark': 'conv_whole_model', 'config': config_name, 'batch_size': batch,
           'variant': v, 'grad_ms': round(1000 * float(np.median(ts)), 2),
           'speedup_vs_xla': round(base / float(np.median(ts)), 3),
           'max_rel_grad_difference': max_rel} for v, ts in times.items()]


def main(argv):
  del argv
  rows = (whole_model_rows(_WHOLE.value, _BATCH.value, _REPEATS.value) if _WHOLE.value
          else layer_rows(_REPEATS.value))
  for row in rows:
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
