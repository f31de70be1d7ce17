"""The U-Net: parameter count, init, conditioning, dropout, variants, precision, remat, embeddings.

XLA:CPU compiles dominate the run time here, so the tests share one small model (two resolution
levels, attention at 4x4) and one batch holding every input variation, build variants'
parameters from `jax.eval_shape` instead of running their initialisers, draw random values with
NumPy, and compile with LLVM's expensive passes off (`fast_jit`; the shapes are tiny).
"""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffusion_jax.nn import layers
from diffusion_jax.nn import unet
from diffusion_jax.nn import backbones

NUM_CLASSES = 5
SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8,
             num_classes=NUM_CLASSES, dropout=0.1, out_channels=3)
X_SHAPE = (3, 8, 8, 3)

_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def fast_jit(fn):
  """`jax.jit(fn)` compiled with cheap XLA:CPU options, cached per argument signature."""
  jitted = jax.jit(fn)
  cache = {}

  def call(*args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in cache:
      lowered = jitted.lower(*args)
      try:
        cache[key] = lowered.compile(compiler_options=_FAST_COMPILE)
      except Exception:  # pylint: disable=broad-except  # Options unknown to this XLA version.
        cache[key] = lowered.compile()
    return cache[key](*args)
  return call


def small_model(**overrides):
  return unet.UNet(**{**SMALL, **overrides})


def _x(seed=0, shape=X_SHAPE):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


T_IN = jnp.array([0, 250, 999], jnp.int32)
Y_IN = jnp.array([0, 3, 1], jnp.int32)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _param_shapes(model, x_shape=X_SHAPE, **kwargs):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32)
  return jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), x, t)['params']


def _noise_like(shapes, seed):
  """Random leaves with init-like scales: kernels ~ N(0, 1/fan_in), others ~ N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, leaf in leaves:
    z = rng.normal(size=leaf.shape)
    z = z / np.sqrt(np.prod(leaf.shape[:-1])) if path[-1].key == 'kernel' else 0.1 * z
    out.append(jnp.asarray(z, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _random_params(shapes, seed):
  """Parameters away from any zero init: init-like random kernels, GroupNorm scales near 1."""
  noise = _noise_like(shapes, seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(noise)
  return jax.tree_util.tree_unflatten(
      treedef, [z + 1.0 if path[-1].key == 'scale' else z for path, z in leaves])


@functools.lru_cache(maxsize=None)
def _apply_fn(model, train):
  if train:
    return fast_jit(lambda p, x, t, y, key: model.apply(
        {'params': p}, x, t, y, train=True, rngs={'dropout': key}))
  return fast_jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y))


def _apply(model, params, x, t, y=None, dropout_key=None):
  """model.apply in eval mode, or in training mode when a dropout key is given."""
  if dropout_key is None:
    return _apply_fn(model, False)(params, x, t, y)
  return _apply_fn(model, True)(params, x, t, y, dropout_key)


# One batch that holds every variation the conditioning tests need (examples do not interact,
# which test_output_depends_on_t_and_class checks), so the small model compiles only once:
#   rows 0-2: reference (x, t, y); 3-5: t + 7; 6-8: y + 1; 9-11: null class; 12-14: x[2] negated.
_X3 = _x()
X_ALL = jnp.concatenate([_X3, _X3, _X3, _X3, _X3.at[2].set(-_X3[2])])
T_ALL = jnp.concatenate([T_IN, T_IN + 7, T_IN, T_IN, T_IN])
Y_ALL = jnp.concatenate([Y_IN, Y_IN, (Y_IN + 1) % NUM_CLASSES,
                         jnp.full((3,), NUM_CLASSES, jnp.int32), Y_IN])
REF, T7, Y1, NULL, X2 = (slice(3 * i, 3 * i + 3) for i in range(5))


@functools.lru_cache(maxsize=None)
def _base_init_with_output():
  model = small_model()
  out, variables = fast_jit(model.init_with_output)(jax.random.key(0), X_ALL, T_ALL, Y_ALL)
  return out, variables['params']


def _base_init():
  return _base_init_with_output()[1]


@functools.lru_cache(maxsize=None)
def _base_perturbed():
  """Trained-looking parameters: the real init plus init-scale noise on every leaf."""
  init = _base_init()
  return jax.tree_util.tree_map(jnp.add, init, _noise_like(init, seed=1))


@functools.lru_cache(maxsize=None)
def _base_perturbed_output():
  return np.asarray(_apply(small_model(), _base_perturbed(), X_ALL, T_ALL, Y_ALL))


# ------------------------------------------------------------------ size


def test_cifar10_ddpm_parameter_count():
  """Ho et al.'s CIFAR-10 network has 35.7M parameters (35,746,307, as google/ddpm-cifar10-32)."""
  shapes = _param_shapes(unet.UNet(), (1, 32, 32, 3))
  assert _count(shapes) == 35_746_307
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
  # The default config builds that same network.
  from_config = _param_shapes(backbones.create_model(default.get_config().model, 3), (1, 32, 32, 3))
  assert jax.tree_util.tree_structure(from_config) == jax.tree_util.tree_structure(shapes)
  assert _count(from_config) == 35_746_307
  # Spot checks of the layout: 128 base channels, 512-dim timestep embedding, attention at 16x16
  # (level 1) and in the middle, none at 32, 8 or 4.
  assert shapes['conv_in']['kernel'].shape == (3, 3, 3, 128)
  assert shapes['temb_dense1']['kernel'].shape == (512, 512)
  assert shapes['conv_out']['kernel'].shape == (3, 3, 128, 3)
  attn = sorted(k for k in shapes if 'attn' in k)
  assert attn == ['down_1_attn_0', 'down_1_attn_1', 'mid_attn', 'up_1_attn_0', 'up_1_attn_1',
                  'up_1_attn_2']
  assert 'class_embed' not in shapes


