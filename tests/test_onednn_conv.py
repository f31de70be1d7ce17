"""model.conv_backend='onednn': the U-Net's convolutions as oneDNN custom calls on the CPU.

Checked against XLA's own convolution (an independent implementation) and a closed form, on one
device and partitioned over the 8 virtual devices of conftest.py, down to a whole train step.

oneDNN is optional (`pip install -e '.[test,onednn]'`, as .ci/run does): where it cannot be built
(no wheels, no C++ compiler, not Linux) the tests that run the kernel skip, naming the reason;
those of the config and of moving a run between backends run everywhere.
"""

import os
import re
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.modes import validation
from diffusion_jax.nn import backbones
from diffusion_jax.contrib.onednn import conv as onednn_conv
from diffusion_jax.parallel import sharding
from test_distributed import assert_trees_close, build  # pylint: disable=g-bad-import-order
from test_train_state import shard_map_checks

UNAVAILABLE = onednn_conv.unavailable_reason()
needs_onednn = pytest.mark.skipif(
    UNAVAILABLE is not None,
    reason=f"oneDNN kernel unavailable ({UNAVAILABLE}); pip install -e '.[test,onednn]'")


@pytest.fixture(scope='module', autouse=True)
def kernel_cache(tmp_path_factory):
  """The compiled kernel goes to a fresh cache: the build itself is under test."""
  previous = os.environ.get('XDG_CACHE_HOME')
  os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('xdg_cache'))
  yield
  if previous is None:
    del os.environ['XDG_CACHE_HOME']
  else:
    os.environ['XDG_CACHE_HOME'] = previous


NHWC = ('NHWC', 'HWIO', 'NHWC')  # As flax.linen.Conv passes them (lax's default is NCHW).


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _onednn_conv(x, w, strides, padding, **kwargs):
  return onednn_conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, **kwargs)


def _loss_and_grads(conv):
  """A loss whose cotangent differs per output element, so every gradient entry is exercised."""
  def loss(x, w, strides, padding):
    y = conv(x, w, strides, padding)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=(2, 3))


