"""The 'noisy_classifier' objective (objectives/noisy_classifier.py) and what the training loop
does for it: the labels in the loss, the per-t-quarter metrics through every gradient path and
the log window, no sample grid, and the configs it refuses.

Every model here is a tiny classifier (configs/digits_classifier.py at ch 16) on the digits, on
the digits demo's schedule (1000 linear steps); the paths test compiles five small train steps,
the training test runs 150 steps through `train_and_evaluate` (about a minute together on two
CPU cores).
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits_classifier, tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax import objectives
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.modes import train as train_mode
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.nn import backbones
from diffusion_jax.objectives import ddpm, noisy_classifier
from diffusion_jax.parallel import policy as policy_lib
from diffusion_jax.parallel import sharding
from diffusion_jax.training import hooks, run_log, train_state

NUM_CLASSES = 10
T = 1000  # configs/digits.py's schedule, which digits_classifier keeps.


def _config(batch_size: int = 16):
  """configs/digits_classifier.py with a 16-channel classifier."""
  config = digits_classifier.get_config()
  c = config.model.classifier
  c.ch, c.num_head_channels, c.num_groups = 16, 16, 8
  config.training.batch_size = batch_size
  config.training.async_checkpointing = False
  config.training.log_every_steps = 10
  return config


def _digits(n: int, offset: int = 0):
  images, labels = pipeline.load_digits()
  x0 = images[offset:offset + n].astype(np.float32) / 127.5 - 1.0
  return x0, labels[offset:offset + n].astype(np.int32)


def _hand_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """-log softmax(logits)[label] in float64, with numpy only."""
  z = logits.astype(np.float64)
  m = z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
  return lse - z[np.arange(len(labels)), labels]


# ------------------------------------------------------------------ the loss and its inputs


def test_the_loss_is_the_cross_entropy_against_the_true_labels():
  """per_example_loss == a cross-entropy by hand, on random logits and on the classifier's
  logits for a digits batch through the train step's gradient function (whose example gets
  the batch's labels from `_with_true_labels`, as the train step does)."""
  config = _config()
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (12, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, 12).astype(np.int32)
  got = noisy_classifier.per_example_loss(config, jnp.asarray(logits),
                                          {'label': jnp.asarray(labels)})
  np.testing.assert_allclose(np.asarray(got), _hand_cross_entropy(logits, labels), rtol=1e-5,
                             atol=1e-6)

  x0, y = _digits(16)
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  example = noisy_classifier.training_example(config, jnp.asarray(x0), noise,
                                              jax.random.PRNGKey(2))
  example = train_state._with_true_labels(example, {'image': x0, 'label': y})  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(example['label']), y)
  model = backbones.create_model(config.model, config.data.channels)
  params = jax.jit(lambda key: backbones.init_params(model, key, (8, 8, 1)))(
      jax.random.PRNGKey(3))
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  grad_fn = jax.jit(train_state._gradient_fn(model, config, mesh, policy_lib.BackendPolicy()))  # pylint: disable=protected-access
  (loss, sums), _ = grad_fn(params, example, jnp.asarray(y), jax.random.PRNGKey(4))
  out = np.asarray(jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, None))(
      params, example['x_t'], example['t']))
  hand = _hand_cross_entropy(out, y)
  np.testing.assert_allclose(float(loss), hand.mean(), rtol=1e-5)
  correct = np.argmax(out, axis=1) == y
  np.testing.assert_allclose([float(v) for v in sums['accuracy']], [correct.sum(), 16])


def test_training_examples_are_the_ddpm_objectives_draws():
  """t ~ U{0..T-1} and x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar from the linear
  betas by hand: the same t and x_t as the 'ddpm' objective draws from the same key (so the
  classifier sees the noise levels of the model it guides); noised=False: x0 at t = 0."""
  config = _config()
  x0, _ = _digits(256)
  noise = jax.random.normal(jax.random.PRNGKey(5), x0.shape)
  key = jax.random.PRNGKey(6)
  example = noisy_classifier.training_example(config, jnp.asarray(x0), noise, key)
  assert set(example) == {'x_t', 't'}
  t = np.asarray(example['t'])
  assert t.min() >= 0 and t.max() < T and len(np.unique(t)) > 100
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))[t][:, None, None, None]
  hand = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * np.asarray(noise)
  np.testing.assert_allclose(np.asarray(example['x_t']), hand, atol=1e-5)
  theirs = ddpm.training_example(config, jnp.asarray(x0), noise, key)
  np.testing.assert_array_equal(t, np.asarray(theirs['t']))
  np.testing.assert_array_equal(np.asarray(example['x_t']), np.asarray(theirs['x_t']))

  config.diffusion.noisy_classifier.noised = False
  clean = noisy_classifier.training_example(config, jnp.asarray(x0), noise, key)
  assert not np.any(np.asarray(clean['t']))
  np.testing.assert_array_equal(np.asarray(clean['x_t']), x0)