def test_create_model_maps_config_fields():
  config = default.get_config().model
  config.unet.ch, config.unet.ch_mult, config.num_classes = 64, (1, 2, 4), 10
  config.learn_sigma, config.dtype, config.remat = True, 'bfloat16', True
  config.unet.num_head_channels, config.unet.use_scale_shift_norm = 32, True
  config.unet.norm_eps, config.unet.dropout = 1e-5, 0.3
  model = backbones.create_model(config, 1)
  assert (model.ch, tuple(model.ch_mult), model.num_classes, model.out_channels) == (
      64, (1, 2, 4), 10, 1)
  assert model.learn_sigma and model.remat and model.use_scale_shift_norm
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  assert (model.num_head_channels, model.norm_eps, model.dropout) == (32, 1e-5, 0.3)


# ------------------------------------------------------------------ init and conditioning


def test_output_is_zero_at_init():
  out, params = _base_init_with_output()
  assert out.shape == X_ALL.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  # Because the output conv is zero-initialised (kernel and bias) ...
  np.testing.assert_array_equal(np.asarray(params['conv_out']['kernel']), 0.0)
  np.testing.assert_array_equal(np.asarray(params['conv_out']['bias']), 0.0)
  # ... while the layers feeding it are not.
  assert float(jnp.std(params['conv_in']['kernel'])) > 0.01
  # apply agrees with init.
  np.testing.assert_array_equal(
      np.asarray(_apply(small_model(), params, X_ALL, T_ALL, Y_ALL)), 0.0)


def test_learn_sigma_doubles_output_channels():
  model = small_model(learn_sigma=True)
  shapes = _param_shapes(model)
  assert shapes['conv_out']['kernel'].shape[-1] == 6
  out = jax.eval_shape(model.apply, {'params': shapes}, _x(), T_IN, Y_IN)
  assert out.shape == X_SHAPE[:3] + (6,) and out.dtype == jnp.float32
  # Every other parameter is unchanged.
  base = _param_shapes(small_model())
  assert _count(shapes) - _count(base) == 3 * 3 * 32 * 3 + 3


def test_output_depends_on_t_and_class():
  out_all = _base_perturbed_output()
  assert out_all.shape == X_ALL.shape
  assert np.all(np.isfinite(out_all)) and np.std(out_all) > 1e-2
  out = out_all[REF]
  scale = np.max(np.abs(out))
  # Changing t, y or the null class changes every example's output.
  for other in (T7, Y1, NULL):
    assert np.all(np.max(np.abs(out_all[other] - out), axis=(1, 2, 3)) > 1e-3 * scale), other
  # Examples do not interact: negating example 2 leaves examples 0 and 1 unchanged.
  np.testing.assert_allclose(out_all[X2][:2], out[:2], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(out_all[X2][2] - out[2])) > 1e-3 * scale
  # y=None is the extra null class, index num_classes.
  out_none = np.asarray(_apply(small_model(), _base_perturbed(), _X3, T_IN, None))
  np.testing.assert_allclose(out_none, out_all[NULL], rtol=1e-5, atol=1e-5)


