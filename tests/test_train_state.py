"""Train state, optimizer, learning-rate schedule, EMA and the compiled train step.

Compiles dominate the run time on CPU, so the module builds one small class-conditional model
(configs/tiny.py with 10 classes, label dropout, batch 8, Adam 2e-3 without warm-up) and
compiles its train step once per mesh (8 devices and 1 device). Fresh states are made by
copying one host copy of the initial state onto a mesh (the step donates its input state).
The persistent compilation cache is pointed at a directory shared by this session's
test_checkpoints.py and test_main.py, which train the same config through `train_and_evaluate`
and the CLI, so the same executables are compiled only once per session.

Long loops run on the one-device mesh: with 8 virtual devices on 2 shared cores, XLA's CPU
collectives can time out (and abort the process) when the machine is heavily loaded.
"""

import math
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.data import pipeline
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state

NUM_CLASSES = 10
BATCH = 8


def small_config():
  """configs/tiny.py, class-conditional, batch 8, constant lr 2e-3 (shared with the other files)."""
  config = tiny.get_config()
  config.model.unet.dropout = 0.0
  config.model.num_classes = NUM_CLASSES
  config.training.cond_drop_prob = 0.5
  config.training.batch_size = BATCH
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 0
  config.optim.lr_schedule = 'constant'
  return config