# ------------------------------------------------------------------ metrics per t quarter


def test_accuracy_and_loss_per_quarter_of_a_hand_built_batch():
  """Quarters floor(4 t / T) as guided-diffusion's; q2 holds no example: its count is 0, its
  mean NaN for the step, and in a log window with a step whose q2 is full, the window's q2
  mean is that step's alone (a count-weighted mean, not a mean of per-step means)."""
  config = _config()
  t = np.array([0, 100, 249, 250, 499, 750, 999], np.int32)
  np.testing.assert_array_equal(np.asarray(noisy_classifier.t_quarter(config, t)),
                                [0, 0, 0, 1, 1, 3, 3])
  labels = np.array([1, 2, 3, 4, 5, 6, 7], np.int32)
  predicted = np.array([1, 2, 0, 4, 0, 0, 0], np.int32)  # q0: 2/3, q1: 1/2, q3: 0/2.
  logits = np.full((7, NUM_CLASSES), -1.0, np.float32)
  logits[np.arange(7), predicted] = 2.0
  example = {'t': jnp.asarray(t), 'label': jnp.asarray(labels)}
  sums = noisy_classifier.step_metrics(config, jnp.asarray(logits), example)
  ce = _hand_cross_entropy(logits, labels)
  counts = {q: float(sums[f'acc_q{q}'][1]) for q in range(4)}
  assert counts == {0: 3.0, 1: 2.0, 2: 0.0, 3: 2.0}
  assert [float(sums[f'acc_q{q}'][0]) for q in range(4)] == [2.0, 1.0, 0.0, 0.0]
  np.testing.assert_allclose([float(sums[f'loss_q{q}'][0]) for q in range(4)],
                             [ce[:3].sum(), ce[3:5].sum(), 0.0, ce[5:].sum()], rtol=1e-5)
  assert [float(v) for v in sums['accuracy']] == [3.0, 7.0]

  metrics = {'loss': jnp.asarray(ce.mean()), 'nonfinite': jnp.asarray(0.0)}
  for name, (total, count) in sums.items():
    metrics[name + train_state.SUM_SUFFIX], metrics[name + train_state.COUNT_SUFFIX] = (
        total, count)
  means = train_state.step_metric_means(metrics)
  np.testing.assert_allclose([float(means[f'acc_q{q}']) for q in (0, 1, 3)], [2 / 3, 1 / 2, 0])
  assert np.isnan(float(means['acc_q2'])) and not any(k.endswith('/sum') for k in means)

  # A second step of the window: all four of its examples in q2, three of them right.
  other = {k: v for k, v in metrics.items()}
  for q in range(4):
    other[f'acc_q{q}/sum'] = jnp.asarray(3.0 if q == 2 else 0.0)
    other[f'acc_q{q}/count'] = jnp.asarray(4.0 if q == 2 else 0.0)
  window = hooks.mean_metrics([metrics, other])
  assert window['acc_q2'] == pytest.approx(3 / 4)     # Not (NaN or 0 + 3/4) / 2.
  assert window['acc_q0'] == pytest.approx(2 / 3)     # Only the first step counted q0.
  assert 'acc_q0/sum' not in window and 'acc_q0/count' not in window
  # A skipped (non-finite) step's sums are left out like its loss.
  skipped = dict(other, nonfinite=jnp.asarray(1.0))
  assert np.isnan(hooks.mean_metrics([metrics, skipped])['acc_q2'])


def _stack(batches):
  return jax.tree.map(lambda *x: np.stack(x), *batches)