def test_class_embedding_has_a_null_row():
  params = _base_init()
  assert params['class_embed']['embedding'].shape == (NUM_CLASSES + 1, 4 * SMALL['ch'])
  assert 'class_embed' not in _param_shapes(small_model(num_classes=0))


# ------------------------------------------------------------------ dropout


def test_dropout_train_vs_eval():
  model = small_model()
  params = _base_perturbed()
  run = lambda seed: np.asarray(_apply(model, params, X_ALL, T_ALL, Y_ALL,
                                       dropout_key=jax.random.key(seed)))
  a, b, a2 = run(1), run(2), run(1)
  np.testing.assert_array_equal(a, a2)
  assert np.max(np.abs(a - b)) > 1e-3 * np.max(np.abs(a))
  # Eval mode (train=False, the default) runs without any dropout rng -- flax would raise if a
  # Dropout layer were not deterministic -- and repeats exactly.
  e1 = _base_perturbed_output()
  np.testing.assert_array_equal(
      np.asarray(_apply(model, params, X_ALL, T_ALL, Y_ALL)), e1)
  assert np.max(np.abs(a - e1)) > 1e-3 * np.max(np.abs(e1))


# ------------------------------------------------------------------ architecture variants


def _resblock_names(shapes):
  return [k for k, v in shapes.items() if 'temb_proj' in v]


def test_scale_shift_norm_doubles_temb_projection():
  base = _param_shapes(small_model())
  ss = _param_shapes(small_model(use_scale_shift_norm=True))
  names = _resblock_names(base)
  assert len(names) == 2 + 2 + 2 * 2 and _resblock_names(ss) == names
  extra = 0
  for name in names:
    (din, dout), (din2, dout2) = base[name]['temb_proj']['kernel'].shape, \
        ss[name]['temb_proj']['kernel'].shape
    assert din == din2 == 4 * SMALL['ch']
    assert dout2 == 2 * dout
    assert ss[name]['temb_proj']['bias'].shape == (2 * dout,)
    extra += (din + 1) * dout
  assert _count(ss) - _count(base) == extra


def test_resblock_updown_replaces_resampling_convs():
  base = _param_shapes(small_model())
  ud = _param_shapes(small_model(resblock_updown=True))
  for name in ('down_0_downsample', 'up_1_upsample'):
    assert set(base[name]) == {'kernel', 'bias'}  # A plain conv.
    assert {'conv1', 'conv2', 'norm1', 'norm2', 'temb_proj'} <= set(ud[name])  # A ResBlock.
    assert 'skip' not in ud[name]  # Channel count is preserved.
  assert set(ud) - set(base) == set()


@pytest.mark.parametrize('kwargs,heads', [
    (dict(), 1), (dict(num_heads=4), 4), (dict(num_head_channels=16), 4),
    (dict(num_heads=4, num_head_channels=32), 2)])