def _assert_close(got, want, rtol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert np.max(np.abs(g - w)) <= rtol * np.max(np.abs(w)), np.max(np.abs(g - w))


CASES = [  # (batch, size, in channels, out channels, kernel, stride, padding)
    (4, 8, 16, 32, 3, 1, 'SAME'),
    (4, 8, 16, 16, 3, 2, 'SAME'),               # TF 'SAME' at stride 2: pad bottom/right only.
    (4, 8, 16, 16, 3, 2, ((1, 1), (1, 1))),     # The U-Net's downsample_padding=1.
    (2, 6, 8, 24, 1, 1, 'VALID'),               # The residual blocks' 1x1 skip.
    (3, 5, 4, 6, 3, 1, ((2, 0), (0, 1))),       # Odd sizes, uneven padding.
]


@needs_onednn
def test_onednn_conv_bypasses_xla_and_builds_once():
  assert onednn_conv.unavailable_reason() is None, onednn_conv.unavailable_reason()
  config = tiny.get_config()  # Installed: the config check has nothing to say.
  for backend in ('onednn', 'onednn_winograd'):
    config.model.conv_backend = backend
    assert not backbones.check_model_config(config.model, config.data.resolution), backend
  library = onednn_conv.build()
  assert library.parent == onednn_conv._cache_dir() and library.exists()
  assert onednn_conv.build() == library  # Cached by content: the second call compiles nothing.
  x, w = jnp.ones((2, 4, 4, 8)), jnp.ones((3, 3, 8, 8))
  hlo = jax.jit(lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME')).lower(
      x, w).as_text()
  assert 'dj_onednn_conv_forward' in hlo and 'convolution' not in hlo


@needs_onednn
@pytest.mark.parametrize('case', CASES, ids=[str(i) for i in range(len(CASES))])
def test_onednn_conv_and_both_gradients_match_xla(case):
  n, size, cin, cout, k, stride, padding = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  got = _loss_and_grads(_onednn_conv)(x, w, (stride, stride), padding)
  want = _loss_and_grads(_xla_conv)(x, w, (stride, stride), padding)
  _assert_close(got, want, rtol=1e-5)


@needs_onednn
def test_a_centred_delta_kernel_is_the_identity_and_its_gradient_a_sum():
  """Closed form: y = conv(x, delta) = x; d/dw sum(y * c) at the centre = sum(x * c), and at the
  other taps the sum of x shifted against c (zero-padded)."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
  c = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
  delta = np.zeros((3, 3, 3, 3), np.float32)
  delta[1, 1] = np.eye(3)
  y = _onednn_conv(jnp.asarray(x), jnp.asarray(delta), (1, 1), 'SAME')
  np.testing.assert_allclose(np.asarray(y), x, rtol=0, atol=0)
  dw = jax.grad(lambda w: jnp.sum(_onednn_conv(x, w, (1, 1), 'SAME') * c))(
      jnp.asarray(delta))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.stack([np.stack([np.einsum('nhwi,nhwo->io', xp[:, i:i + 5, j:j + 5], c)
                             for j in range(3)]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(dw), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_other_convolutions_fall_back_to_xla():
  """bfloat16, dilation and grouped convolutions are not the U-Net's: lax computes them."""
  x, w = jnp.ones((1, 6, 6, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  for kwargs in (dict(), dict(rhs_dilation=(2, 2))):
    fn = lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME', **kwargs)  # pylint: disable=cell-var-from-loop
    assert 'dj_onednn' not in jax.jit(fn).lower(x, w).as_text()
  grouped = jax.jit(lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME', feature_group_count=2))
  x32, w32 = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
  assert 'dj_onednn' not in grouped.lower(x32, w32).as_text()
  np.testing.assert_array_equal(grouped(x32, w32), lax.conv_general_dilated(
      x32, w32, (1, 1), 'SAME', dimension_numbers=NHWC, feature_group_count=2))


@needs_onednn
@pytest.mark.parametrize('winograd', [False, True])
def test_partitioned_over_the_batch_with_no_gather_and_the_same_values(winograd):
  """On 8 devices with the batch sharded: each device convolves its own rows (no all-gather of
  activations), the kernel gradient is one all-reduce, and the values are those of one device.
  Several runs give bit-identical results: concurrent calls do not share oneDNN's scratchpad
  (nor, with Winograd, each other's transform buffers; 8 images of 8x8 and 64 channels per
  device qualify)."""
  mesh = Mesh(np.array(jax.devices()), ('data',))
  rng = np.random.default_rng(2)
  n, cin, cout = (64, 64, 64) if winograd else (16, 16, 32)
  x = rng.standard_normal((n, 8, 8, cin)).astype(np.float32)
  w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  fn = _loss_and_grads(lambda x, w, s, p: _onednn_conv(x, w, s, p, winograd=winograd))
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  got = [fn(xs, jnp.asarray(w), (1, 1), 'SAME') for _ in range(3)]
  hlo = fn.lower(xs, jnp.asarray(w), (1, 1), 'SAME').compile().as_text()
  assert len(re.findall(r'custom_call_target="dj_onednn_conv_', hlo)) == 3, hlo
  assert 'all-gather' not in hlo
  assert got[0][1][0].sharding.spec == P('data')  # dx stays sharded like x.
  for other in got[1:]:
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(other)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  one_device = fn(jnp.asarray(x), jnp.asarray(w), (1, 1), 'SAME')
  _assert_close(got[0], one_device, rtol=1e-5)
  _assert_close(got[0], _loss_and_grads(_xla_conv)(jnp.asarray(x), jnp.asarray(w), (1, 1),
                                                   'SAME'), rtol=5e-5 if winograd else 1e-5)


@needs_onednn
@pytest.mark.parametrize('fsdp', [1, 4])
def test_train_steps_with_onednn_match_xla(fsdp):
  """The same parameters (one init, one layout) and, after three steps on data-parallel or
  data x FSDP meshes, the same loss and parameters as XLA's convolutions."""
  configs = {}
  for backend in ('xla', 'onednn'):
    config = tiny.get_config()
    config.model.unet.dropout = 0.0
    config.optim.warmup_steps = 0
    config.model.conv_backend = backend
    config.mesh.fsdp, config.mesh.fsdp_min_size = fsdp, 256
    configs[backend] = config
  mesh = sharding.create_mesh(configs['xla'].mesh)
  (s_xla, step_xla), (s_dnn, step_dnn) = build(configs['xla'], mesh), build(configs['onednn'], mesh)
  # The custom VJP does not annotate varying axes: only oneDNN's per-device-gradient shard_map
  # (data parallel, fsdp=1) runs with check_vma off; XLA's keeps it on.
  checks = {name: shard_map_checks(step, s, _batch(16, mesh))
            for name, step, s in (('xla', step_xla, s_xla), ('onednn', step_dnn, s_dnn))}
  assert checks == ({'xla': [True], 'onednn': [False]} if fsdp == 1 else
                    {'xla': [], 'onednn': []})
  step_dnn = step_dnn.lower(s_dnn, _batch(16, mesh)).compile()
  assert 'custom_call_target="dj_onednn_conv_kernel_grad"' in step_dnn.as_text()
  assert_trees_close(s_dnn.params, s_xla.params, rtol=0, atol=0)
  for i in range(3):
    batch = _batch(16, mesh, seed=i)
    s_xla, m_xla = step_xla(s_xla, batch)
    s_dnn, m_dnn = step_dnn(s_dnn, batch)
    np.testing.assert_allclose(float(m_dnn['loss']), float(m_xla['loss']), rtol=1e-5)
  assert_trees_close(s_dnn.params, s_xla.params, rtol=1e-4, atol=1e-5)




def _batch(n, mesh, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)
  return jax.device_put({'image': images, 'label': np.zeros((n,), np.int32)},
                        sharding.batch_sharding(mesh))


# Layers that the Winograd rule (csrc/onednn_conv.cc: 3x3, stride 1, padding 1, maps of at least
# 4x4, >= 16 output tiles of 4x4 and >= 32 channels in and out) hands to F(4x4, 3x3): sizes that
# are and are not multiples of the tile, channels that are not multiples of the transforms' 16
# lanes or 64-channel blocks.
WINOGRAD_CASES = [  # (batch, height, width, in channels, out channels)
    (2, 16, 16, 64, 64),
    (4, 8, 8, 32, 40),  # The smallest layer inside the rule: 16 tiles, 32 channels in.
    (3, 13, 10, 64, 72),
    (8, 8, 8, 96, 64),
    (9, 64, 61, 64, 64),  # 2,304 tiles: two passes of kTilesPerPass (2,048), the second ragged.
]


def _float64_conv(x, w):
  """SAME 3x3 convolution in float64 numpy: the reference for both algorithms' rounding."""
  n, h, wd, _ = x.shape
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  w = np.asarray(w, np.float64)
  return sum(np.einsum('nhwc,co->nhwo', xp[:, i:i + h, j:j + wd], w[i, j])
             for i in range(3) for j in range(3))


@needs_onednn
@pytest.mark.parametrize('case', WINOGRAD_CASES, ids=[str(i) for i in range(len(WINOGRAD_CASES))])
def test_winograd_conv_and_both_gradients_match_xla(case):
  """F(4x4, 3x3) in all three directions against XLA's direct convolution, to ~1e-5 of the
  outputs' scale; it is a different computation from oneDNN's direct one (not bit-identical),
  and its forward error against float64 is within 20x the direct algorithm's."""
  n, h, w_, cin, cout = case
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((n, h, w_, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
  conv = lambda winograd: lambda x, w, s, p: _onednn_conv(x, w, s, p, winograd=winograd)
  got = _loss_and_grads(conv(True))(x, w, (1, 1), 'SAME')
  want = _loss_and_grads(_xla_conv)(x, w, (1, 1), 'SAME')
  _assert_close(got, want, rtol=5e-5)
  direct = _loss_and_grads(conv(False))(x, w, (1, 1), 'SAME')
  assert not np.array_equal(np.asarray(got[1][1]), np.asarray(direct[1][1]))
  exact = _float64_conv(x, w)
  error = lambda y: np.max(np.abs(np.asarray(y, np.float64) - exact)) / np.max(np.abs(exact))
  wino_error = error(_onednn_conv(x, w, (1, 1), 'SAME', winograd=True))
  direct_error = error(_onednn_conv(x, w, (1, 1), 'SAME'))
  assert wino_error < max(20 * direct_error, 1e-6), (wino_error, direct_error)


@needs_onednn
def test_winograd_delta_kernel_is_the_identity_and_its_gradient_a_sum():
  """The closed form of test_a_centred_delta_kernel_..., on a layer large enough for Winograd
  (the transforms make the identity exact only up to rounding)."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((4, 12, 12, 64)).astype(np.float32)
  c = rng.standard_normal((4, 12, 12, 64)).astype(np.float32)
  delta = np.zeros((3, 3, 64, 64), np.float32)
  delta[1, 1] = np.eye(64)
  conv = lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME', winograd=True)
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x), jnp.asarray(delta))), x, atol=2e-5)
  dw = jax.grad(lambda w: jnp.sum(conv(x, w) * c))(jnp.asarray(delta))
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.stack([np.stack([np.einsum('nhwi,nhwo->io', xp[:, i:i + 12, j:j + 12], c)
                             for j in range(3)]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(dw), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


@pytest.mark.parametrize('case', CASES + [(8, 4, 64, 64, 3, 1, 'SAME'), (32, 8, 16, 64, 3, 1, 'SAME'),
                                  (64, 2, 64, 64, 3, 1, 'SAME')],
                         ids=[str(i) for i in range(len(CASES) + 3)])
@needs_onednn
def test_layers_outside_the_winograd_rule_stay_direct(case):
  """Other kernels, strides, paddings, too few tiles (8 images of 4x4 = 8 tiles), channels
  (16 in) or maps smaller than a tile (2x2): winograd=True computes exactly what winograd=False
  does."""
  n, size, cin, cout, k, stride, padding = case
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((n, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  conv = lambda winograd: lambda x, w, s, p: _onednn_conv(x, w, s, p, winograd=winograd)
  got = _loss_and_grads(conv(True))(x, w, (stride, stride), padding)
  want = _loss_and_grads(conv(False))(x, w, (stride, stride), padding)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_onednn
def test_train_steps_with_winograd_match_xla():
  """conv_backend='onednn_winograd' on one device, with a U-Net whose 8x8 level (64 channels,
  64 tiles) takes Winograd's algorithm: three steps give XLA's loss and parameters to ~1e-4."""
  states, steps = {}, {}
  mesh = sharding.create_mesh(tiny.get_config().mesh, jax.devices()[:1])
  for backend in ('xla', 'onednn_winograd'):
    config = tiny.get_config()
    config.model.unet.ch, config.model.unet.dropout, config.optim.warmup_steps = 64, 0.0, 0
    config.model.conv_backend = backend
    states[backend], steps[backend] = build(config, mesh)
  compiled = steps['onednn_winograd'].lower(states['onednn_winograd'], _batch(16, mesh)).compile()
  assert re.search(r'dj_onednn_conv_forward.*winograd = 1', compiled.as_text()), 'no winograd attr'
  for i in range(3):
    batch = _batch(16, mesh, seed=i)
    states['xla'], m_xla = steps['xla'](states['xla'], batch)
    states['onednn_winograd'], m_wino = compiled(states['onednn_winograd'], batch)
    np.testing.assert_allclose(float(m_wino['loss']), float(m_xla['loss']), rtol=1e-4)
  assert_trees_close(states['onednn_winograd'].params, states['xla'].params, rtol=1e-3, atol=1e-5)


def test_conv_backend_errors_name_the_field_and_the_fix(monkeypatch):
  config = tiny.get_config()
  config.model.conv_backend = 'mkldnn'
  errors = backbones.check_model_config(config.model, config.data.resolution)
  assert any("model.conv_backend='mkldnn' is unknown" in e for e in errors), errors
  config.model.conv_backend = 'onednn'
  config.model.arch = 'dit'
  errors = backbones.check_model_config(config.model, config.data.resolution)
  assert any('U-Net only' in e for e in errors), errors
  config.model.conv_backend = 'onednn_winograd'
  errors = backbones.check_model_config(config.model, config.data.resolution)
  assert any('model.conv_backend=onednn_winograd applies to the U-Net only' in e
             for e in errors), errors
  config.model.arch = 'unet'
  monkeypatch.setattr(onednn_conv, '_dist_file', lambda *args: None)  # Wheels not installed.
  with pytest.raises(ValueError, match=r"model.conv_backend=onednn needs the oneDNN wheels: pip "
                     r"install 'diffusion-jax\[onednn\]'"):
    validation.validate_config(config)


@needs_onednn
def test_export_serves_the_same_parameters_with_xla_convolutions():
  """jax.export cannot carry this process's custom calls: the exported sampler uses XLA's
  convolutions on the same parameters."""
  from diffusion_jax.serving import export  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.conv_backend = 'onednn'
  model = backbones.create_model(config.model, config.data.channels)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))['params']
  text = export.export_sampler(config, params, ('cpu',)).mlir_module()
  assert 'dj_onednn' not in text and 'convolution' in text


def test_a_run_moves_between_conv_backends():
  """The backend is how the same network is computed: a run trained with one resumes, samples
  or evaluates with the other (e.g. trained with oneDNN on a CPU, sampled with XLA on a GPU),
  while a real change of the network is still refused."""
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  saved, requested = tiny.get_config(), tiny.get_config()
  saved.model.conv_backend = 'onednn'
  assert run_config.locked_differences(saved, requested) == []
  run_config.check_resume_config(saved, requested, 'the run')
  merged = run_config.config_for_run(saved, {'model.conv_backend': 'xla'})
  assert merged.model.conv_backend == 'xla'
  requested.model.unet.ch = 2 * saved.model.unet.ch
  assert [name for name, _, _ in run_config.locked_differences(saved, requested)] == ['model.unet.ch']
