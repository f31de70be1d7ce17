"""The DiT backbone (dit.py, model.arch = 'dit'): the paper's parameter counts, adaLN-Zero's zero
output, patchify / position-embedding plumbing, mixed precision and remat, FSDP on 8 devices
against one, and the config checks.

The large models are only traced (jax.eval_shape); everything that runs uses a 2-block DiT of
width 32 on 8x8 digits (configs/tiny.py with model.arch = 'dit').
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import digits_dit, imagenet64_dit  # pylint: disable=g-import-not-at-top
from diffusion_jax.config.errors import ConfigError  # pylint: disable=g-import-not-at-top
from diffusion_jax.modes import validation
from diffusion_jax.interop import diffusers
from diffusion_jax.nn import dit
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from test_distributed import assert_trees_close, build, host_batches, small_config  # pylint: disable=g-import-not-at-top


def tiny_dit_config(**model):
  """configs/tiny.py (digits 8x8x1, T = 100) with a 2-block DiT of width 32 (16 tokens);
  `model` fields named dit_<name> go to model.dit.<name>, the others to model."""
  config = small_config()
  config.model.arch = 'dit'
  config.model.num_classes = 10
  config.model.dit.update(hidden_size=32, depth=2, num_heads=2, patch_size=2, mlp_ratio=4.0,
                          pos_embed='sincos')
  config.model.dit.update({k[len('dit_'):]: v for k, v in model.items() if k.startswith('dit_')})
  config.model.update({k: v for k, v in model.items() if not k.startswith('dit_')})
  return config


def init(model, shape, labels=True, seed=0):
  x = jnp.zeros((1,) + tuple(shape), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if labels else None
  return model.init({'params': jax.random.PRNGKey(seed)}, x, jnp.zeros((1,), jnp.int32), y)[
      'params']


def randomized(params, seed=1, scale=0.2):
  """Every parameter replaced by N(0, scale^2) values, so no zero-initialised layer hides a path."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, p.shape, p.dtype)
                                   for k, p in zip(keys, leaves)])


# ------------------------------------------------------------------ parameter counts


def closed_form_count(hidden, depth, patch, tokens, in_ch=4, out_ch=8, rows=1001, mlp_ratio=4,
                      freq=256):
  """Trainable parameters of the paper's architecture, term by term (weights + biases)."""
  h, m = hidden, int(hidden * mlp_ratio)
  block = (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h) + (h * 6 * h + 6 * h)
  embed = (patch * patch * in_ch * h + h) + (freq * h + h) + (h * h + h) + rows * h
  final = (h * 2 * h + 2 * h) + (h * patch * patch * out_ch + patch * patch * out_ch)
  del tokens
  return depth * block + embed + final


# Figures in millions, rounded as the paper family reports them. 'with table' counts the fixed
# sin-cos table (N x D values) as the reference implementation does (it is an nn.Parameter with
# requires_grad=False, and its training log sums every parameter): our 'learned' position
# embedding is exactly that tensor, trainable. 'trainable' leaves the table out: our 'sincos'
# model, whose table is a constant. The published DiT-S/2, L/2 and XL/2 figures (33.0M, 458.1M,
# 675.1M) are the 'with table' counts; the 130.3M quoted for DiT-B/2 is its 'trainable' count
# (with the table it is 130.5M).
PAPER_COUNTS = {  # size: (with table, trainable)
    'S': (33.0, 32.9),
    'B': (130.5, 130.3),
    'L': (458.1, 457.8),
    'XL': (675.1, 674.8),
}


@pytest.mark.parametrize('size', ['S', 'B', 'L', 'XL'])
def test_parameter_counts_of_the_paper_sizes(size):
  """DiT-{S,B,L,XL}/2 on 32x32x4 latents, 1000 classes + the null row, learn_sigma (8 output
  channels): traced with eval_shape (nothing allocated) and counted."""
  counts = {}
  for pos in dit.POS_EMBEDDINGS:
    model = dit.DiT(**dit.DIT_SIZES[size], mlp_ratio=4.0, patch_size=2, pos_embed=pos,
                    num_classes=1000, null_class=True, learn_sigma=True, out_channels=4)
    shapes = jax.eval_shape(lambda m=model: init(m, (32, 32, 4)))
    counts[pos] = dit.count_params(shapes)
  spec = dit.DIT_SIZES[size]
  tokens = dit.num_tokens(32, 2)
  assert tokens == 256
  assert counts['sincos'] == closed_form_count(spec['hidden_size'], spec['depth'], 2, tokens)
  assert counts['learned'] - counts['sincos'] == tokens * spec['hidden_size']  # The table.
  with_table, trainable = PAPER_COUNTS[size]
  assert round(counts['learned'] / 1e6, 1) == with_table, counts
  assert round(counts['sincos'] / 1e6, 1) == trainable, counts