def test_every_gradient_path_gives_the_plain_steps_metrics():
  """Two steps of one state: the plain path (one device, XLA's reductions) against the
  per-device shard_map gradients on 2 devices, gradient accumulation (2 micro-batches, plain
  and per-device) and steps_per_call=2: the same counts per quarter, and the same loss and
  sums up to float order."""
  config = _config()
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  mesh1 = sharding.create_mesh(config.mesh, jax.devices()[:1])
  mesh2 = sharding.create_mesh(config.mesh, jax.devices()[:2])
  init = jax.device_get(train_state.create_train_state(config, mesh1))
  batches = []
  for i in range(2):
    x0, y = _digits(16, offset=16 * i)
    batches.append({'image': x0, 'label': y})

  def run(mesh, policy, accum=1, k=1):
    cfg = _config()
    cfg.training.grad_accum_steps = accum
    step = train_state.make_train_step(model, tx, cfg, mesh, steps_per_call=k, policy=policy)
    state = jax.device_put(init, sharding.replicated(mesh))
    if k == 2:
      _, metrics = step(state, jax.device_put(_stack(batches),
                                              sharding.stacked_batch_sharding(mesh)))
      return [jax.tree.map(lambda v, i=i: np.asarray(v)[i], jax.device_get(metrics))
              for i in range(2)]
    out = []
    for batch in batches:
      state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      out.append(jax.device_get(metrics))
    return out

  per_device = policy_lib.policy_for(mesh2, config)
  assert per_device.per_device_grads  # Not vacuous: the shard_map path is the one run.
  plain = run(mesh1, policy_lib.BackendPolicy())
  others = {'per_device': run(mesh2, per_device),
            'accumulated': run(mesh1, policy_lib.BackendPolicy(), accum=2),
            'accumulated_per_device': run(mesh2, per_device, accum=2),
            'steps_per_call': run(mesh1, policy_lib.BackendPolicy(), k=2)}
  names = [f'{m}_q{q}' for m in ('acc', 'loss') for q in range(4)] + ['accuracy']
  for step_metrics in plain:
    assert set(step_metrics) == {'loss', 'grad_norm', 'learning_rate', 'nonfinite'} | {
        n + s for n in names for s in ('/sum', '/count')}
    assert float(step_metrics['accuracy/count']) == 16.0
    assert sum(float(step_metrics[f'acc_q{q}/count']) for q in range(4)) == 16.0
    np.testing.assert_allclose(  # The quarters' loss sums make up the batch's mean loss.
        sum(float(step_metrics[f'loss_q{q}/sum']) for q in range(4)) / 16,
        float(step_metrics['loss']), rtol=1e-5)
  for path, steps in others.items():
    for s, (want, got) in enumerate(zip(plain, steps)):
      assert set(got) == set(want), path
      for key in want:
        if key.endswith('/count'):
          assert float(got[key]) == float(want[key]), (path, s, key)
        else:
          np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=2e-4, atol=2e-4,
                                     err_msg=f'{path} step {s} {key}')


def test_other_objectives_train_steps_have_no_step_metrics():
  """A ddpm U-Net's train step (traced, not compiled) has only the four usual metrics, and its
  objective keeps its sample grid."""
  config = tiny.get_config()
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  step = train_state.make_train_step(model, tx, config, mesh)
  from diffusion_jax.training import loop  # pylint: disable=g-import-not-at-top
  _, metrics = jax.eval_shape(step, train_state.abstract_train_state(config, mesh),
                              loop.abstract_batch(config, mesh, 1))
  assert set(metrics) == {'loss', 'grad_norm', 'learning_rate', 'nonfinite'}
  assert hooks.sample_grid_due(config, config.training.sample_every_steps, False)
  classifier = _config()
  classifier.training.sample_every_steps = 3
  assert not hooks.sample_grid_due(classifier, 3, True)


# ------------------------------------------------------------------ a short training run