def _leaves_with_paths(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_equal(a, b):
  """Same structure, dtypes and bit-identical values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(x, y, err_msg=path)


def assert_trees_close(a, b, rtol, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=path)


@pytest.fixture(scope='module')
def env():
  config = small_config()
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  mesh8 = sharding.create_mesh(config.mesh)
  mesh1 = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  assert mesh8.devices.size == 8 and mesh1.devices.size == 1
  state = train_state.create_train_state(config, mesh8)
  images, labels = pipeline.load_digits()
  e = types.SimpleNamespace(
      config=config, model=model, tx=tx, mesh8=mesh8, mesh1=mesh1,
      init=jax.device_get(state),  # Host copy: never donated.
      images=images[:BATCH].astype(np.float32) / 127.5 - 1.0,
      labels=labels[:BATCH].astype(np.int32),
      step8=train_state.make_train_step(model, tx, config, mesh8),
      step1=train_state.make_train_step(model, tx, config, mesh1))
  e.put = lambda host_state, mesh: jax.device_put(host_state, sharding.replicated(mesh))

  def batch(mesh, images=None, labels=None):
    b = {'image': e.images if images is None else images,
         'label': e.labels if labels is None else labels}
    return jax.device_put(b, sharding.batch_sharding(mesh))
  e.batch = batch
  return e


@pytest.fixture(scope='module')
def warm(env):
  """Host copy of the state after 4 steps (the output layer is zero at init, so labels and
  most gradients only matter once it has been trained a little)."""
  state, batch = env.put(env.init, env.mesh1), env.batch(env.mesh1)
  for _ in range(4):
    state, metrics = env.step1(state, batch)
    assert float(metrics['nonfinite']) == 0.0
  return jax.device_get(state)


def _with_step(host_state, step):
  return host_state.replace(step=np.asarray(step, np.int32))


# ------------------------------------------------------------------ initial state


def test_initial_state(env):
  init = env.init
  assert int(init.step) == 0
  assert_trees_equal(init.ema_params, init.params)  # EMA starts at the params.
  # The class embedding has one extra (null) class for classifier-free guidance.
  embed = [x for path, x in _leaves_with_paths(init.params) if 'class_embed' in path]
  assert len(embed) == 1 and embed[0].shape[0] == NUM_CLASSES + 1
  # Adam moments start at zero.
  moments = [x for path, x in _leaves_with_paths(init.opt_state) if x.dtype == np.float32]
  assert moments and all(not np.any(x) for x in moments)


def test_abstract_train_state_describes_the_created_state(env):
  """abstract_train_state(config, mesh) is the created state's tree, shapes, dtypes and
  shardings (nothing computed) and
  the created state is the reference init; both counters start at 0."""
  abstract = train_state.abstract_train_state(env.config, env.mesh8)
  created = train_state.create_train_state(env.config, env.mesh8)
  assert jax.tree.structure(abstract) == jax.tree.structure(created)
  for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(created)):
    assert (a.shape, a.dtype) == (c.shape, c.dtype)
    assert a.sharding.is_equivalent_to(c.sharding, len(a.shape))
  unsharded = train_state.abstract_train_state(env.config)
  assert all(getattr(a, 'sharding', None) is None for a in jax.tree.leaves(unsharded))
  assert (int(created.step), int(created.num_updates)) == (0, 0)
  assert_trees_equal(jax.device_get(created), env.init)


# ------------------------------------------------------------------ learning rate


def _optim(**overrides):
  optim = small_config().optim
  optim.update(overrides)
  return optim


def _expected_lr(k, lr, warmup, kind, total):
  if warmup and k < warmup:
    return lr * k / warmup
  if kind == 'constant':
    return lr
  progress = min(k - warmup, total - warmup) / max(total - warmup, 1)
  return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize('kind,warmup,total', [('constant', 10, 50), ('constant', 0, 50),
                                               ('cosine', 10, 110), ('cosine', 0, 40)])
def test_learning_rate_schedule_values(kind, warmup, total):
  lr = 3e-3
  schedule = train_state.learning_rate_schedule(
      _optim(learning_rate=lr, warmup_steps=warmup, lr_schedule=kind), total)
  steps = sorted(set(range(0, total + 5, 3)) | {0, warmup, total // 2, total})
  got = np.array([float(schedule(k)) for k in steps])
  want = np.array([_expected_lr(k, lr, warmup, kind, total) for k in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  if warmup:
    assert got[0] == 0.0  # Warm-up starts from zero ...
    np.testing.assert_allclose(float(schedule(warmup // 2)), lr * (warmup // 2) / warmup, rtol=1e-6)
  assert float(schedule(warmup)) == pytest.approx(lr, rel=1e-6)  # ... and reaches lr.
  if kind == 'cosine':
    assert abs(float(schedule(total))) < 1e-6 * lr  # Decayed to zero at the last step.
    mid = warmup + (total - warmup) // 2
    assert float(schedule(mid)) == pytest.approx(_expected_lr(mid, lr, warmup, kind, total), rel=1e-5)
  else:
    assert float(schedule(10 * total)) == pytest.approx(lr, rel=1e-6)


def test_unknown_schedule_and_optimizer_raise():
  with pytest.raises(ValueError, match='lr_schedule'):
    train_state.learning_rate_schedule(_optim(lr_schedule='linear'), 10)
  with pytest.raises(ValueError, match='optimizer'):
    train_state.create_optimizer(_optim(optimizer='sgd'), 10)


@pytest.mark.parametrize('optimizer,weight_decay', [('adam', 0.0), ('adamw', 0.1)])
def test_optimizer_applies_clipped_scheduled_updates(optimizer, weight_decay):
  """With a constant gradient, Adam's bias-corrected step is lr_k * g / (|g| + eps) (plus
  lr_k * wd * p for AdamW), where g is the gradient after global-norm clipping and lr_k the
  schedule at update k (0 for the first update with warm-up)."""
  lr, warmup, total, clip, eps = 1e-2, 4, 12, 1.0, 1e-8
  optim = _optim(optimizer=optimizer, weight_decay=weight_decay, learning_rate=lr,
                 warmup_steps=warmup, lr_schedule='cosine', grad_clip=clip, eps=eps)
  tx = train_state.create_optimizer(optim, total)
  grad = np.array([1.0, -2.0, 3.0, 0.5])
  clipped = grad * min(1.0, clip / np.linalg.norm(grad))
  params = {'w': jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)}
  opt_state = tx.init(params)
  expected = np.asarray(params['w'], np.float64)
  for k in range(total):
    updates, opt_state = tx.update({'w': jnp.asarray(grad, jnp.float32)}, opt_state, params)
    params = optax.apply_updates(params, updates)
    lr_k = _expected_lr(k, lr, warmup, 'cosine', total)
    expected = expected - lr_k * (clipped / (np.abs(clipped) + eps) + weight_decay * expected)
    np.testing.assert_allclose(np.asarray(params['w']), expected, rtol=1e-5, atol=1e-6,
                               err_msg=f'update {k}')
  assert not np.allclose(expected, [0.5, -1.0, 2.0, 0.0])


# ------------------------------------------------------------------ EMA


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {'a': rng.normal(size=(3, 4)).astype(np.float32),
          'b': {'c': rng.normal(size=(5,)).astype(np.float32)}}


@pytest.mark.parametrize('decay,warmup', [(0.9, False), (0.5, True), (0.999, True)])
def test_ema_closed_form_for_constant_params(decay, warmup):
  """k updates towards constant params p: e_k = D e_0 + (1 - D) p with D = prod of decays."""
  p, e0 = _tree(0), _tree(1)
  k = 15
  decays = [decay if not warmup else min(decay, (1.0 + n) / (10.0 + n)) for n in range(k)]
  if warmup and decay == 0.5:
    assert decays[0] < decay and decays[-1] == decay  # Both branches of the min are used.
  for n, d in enumerate(decays):
    np.testing.assert_allclose(float(train_state.ema_decay_at(jnp.asarray(n, jnp.int32), decay,
                                                              warmup)), d, rtol=1e-6)
  ema = jax.tree.map(jnp.asarray, e0)
  for n in range(k):
    ema = train_state.ema_update(ema, p, train_state.ema_decay_at(jnp.asarray(n), decay, warmup))
  total = np.prod(np.asarray(decays, np.float64))
  want = jax.tree.map(lambda e, q: total * e.astype(np.float64) + (1 - total) * q, e0, p)
  assert_trees_close(jax.device_get(ema), want, rtol=2e-6, atol=2e-6)
  if not warmup:
    np.testing.assert_allclose(total, decay**k)


def test_ema_update_keeps_ema_dtype_and_uses_float32():
  params = {'w': jnp.asarray([1.0, 3.0], jnp.bfloat16)}
  ema = {'w': jnp.asarray([0.0, 1.0], jnp.float32)}
  out = train_state.ema_update(ema, params, jnp.asarray(0.75, jnp.float32))
  assert out['w'].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out['w']), [0.25, 1.5], rtol=1e-7)


def test_train_step_ema_follows_the_recurrence(env):
  """After k real steps (8 devices), EMA == recurrence over the recorded params, recomputed in
  float64 with the warm-up decays min(0.998, (1 + n) / (10 + n)), n = step before the update."""
  ocfg = env.config.optim
  assert ocfg.ema_warmup
  state, batch = env.put(env.init, env.mesh8), env.batch(env.mesh8)
  ema = jax.tree.map(lambda x: np.asarray(x, np.float64), env.init.ema_params)
  for n in range(5):
    state, metrics = env.step8(state, batch)
    assert float(metrics['nonfinite']) == 0.0
    host = jax.device_get(state)
    d = min(ocfg.ema_decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * np.asarray(p, np.float64), ema,
                       host.params)
    assert int(host.step) == n + 1
    assert_trees_close(host.ema_params, ema, rtol=1e-5, atol=1e-7)
  # Not vacuous: the EMA lags behind the parameters.
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(host.ema_params), jax.tree.leaves(host.params)))
  assert diff > 1e-4


# ------------------------------------------------------------------ train step


def test_overfits_one_batch(env):
  """Adam 2e-3 on one fixed batch of 8 digits: the loss (random t each step) falls a lot."""
  state, batch = env.put(env.init, env.mesh1), env.batch(env.mesh1)
  history = []
  for _ in range(250):
    state, metrics = env.step1(state, batch)
    history.append(metrics)
  history = jax.device_get(history)
  losses = np.array([h['loss'] for h in history])
  assert all(h['nonfinite'] == 0.0 for h in history)
  assert np.all(np.isfinite(losses))
  first, last = losses[:10].mean(), losses[-10:].mean()
  assert last < 0.5 * first, (first, last)
  assert int(jax.device_get(state.step)) == 250
  assert all(h['learning_rate'] == np.float32(env.config.optim.learning_rate) for h in history)


def test_eight_devices_match_one_device(env):
  """Same global batch, config and seed: 8-device and 1-device meshes agree step by step."""
  s8, s1 = env.put(env.init, env.mesh8), env.put(env.init, env.mesh1)
  b8, b1 = env.batch(env.mesh8), env.batch(env.mesh1)
  for k in range(3):
    s8, m8 = env.step8(s8, b8)
    s1, m1 = env.step1(s1, b1)
    m8, m1 = jax.device_get((m8, m1))
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
    np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-4)
    h8, h1 = jax.device_get((s8, s1))
    assert int(h8.step) == int(h1.step) == k + 1
    # Summation order differs between the meshes; Adam divides by sqrt(v), which turns the
    # ~1e-7 relative gradient differences of near-zero gradient entries into ~1e-6 absolute
    # parameter differences (seen on 2 of 18k entries). atol 1e-5 is still 200x smaller than one
    # update (lr = 2e-3), so a real mismatch (other noise per device, a per-shard mean) fails.
    assert_trees_close(h8.params, h1.params, rtol=1e-5, atol=1e-5)
    assert_trees_close(h8.ema_params, h1.ema_params, rtol=1e-5, atol=1e-5)
    assert_trees_close(h8.opt_state, h1.opt_state, rtol=1e-4, atol=1e-6)
  assert s8.params['conv_out']['kernel'].sharding.mesh.devices.size == 8
  assert s1.params['conv_out']['kernel'].sharding.mesh.devices.size == 1
  # The comparison is not vacuous: training moved every parameter group away from init.
  assert not np.allclose(h1.params['conv_out']['kernel'], env.init.params['conv_out']['kernel'])
  assert not np.allclose(h1.params['conv_in']['kernel'], env.init.params['conv_in']['kernel'])


def test_train_step_is_deterministic_and_noise_depends_on_step(env, warm):
  outs = []
  for _ in range(2):
    state, metrics = env.step8(env.put(warm, env.mesh8), env.batch(env.mesh8))
    outs.append(jax.device_get((state, metrics)))
  assert_trees_equal(outs[0], outs[1])  # Same inputs: bit-identical state and metrics.

  state, metrics = env.step8(env.put(_with_step(warm, warm.step + 1), env.mesh8),
                             env.batch(env.mesh8))
  other_state, other = jax.device_get((state, metrics))
  assert other['loss'] != outs[0][1]['loss']  # Another step draws other t and noise.
  assert not np.array_equal(other_state.params['conv_out']['kernel'],
                            outs[0][0].params['conv_out']['kernel'])


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_nonfinite_batch_leaves_state_untouched(env, warm, bad):
  images = env.images.copy()
  images[3, 2, 5, 0] = bad
  state, metrics = env.step8(env.put(warm, env.mesh8), env.batch(env.mesh8, images=images))
  host, metrics = jax.device_get((state, metrics))
  assert metrics['nonfinite'] == 1.0
  assert not np.isfinite(metrics['loss'])
  assert int(host.step) == int(warm.step) + 1
  assert_trees_equal(host.params, warm.params)
  assert_trees_equal(host.ema_params, warm.ema_params)
  assert_trees_equal(host.opt_state, warm.opt_state)
  assert int(host.num_updates) == int(warm.num_updates) == 4  # Counts applied updates only.
  # Training continues normally from there.
  state, metrics = env.step8(state, env.batch(env.mesh8))
  host, metrics = jax.device_get((state, metrics))
  assert metrics['nonfinite'] == 0.0 and np.isfinite(metrics['loss'])
  assert (int(host.step), int(host.num_updates)) == (int(warm.step) + 2, 5)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host))
  assert not np.array_equal(host.params['conv_out']['kernel'], warm.params['conv_out']['kernel'])


def _copied_floats(compiled_text):
  """Float32 elements the entry computation of a compiled program copies (`copy` ops)."""
  entry = compiled_text[compiled_text.index('ENTRY'):]
  return sum(math.prod(int(d) for d in dims.split(',') if d)
             for dims in re.findall(r'= f32\[([\d,]*)\]\{[^}]*\} copy\(', entry))


@pytest.mark.parametrize('mesh_name,step_name', [('mesh1', 'step1'), ('mesh8', 'step8')])
def test_cpu_step_updates_the_donated_state_in_place(env, mesh_name, step_name):
  """The non-finite guard is a conditional on the CPU, so XLA updates the donated parameters,
  EMA and Adam moments in place. (A `where(finite, new, old)` over the state made it copy the
  old values every step: three times the parameter count.)"""
  mesh, step = getattr(env, mesh_name), getattr(env, step_name)
  text = step.lower(env.put(env.init, mesh), env.batch(mesh)).compile().as_text()
  num_params = sum(x.size for x in jax.tree.leaves(env.init.params))
  assert _copied_floats(text) < 0.05 * num_params


def _loss(env, host_state, labels):
  _, metrics = env.step1(env.put(host_state, env.mesh1), env.batch(env.mesh1, labels=labels))
  return float(jax.device_get(metrics['loss']))


def test_class_labels_matter_and_are_sometimes_dropped(env, warm):
  """Labels change the loss, except where the step drops them to the null class
  (training.cond_drop_prob = 0.5): changing such a label changes nothing, bit for bit."""
  base = env.labels
  assert _loss(env, warm, (base + 1) % NUM_CLASSES) != _loss(env, warm, base)
  dropped = 0
  total = 0
  for k in range(4):
    state = _with_step(warm, warm.step + k)
    reference = _loss(env, state, base)
    assert np.isfinite(reference)
    for i in range(BATCH):
      labels = base.copy()
      labels[i] = (labels[i] + 3) % NUM_CLASSES
      dropped += _loss(env, state, labels) == reference
      total += 1
  # Binomial(32, 0.5): both kinds must occur, in roughly equal numbers.
  assert 4 <= dropped <= total - 4, dropped


def _all_reduced_shapes(compiled_text):
  """The float32 result shapes of every all-reduce in a compiled program, one list per op."""
  return [re.findall(r'f32\[([\d,]*)\]', line.split(' all-reduce(')[0])
          for line in compiled_text.splitlines() if ' all-reduce(' in line]


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_cpu_devices_average_the_gradient_as_one_flat_vector(env, dropout):
  """Without dropout, the 8-device CPU step takes each device's gradient in a shard_map and
  averages it as one flat float32 vector (XLA:CPU's all-reduce costs ~30 us per tensor); with
  dropout it keeps XLA's per-tensor reduction, so the masks do not depend on the device count."""
  config = small_config()
  config.model.unet.dropout = dropout
  model = backbones.create_model(config.model, config.data.channels)
  step = train_state.make_train_step(model, env.tx, config, env.mesh8)
  text = step.lower(env.put(env.init, env.mesh8), env.batch(env.mesh8)).compile().as_text()
  num_params = sum(x.size for x in jax.tree.leaves(env.init.params))
  reduced = _all_reduced_shapes(text)
  if dropout == 0:
    assert reduced == [[str(num_params), '']]  # The flat gradient and the loss, one op.
    # model.conv_backend='xla': the shard_map checks its varying axes (off only for oneDNN).
    assert shard_map_checks(step, env.put(env.init, env.mesh8), env.batch(env.mesh8)) == [True]
  else:
    assert sum(len(shapes) for shapes in reduced) > 20  # A tensor per parameter.
    assert shard_map_checks(step, env.put(env.init, env.mesh8), env.batch(env.mesh8)) == []


def shard_map_checks(step, state, batch):
  """The check_vma flag of every shard_map in the traced train step (and its sub-jaxprs)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'shard_map':
        found.append(eqn.params['check_vma'])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)
  visit(step.trace(state, batch).jaxpr.jaxpr)
  return found