def test_patch_size_scales_only_the_patch_layers():
  """DiT-S/4 and /8 against S/2: the same transformer; only the patch embedding and the final linear grow
  with p^2 (the table shrinks with the token count)."""
  def count(p):
    model = dit.DiT(**dit.DIT_SIZES['S'], patch_size=p, num_classes=1000, learn_sigma=True,
                    out_channels=4)
    return dit.count_params(jax.eval_shape(lambda: init(model, (32, 32, 4))))
  h = dit.DIT_SIZES['S']['hidden_size']
  for p in (4, 8):
    assert count(p) - count(2) == (p * p - 4) * (4 * h + h * 8 + 8)


# ------------------------------------------------------------------ plumbing


def test_patchify_and_unpatchify():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  for p in (1, 2, 4):
    tokens = dit.patchify(x, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), p * p * 3)
    np.testing.assert_array_equal(dit.unpatchify(tokens, p, 8, 12), x)
    for i in range(8 // p):  # Token i * (W / p) + j is patch (i, j), flattened (row, col, c).
      for j in range(12 // p):
        np.testing.assert_array_equal(tokens[:, i * (12 // p) + j],
                                      x[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(2, -1))


def test_patch_embedding_is_a_strided_convolution():
  """The Dense on patchify(x) equals a p x p convolution with stride p (the paper's patchify)."""
  p, d = 2, 5
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (p * p * 3, d))
  dense = dit.patchify(x, p) @ kernel
  conv = jax.lax.conv_general_dilated(x, kernel.reshape(p, p, 3, d), (p, p), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(dense, conv.reshape(2, -1, d), rtol=1e-5, atol=1e-5)


def test_sincos_position_embedding_values():
  """Token (row i, col j), channel k < D/4: sin(j w_k), D/4 + k: cos(j w_k), D/2 + k: sin(i w_k),
  3D/4 + k: cos(i w_k), with w_k = 10000^(-k / (D/4))."""
  d, gh, gw = 16, 3, 5
  table = dit.sincos_2d(d, gh, gw)
  assert table.shape == (gh * gw, d) and table.dtype == np.float32
  q = d // 4
  for i in range(gh):
    for j in range(gw):
      row = table[i * gw + j]
      for k in range(q):
        w = 10000.0**(-k / q)
        np.testing.assert_allclose(
            [row[k], row[q + k], row[2 * q + k], row[3 * q + k]],
            [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)], atol=1e-6)
  with pytest.raises(ValueError, match='divisible by 4'):
    dit.sincos_2d(18, 2, 2)


def test_position_and_class_conditioning_reach_the_output():
  """With random weights: the sin-cos table is added (shifting the whole image by one patch is not
  an equivariance), y=None is the null class, and remat / bfloat16 keep the function."""
  config = tiny_dit_config()
  model = backbones.create_model(config.model, 1)
  params = randomized(init(model, (8, 8, 1)))
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
  t = jnp.array([3, 50, 99])
  y = jnp.array([1, 4, 7])
  apply = jax.jit(lambda p, x, y: model.apply({'params': p}, x, t, y))
  out = apply(params, x, y)
  assert np.abs(out).max() > 1e-3
  null = apply(params, x, jnp.full((3,), 10))
  np.testing.assert_array_equal(jax.jit(lambda p: model.apply({'params': p}, x, t, None))(params),
                                null)
  assert np.abs(out - null).max() > 1e-4  # The label reaches the output.
  # Without position information the network would commute with rolling the image by a patch.
  rolled = apply(params, jnp.roll(x, 2, axis=2), y)
  assert np.abs(rolled - jnp.roll(out, 2, axis=2)).max() > 1e-3

  def grad_qkv(m):
    loss = lambda p: jnp.mean(jnp.square(m.apply({'params': p}, x, t, y)))
    return jax.jit(jax.grad(loss))(params)['block_0']['qkv']['kernel']
  remat_model = dit.create(_with(config.model, remat=True), 1)
  np.testing.assert_allclose(grad_qkv(model), grad_qkv(remat_model), rtol=1e-5, atol=1e-6)
  bf16 = dit.create(_with(config.model, dtype='bfloat16'), 1)
  out16 = jax.jit(lambda p: bf16.apply({'params': p}, x, t, y))(params)
  assert out16.dtype == jnp.float32
  assert np.abs(out16 - out).max() < 0.05 * np.abs(out).max()
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(jax.eval_shape(lambda: init(bf16, (8, 8, 1)))))


def _with(model_config, **fields):
  cfg = model_config.copy_and_resolve_references()
  cfg.update(fields)
  return cfg


# ------------------------------------------------------------------ adaLN-Zero and FSDP


@pytest.fixture(scope='module')
def one_device_run():
  """Initial params, the state after 2 train steps on 1 device (tiny class-conditional DiT,
  learn_sigma, hybrid loss), their losses and batches, and the params after the first step."""
  config = tiny_dit_config(learn_sigma=True)
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  state, step = build(config, mesh)
  initial = jax.device_get(state.params)
  batches = host_batches(2, 16)
  losses, params = [], []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    losses.append(float(metrics['loss']))
    params.append(jax.device_get(state.params))
  return config, initial, jax.device_get(state), losses, batches, params[0]


def test_adaln_zero_fresh_output_is_exactly_zero(one_device_run):
  config, initial, _, _, _, after_one_step = one_device_run
  model = backbones.create_model(config.model, config.data.channels)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1))
  t = jnp.array([0, 10, 50, 99])
  for y in (jnp.array([0, 3, 9, 10]), None):
    out = model.apply({'params': initial}, x, t, y)
    assert out.shape == (4, 8, 8, 2)
    np.testing.assert_array_equal(out, np.zeros_like(out))
  # Every block is the identity at init: its gates (part of adaLN_modulation) are zero.
  assert not np.any(initial['block_0']['adaLN_modulation']['kernel'])
  out = model.apply({'params': after_one_step}, x, t, jnp.array([0, 3, 9, 10]))
  assert np.abs(out).max() > 1e-4  # One optimizer step moves the zero-initialised final layer.
  assert np.any(after_one_step['final_linear']['kernel'])


def test_fsdp_8_devices_equals_1_device(one_device_run):
  """fsdp=8 (weights, EMA and Adam moments split 8 ways) gives the 1-device losses and params."""
  config, initial, ref, ref_losses, batches, _ = one_device_run
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = 1, 8, 256
  mesh = sharding.create_mesh(config.mesh)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 8}
  state, step = build(config, mesh)
  assert_trees_close(state.params, initial, 0, 0)
  qkv = state.params['block_0']['qkv']['kernel']  # [32, 96]: split along the 96 outputs.
  assert 'fsdp' in tuple(qkv.sharding.spec)
  assert all(s.data.size * 8 == qkv.size for s in qkv.addressable_shards)
  big = [x for x in jax.tree.leaves(state.params) if x.size >= 256]
  assert all(x.addressable_shards[0].data.size * 8 == x.size for x in big)
  for b, ref_loss in zip(batches, ref_losses):
    state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(float(metrics['loss']), ref_loss, rtol=1e-5)
  assert_trees_close(state.params, ref.params, rtol=1e-5, atol=1e-5)
  assert_trees_close(state.ema_params, ref.ema_params, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ config checks


def _errors(config, num_devices=1):
  with pytest.raises(ConfigError) as e:
    validation.validate_config(config, 'sample', num_devices=num_devices)
  return str(e.value)


def test_config_checks_name_the_field():
  config = tiny_dit_config(dit_patch_size=3)
  message = _errors(config)
  assert 'model.dit.patch_size=3' in message and 'data.resolution=8' in message
  config = tiny_dit_config(dit_hidden_size=30, dit_num_heads=4)
  message = _errors(config)
  assert 'model.dit.hidden_size=30' in message and 'model.dit.num_heads=4' in message
  assert 'divisible by 4' in message  # The sin-cos table too.
  config = tiny_dit_config(dit_pos_embed='rope')
  assert "model.dit.pos_embed='rope'" in _errors(config)
  config = tiny_dit_config(arch='vit')
  assert "model.arch='vit' is unknown" in _errors(config)
  with pytest.raises(ValueError, match='model.arch'):
    backbones.create_model(config.model, 1)
  # U-Net fields do not constrain a DiT (and the other way round): a ch_mult the 8x8 images
  # cannot take is fine for arch 'dit', an error for 'unet'.
  config = tiny_dit_config()
  config.model.unet.ch_mult = (1, 2, 2, 2, 2)
  validation.validate_config(config, 'sample', num_devices=1)
  config.model.arch = 'unet'
  assert 'model.unet.ch_mult' in _errors(config)
  # The diffusers export is a UNet2DModel: a DiT run is refused before anything is read.
  with pytest.raises(diffusers.ConversionError, match="model.arch='dit'"):
    diffusers.diffusers_configs(tiny_dit_config())


def test_shipped_dit_configs_validate():
  config = digits_dit.get_config()
  validation.validate_config(config, 'train', num_devices=1)
  assert config.model.arch == 'dit'
  config = imagenet64_dit.get_config()
  validation.validate_config(config, 'train', num_devices=64)
  validation.validate_config(config, 'sample', num_devices=8)