def test_a_short_run_learns_to_classify_the_least_noisy_quarter(tmp_path):
  """150 steps of batch 64 through `train_and_evaluate` (the CLI's loop, sample_every_steps
  > 0 yet no grid): train_metrics.jsonl and TensorBoard hold the loss and accuracy per t
  quarter; the loss falls and the accuracy of the least noisy quarter rises far above chance
  (10%), the noisiest stays near it. Measured (8 virtual CPU devices, the test set-up): window
  means at steps 50 -> 150 of acc_q0 0.30 -> 0.83, loss 2.25 -> 1.76; at 150 acc_q3 0.10,
  loss_q0 0.60 against loss_q3 2.32. The margins below leave ~0.2 of slack on each."""
  config = _config(batch_size=64)
  config.optim.learning_rate = 2e-3
  config.training.num_train_steps = 150
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 150
  config.training.sample_every_steps = 50     # An objective without samplers draws no grid.
  run = tmp_path / 'run'
  state = train_mode.train_and_evaluate(config, str(run))
  assert int(state.step) == 150
  assert not (run / 'samples').exists()

  rows = [json.loads(line) for line in (run / run_log.METRICS_FILE).read_text().splitlines()]
  assert [r['step'] for r in rows] == [50, 100, 150]
  for row in rows:
    assert {f'{m}_q{q}' for m in ('acc', 'loss') for q in range(4)} <= set(row)
    assert not any(k.endswith('/sum') or k.endswith('/count') for k in row)
  first, last = rows[0], rows[-1]
  assert last['loss'] < first['loss'] - 0.15, (first['loss'], last['loss'])
  assert last['acc_q0'] > 0.1 + 0.5, last['acc_q0']           # Chance is 0.1.
  assert last['acc_q0'] > last['acc_q3'] + 0.4, last
  assert last['loss_q0'] < last['loss_q3'] - 1.0, last

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(run), size_guidance={'tensors': 0})
  events.Reload()
  assert {'acc_q0', 'acc_q3', 'loss_q0', 'accuracy'} <= set(events.Tags()['tensors'])


# ------------------------------------------------------------------ refused configs


@pytest.fixture
def no_compiles(monkeypatch):
  """Any train step or sampler built fails the test: the refusals come before compiling."""
  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the config was refused')
  monkeypatch.setattr(train_state, 'make_train_step', refuse)
  monkeypatch.setattr(train_state, 'create_train_state', refuse)


def _refused(config, mode: str = 'train') -> str:
  with pytest.raises(ConfigError) as e:
    validate_config(config, mode, num_devices=2, num_processes=1)
  return str(e.value)


def test_bad_configs_are_refused_by_name_before_compiling(no_compiles, tmp_path):
  good = _config()
  validate_config(good, 'train', num_devices=2, num_processes=1)  # The baseline passes.

  unet = _config()
  unet.model.arch = 'unet'
  message = _refused(unet)
  assert "diffusion.objective='noisy_classifier'" in message and "model.arch='unet'" in message
  assert "set model.arch='classifier'" in message

  denoiser = _config()
  denoiser.diffusion.objective = 'ddpm'
  message = _refused(denoiser)
  assert "model.arch='classifier'" in message and "diffusion.objective='ddpm'" in message

  drop = _config()
  drop.training.cond_drop_prob = 0.1
  assert 'training.cond_drop_prob=0.1' in _refused(drop)

  sigma = _config()
  sigma.model.learn_sigma = True
  assert 'model.learn_sigma=True' in _refused(sigma)
  sigma.model.arch = 'unet'  # The objective names it too when the backbone would not.
  message = _refused(sigma)
  assert "trains logits, not a variance; set model.learn_sigma=False" in message

  evaluated = _config()
  evaluated.training.eval_every_steps = 100
  assert 'training.eval_every_steps=100' in _refused(evaluated)

  for mode in ('sample', 'export'):
    message = _refused(good, mode)
    assert f'--mode={mode}' in message and 'sample.classifier_workdir' in message, message
  likelihood = _config()
  likelihood.eval.metrics = ('vlb',)
  message = _refused(likelihood, 'eval')
  assert "('vlb',)" in message and 'sample.classifier_workdir' in message
  assert 'does not have; use one of ()' not in message  # Not the generic, useless advice.
  fid = _config()
  fid.eval.metrics = ('fid',)
  assert 'sample.classifier_workdir' in _refused(fid, 'eval')

  # And through the training entry point: nothing compiled, nothing written.
  with pytest.raises(ConfigError, match='training.cond_drop_prob'):
    train_mode.train_and_evaluate(drop, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()


def test_the_arch_rule_is_generic_over_the_registry():
  """ARCHS makes a backbone exclusive: the denoising objectives refuse it, the owner requires
  it, every unowned backbone stays free for the denoising objectives."""
  for name in ('ddpm', 'edm', 'flow_matching'):
    config = tiny.get_config()
    config.diffusion.objective = name
    assert not any('model.arch' in e for e in objectives.check_config(config)), name
    config.model.arch = 'classifier'
    assert any("model.arch='classifier' is trained only by" in e
               for e in objectives.check_config(config)), name
  assert objectives.draws_samples('ddpm') and not objectives.draws_samples('noisy_classifier')