def test_attention_heads(kwargs, heads):
  shapes = _param_shapes(small_model(**kwargs))
  c = SMALL['ch'] * 2  # Attention at 4x4 runs on level 1 with 64 channels.
  for name in ('down_1_attn_0', 'mid_attn', 'up_1_attn_0'):
    for proj in ('query', 'key', 'value'):
      assert shapes[name][proj]['kernel'].shape == (c, heads, c // heads)
    assert shapes[name]['proj_out']['kernel'].shape == (heads, c // heads, c)
  # Splitting into heads does not change the parameter count.
  assert _count(shapes) == _count(_param_shapes(small_model()))


def test_attention_heads_must_divide_channels():
  with pytest.raises(ValueError, match='num_head'):
    _param_shapes(small_model(num_heads=3))


def test_head_channels_are_checked_only_where_attention_runs():
  """UNet2DModel's defaults (block_out_channels (4, 8, 8, 8) scaled) are valid: a level without
  attention need not divide into heads; an attention level or the middle block must."""
  config = default.get_config()
  u = config.model.unet
  u.ch, u.ch_mult, u.num_groups, u.num_head_channels = 4, (1, 2, 2, 2), 2, 8
  u.attn_resolutions = (4,)  # Level 2 at 16 px input: 8 channels, as is the middle block.
  assert unet.check_config(config.model, 16) == []
  u.attn_resolutions = (16,)  # Level 0 has 4 channels: cannot split into heads of 8.
  errors = unet.check_config(config.model, 16)
  assert len(errors) == 1 and 'num_head_channels=8' in errors[0] and '[4]' in errors[0]
  u.attn_resolutions, u.ch_mult = (), (2, 2, 1)  # The middle block runs on the last level (4).
  assert '[4]' in ' '.join(unet.check_config(config.model, 16))


def test_variants_run_and_are_finite():
  model = small_model(use_scale_shift_norm=True, resblock_updown=True, num_head_channels=16)
  params = _random_params(_param_shapes(model), seed=3)
  out_all = np.asarray(_apply(model, params, X_ALL, T_ALL, Y_ALL))
  assert out_all.shape == X_ALL.shape and np.all(np.isfinite(out_all))
  out = out_all[REF]
  assert np.std(out) > 1e-2
  # The timestep (through AdaGN scale/shift) and the class still reach the output.
  for other in (T7, Y1):
    assert np.all(np.max(np.abs(out_all[other] - out), axis=(1, 2, 3)) > 1e-3 * np.max(
        np.abs(out))), other


# ------------------------------------------------------------------ precision


def test_bfloat16_compute_float32_params():
  model = small_model(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  shapes = _param_shapes(model, y=Y_IN)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  params = _base_perturbed()
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
  out = _apply(model, params, X_ALL, T_ALL, Y_ALL)
  assert out.dtype == jnp.float32
  ref = _base_perturbed_output()
  out = np.asarray(out)
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.05, rel  # bf16 has an 8-bit mantissa (~0.4% per rounding).
  # The convolutions really run in bfloat16.
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, _X3, T_IN, Y_IN))(params)
  conv_dtypes = set()

  def visit(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        conv_dtypes.add(eqn.invars[0].aval.dtype)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


# ------------------------------------------------------------------ remat


def test_remat_matches_plain():
  """Same output and gradients with remat, in training mode (dropout on)."""
  # A one-level model (4 res blocks, 4 attention blocks at 4x4) keeps the two compiles short.
  kwargs = dict(ch_mult=(1,), attn_resolutions=(4,))
  plain, remat = small_model(**kwargs), small_model(remat=True, **kwargs)
  shapes = _param_shapes(remat, (2, 4, 4, 3))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
      _param_shapes(plain, (2, 4, 4, 3)))
  params = _random_params(shapes, seed=5)
  x = _x(7, (2, 4, 4, 3))
  t, y = jnp.array([3, 600]), jnp.array([1, 4])

  def loss(model, p):
    out = model.apply({'params': p}, x, t, y, train=True, rngs={'dropout': jax.random.key(4)})
    return jnp.mean((out - x)**2), out

  (l_p, out_p), g_p = fast_jit(jax.value_and_grad(functools.partial(loss, plain),
                                                   has_aux=True))(params)
  (l_r, out_r), g_r = fast_jit(jax.value_and_grad(functools.partial(loss, remat),
                                                   has_aux=True))(params)
  np.testing.assert_allclose(np.asarray(out_r), np.asarray(out_p), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(l_r), float(l_p), rtol=1e-5)
  flat_p = jax.tree_util.tree_leaves_with_path(g_p)
  flat_r = jax.tree_util.tree_leaves(g_r)
  for (path, gp), gr in zip(flat_p, flat_r):
    np.testing.assert_allclose(np.asarray(gr), np.asarray(gp), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert all(float(jnp.max(jnp.abs(g))) > 0 for _, g in flat_p if g.ndim > 1)
  # remat really wraps the blocks in checkpoints.
  eqn_names = str(jax.make_jaxpr(functools.partial(loss, remat))(params))
  assert 'checkpoint' in eqn_names or 'remat' in eqn_names
  assert 'checkpoint' not in str(jax.make_jaxpr(functools.partial(loss, plain))(params))


# ------------------------------------------------------------------ timestep embedding


@pytest.mark.parametrize('dim', [8, 9, 32, 128])
def test_timestep_embedding_formula(dim):
  t = np.array([0.0, 1.0, 2.5, 17.0, 500.0, 999.0])
  half = dim // 2
  freqs = np.array([10_000.0**(-i / (half - 1)) for i in range(half)])  # Ho et al. / tensor2tensor
  args = t[:, None] * freqs[None, :]
  ref = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    ref = np.concatenate([ref, np.zeros((len(t), 1))], axis=1)
  emb = layers.timestep_embedding(jnp.asarray(t, jnp.float32), dim)
  assert emb.shape == (len(t), dim) and emb.dtype == jnp.float32
  # float32 arguments up to 999 rad carry ~1e-4 absolute error.
  np.testing.assert_allclose(np.asarray(emb, np.float64), ref, atol=3e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(emb, np.float64)[:3], ref[:3], atol=2e-6, rtol=0)
  # Integer timesteps give the same embedding.
  np.testing.assert_array_equal(
      np.asarray(layers.timestep_embedding(jnp.array([0, 17, 999]), dim)),
      np.asarray(emb)[[0, 3, 5]])


def test_upsampling_is_nearest_neighbour_forward_and_backward():
  """unet._resample('up') equals jax.image.resize 'nearest' (the reference) in value and in
  gradient: each input pixel's gradient is the sum over its 2x2 output block."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 10, 4))
  ours = lambda v: unet._resample(v, 'up')  # pylint: disable=protected-access
  ref = lambda v: jax.image.resize(v, (2, 6, 10, 4), method='nearest')
  np.testing.assert_array_equal(ours(x), ref(x))
  grad = jax.grad(lambda v: jnp.sum(w * ours(v)))(x)
  # Equal up to the order of the four-term sums.
  np.testing.assert_allclose(grad, jax.grad(lambda v: jnp.sum(w * ref(v)))(x), atol=1e-6)
  block_sums = w.reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
  np.testing.assert_allclose(grad, block_sums, atol=1e-6)


# ------------------------------------------------------------------ GroupNorm


@pytest.mark.parametrize('shape,groups', [((3, 5, 7, 64), 32), ((2, 4, 4, 96), 8),
                                          ((2, 10, 12), 4)])
def test_group_norm_matches_float64_reference_and_flax_gradients(shape, groups):
  """GroupNorm32 (per-channel sums, then per group) against a two-pass float64 NumPy GroupNorm
  in value, and against flax's nn.GroupNorm in gradient; it keeps flax's parameter names, so
  checkpoints and the converters see the same tree."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=shape) * 3.0 + 1.5).astype(np.float32)  # A mean away from 0.
  scale = rng.normal(size=shape[-1]).astype(np.float32)
  bias = rng.normal(size=shape[-1]).astype(np.float32)
  params = {'params': {'GroupNorm_0': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}}
  norm = layers.GroupNorm32(groups, epsilon=1e-6)
  init_tree = jax.eval_shape(norm.init, jax.random.PRNGKey(0), x)
  assert jax.tree.map(lambda a: a.shape, init_tree) == jax.tree.map(lambda a: a.shape, params)

  grouped = x.astype(np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  ref = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(shape) * scale + bias
  np.testing.assert_allclose(norm.apply(params, x), ref, atol=2e-5, rtol=0)

  flax_norm = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  weights = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  loss = lambda apply: lambda p, v: jnp.sum(weights * jnp.tanh(apply(p, v)))
  ours = jax.grad(loss(norm.apply), argnums=(0, 1))(params, x)
  theirs = jax.grad(loss(lambda p, v: flax_norm.apply(
      {'params': p['params']['GroupNorm_0']}, v)), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(b))), rtol=0)

  bf16 = layers.GroupNorm32(groups, dtype=jnp.bfloat16, epsilon=1e-6)
  y16 = bf16.apply(params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), ref, atol=0.05 * np.abs(ref).max())


def test_group_norm_channels_must_divide_into_groups():
  with pytest.raises(ValueError, match='model.unet.num_groups'):
    layers.GroupNorm32(32).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 48)))
