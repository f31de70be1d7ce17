"""Multi-rate EMAs, EDM2's power-function EMA and post-hoc EMA reconstruction (ema.py,
posthoc_ema.py): closed forms of the updates, the paper's sigma_rel <-> gamma relation, the
profile of a power EMA, least-squares reconstruction of an untracked EMA from snapshots, the
extra EMAs in the FSDP train step and checkpoints, and the CLI path train -> posthoc_ema -> sample.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import checkpoints
from diffusion_jax.training import restore
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.nn import backbones
from diffusion_jax.training import posthoc_ema
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config
from test_main import _tail, cli_env, run_cli  # pylint: disable=unused-import  (fixture)


def _run_emas(trajectory, specs, decay_at=lambda d: jnp.float32(d), snapshot_every=0):
  """Runs ema_lib.update_emas over `trajectory` [T, D] (the params after updates 1..T) from EMAs
  starting at 0; returns the final EMAs {key: [D]} and every step's EMAs {key: [T, D]}."""
  keys = [s.key for s in specs]
  init = {k: jnp.zeros(trajectory.shape[1:], jnp.float32) for k in keys}

  def body(emas, xs):
    step, params = xs
    emas = ema_lib.update_emas(emas, params, step, specs, decay_at)
    return emas, emas

  final, history = jax.lax.scan(body, init, (jnp.arange(trajectory.shape[0]),
                                             jnp.asarray(trajectory, jnp.float32)))
  return jax.device_get(final), jax.device_get(history)


# ------------------------------------------------------------------ multi-rate EMA


def test_multi_rate_ema_equals_its_closed_form():
  """Constant decays d on theta_t = a + t b (t = 1..k) from e_0 = 0:
  e_k = (1 - d) sum_{t=1..k} d^(k-t) (a + t b), in closed form
  sum_{j<k} d^j = (1 - d^k)/(1 - d),  sum_{j<k} j d^j = d (1 - k d^(k-1) + (k-1) d^k)/(1 - d)^2,
  and for constant params (b = 0): e_k = (1 - d^k) a."""
  decays = (0.5, 0.9, 0.99)
  specs = [ema_lib.EmaSpec(ema_lib.DECAY, d) for d in decays]
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=4), rng.normal(size=4)
  k = 37
  t = np.arange(1, k + 1, dtype=np.float64)[:, None]
  for slope in (0.0, 1.0):
    final, _ = _run_emas(a + slope * t * b, specs)
    for d in decays:
      geo = (1 - d**k) / (1 - d)
      jgeo = d * (1 - k * d**(k - 1) + (k - 1) * d**k) / (1 - d)**2
      # sum_{t=1..k} d^(k-t) t = sum_{j<k} d^j (k - j) = k geo - jgeo.
      want = (1 - d) * (geo * a + slope * (k * geo - jgeo) * b)
      np.testing.assert_allclose(final[ema_lib.state_key(ema_lib.DECAY, d)], want, rtol=2e-5, atol=2e-6)
  # Distinct rates give distinct EMAs (a shared buffer or a wrong key would not).
  assert len({float(v[0]) for v in final.values()}) == len(decays)


def test_extra_decays_use_the_primary_warmup_rule():
  """With optim.ema_warmup the extra decays follow train_state.ema_decay_at like the primary."""
  specs = [ema_lib.EmaSpec(ema_lib.DECAY, 0.999)]
  traj = np.arange(1, 6, dtype=np.float64)[:, None]

  def body(emas, xs):
    step, params = xs
    out = ema_lib.update_emas(emas, params, step, specs,
                          lambda d: train_state.ema_decay_at(step, d, True))
    return out, None

  final, _ = jax.lax.scan(body, {specs[0].key: jnp.zeros((1,), jnp.float32)},
                          (jnp.arange(5), jnp.asarray(traj, jnp.float32)))
  e = 0.0
  for n in range(5):
    d = min(0.999, (1 + n) / (10 + n))
    e = d * e + (1 - d) * (n + 1)
  np.testing.assert_allclose(np.asarray(final[specs[0].key])[0], e, rtol=1e-6)


# ------------------------------------------------------------------ power-function EMA


def test_sigma_rel_gamma_and_beta_follow_the_paper():
  # EDM2 Sec. 3.1: sigma_rel = 0.05 and 0.10 are gamma = 16.97 and 6.94.
  assert ema_lib.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
  assert ema_lib.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
  for gamma in (0.3, 1.0, 6.94, 16.97, 80.0):
    # sigma_rel from the profile p(x) = (g+1) x^g on [0, 1], by numerical integration.
    x = (np.arange(200_000) + 0.5) / 200_000
    p = (gamma + 1) * x**gamma
    p /= p.sum()
    mean = np.sum(p * x)
    numeric = math.sqrt(np.sum(p * x * x) - mean**2)
    assert ema_lib.gamma_to_sigma_rel(gamma) == pytest.approx(numeric, rel=1e-5)
    assert ema_lib.sigma_rel_to_gamma(ema_lib.gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)
  for t in (1, 2, 10, 1000, 10**6):
    for gamma in (6.94, 16.97):
      want = (1.0 - 1.0 / t) ** (gamma + 1)
      assert float(ema_lib.power_beta(t, gamma)) == pytest.approx(want, rel=1e-5, abs=1e-7)
      assert float(ema_lib._power_weight(t, gamma)) == pytest.approx(1 - want, rel=1e-5, abs=1e-7)
  with pytest.raises(ValueError, match='sigma_rel'):
    ema_lib.sigma_rel_to_gamma(0.3)


def test_power_ema_is_the_weighted_sum_of_its_profile():
  """The update rule run over a random trajectory equals sum_tau w_tau(t) theta_tau with the
  discrete profile weights, at every step t, whatever the start value (beta_1 = 0)."""
  rng = np.random.default_rng(1)
  steps = 300
  traj = np.cumsum(rng.normal(size=(steps, 6)), axis=0)
  specs = [ema_lib.EmaSpec(ema_lib.SIGMA_REL, s) for s in (0.05, 0.1, 0.2)]
  _, history = _run_emas(traj, specs)
  for spec in specs:
    for t in (1, 2, 17, 150, steps):
      w = ema_lib.power_profile(t, spec.gamma, steps)
      assert w.sum() == pytest.approx(1.0, abs=1e-12) and not w[t:].any()
      np.testing.assert_allclose(history[spec.key][t - 1], w @ traj, rtol=1e-4, atol=1e-4)
  # The profile matches the paper's continuous one for large t: p(tau) ~ (g+1) tau^g / t^(g+1).
  gamma, t = ema_lib.sigma_rel_to_gamma(0.1), 5000
  w = ema_lib.power_profile(t, gamma, t)
  tau = np.arange(1, t + 1) - 0.5
  np.testing.assert_allclose(w, (gamma + 1) * tau**gamma / t**(gamma + 1), atol=2e-6)
  a = ema_lib.discrete_inner_products([t, t // 2], [gamma, 16.97])
  b = ema_lib.continuous_inner_products([t, t // 2], [gamma, 16.97])
  np.testing.assert_allclose(a, b, rtol=2e-3)


# ------------------------------------------------------------------ post-hoc reconstruction


@pytest.mark.parametrize('profile', ema_lib.PROFILE_KINDS)
def test_posthoc_recovers_an_untracked_power_ema(profile):
  """Snapshots (every 100 of 2000 steps) of the 0.05 and 0.10 power EMAs of a random-walk
  trajectory; the reconstruction of sigma_rel = 0.07 (not tracked) at the last step must be
  much closer to the true 0.07 EMA than either tracked EMA is."""
  rng = np.random.default_rng(2)
  steps, every = 2000, 100
  traj = np.cumsum(rng.normal(size=(steps, 64)), axis=0) / 10.0
  tracked = [ema_lib.EmaSpec(ema_lib.SIGMA_REL, s) for s in (0.05, 0.1)]
  target = ema_lib.EmaSpec(ema_lib.SIGMA_REL, 0.07)
  final, history = _run_emas(traj, tracked + [target])
  times = list(range(every, steps + 1, every))
  cols = [(t, spec) for t in times for spec in tracked]
  weights, error = ema_lib.solve_posthoc([t for t, _ in cols], [s.gamma for _, s in cols], steps,
                                     target.gamma, profile)
  assert error < 0.05  # Relative L2 distance of the profiles.
  recon = ema_lib.weighted_sum([history[s.key][t - 1] for t, s in cols], weights)
  truth = final[target.key]
  miss = np.linalg.norm(recon - truth)
  nearest = min(np.linalg.norm(final[s.key] - truth) for s in tracked)
  assert miss < 0.1 * nearest, (miss, nearest)
  np.testing.assert_allclose(recon, truth, atol=0.02 * np.abs(truth).max())
  # A tracked sigma_rel at a snapshot time is reproduced (weight ~1 on that snapshot).
  weights, error = ema_lib.solve_posthoc([t for t, _ in cols], [s.gamma for _, s in cols], 1000,
                                     tracked[1].gamma, profile)
  assert error < 1e-6
  np.testing.assert_allclose(ema_lib.weighted_sum([history[s.key][t - 1] for t, s in cols], weights),
                             history[tracked[1].key][999], atol=1e-3)


# ------------------------------------------------------------------ config checks


def test_config_errors_name_the_fields():
  config = tiny.get_config()
  config.optim.ema_decays = (0.9, 1.5)
  config.optim.ema_sigma_rels = (0.05, 0.05)
  config.optim.ema_snapshot_every_steps = -2
  with pytest.raises(ConfigError) as info:
    validate_config(config, 'train')
  message = str(info.value)
  assert 'optim.ema_decays contains 1.5' in message
  assert 'optim.ema_sigma_rels=(0.05, 0.05) lists a value twice' in message
  assert 'optim.ema_snapshot_every_steps=-2' in message
  config = tiny.get_config()
  config.optim.ema_snapshot_every_steps = 10
  with pytest.raises(ConfigError, match='optim.ema_sigma_rels is empty'):
    validate_config(config, 'train')
  config = tiny.get_config()
  config.optim.ema_decays = (0.99,)
  config.sample.ema = 'decay:0.9'
  with pytest.raises(ConfigError, match=r"sample.ema='decay:0.9' is not among"):
    validate_config(config, 'sample')
  config.sample.ema = 'fast'
  with pytest.raises(ConfigError, match=r"sample.ema='fast' must be"):
    validate_config(config, 'sample')
  config.sample.ema = 'decay:0.99'
  validate_config(config, 'sample')
  validate_config(config, 'export')  # --mode=export writes the sampler of the EMA sample reads.
  config.sample.ema = 'decay:0.9'
  with pytest.raises(ConfigError, match=r"sample.ema='decay:0.9' is not among"):
    validate_config(config, 'export')
  config.sample.ema = 'sigma_rel:0.07'
  with pytest.raises(ConfigError, match='posthoc_ema.sigma_rel=0.07'):
    validate_config(config, 'sample')
  with pytest.raises(ConfigError, match=r'posthoc_ema.sigma_rel=0.0 must be in'):
    validate_config(tiny.get_config(), 'posthoc_ema')


def test_posthoc_without_snapshots_names_the_fields(tmp_path):
  config = tiny.get_config()
  config.posthoc_ema.sigma_rel = 0.08
  with pytest.raises(ConfigError, match='optim.ema_snapshot_every_steps > 0'):
    posthoc_ema.reconstruct(config, str(tmp_path))
  assert not any(tmp_path.iterdir())  # Nothing written.


# ------------------------------------------------------------------ train state and checkpoints


def _fsdp_config():
  config = tiny.get_config()
  config.model.unet.dropout = 0.0
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 2e-3
  config.optim.ema_decays = (0.5, 0.9)
  config.optim.ema_sigma_rels = (0.1,)
  config.model.unet.num_res_blocks, config.model.unet.attn_resolutions = 1, ()  # Quicker to compile.
  config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 4, 256
  return config


def test_extra_emas_are_fsdp_sharded_and_follow_their_rules_in_the_train_step():
  from test_distributed import host_batches  # pylint: disable=g-import-not-at-top
  config = _fsdp_config()
  mesh = sharding.create_mesh(config.mesh)
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  state = train_state.create_train_state(config, mesh, jax.random.PRNGKey(0))
  step_fn = train_state.make_train_step(model, tx, config, mesh)
  assert state.extra_emas is not None
  assert sorted(state.extra_emas) == sorted(ema_lib.ema_keys(config.optim))
  params = [jax.device_get(state.params)]
  sharded = 0
  for key, tree in state.extra_emas.items():
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(tree)):
      assert e.dtype == jnp.float32 and e.sharding == p.sharding, key
      sharded += 'fsdp' in tuple(e.sharding.spec)
  assert sharded > 10
  for b in host_batches(2, 16):
    state, _ = step_fn(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    params.append(jax.device_get(state.params))
  for key, tree in state.extra_emas.items():
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(tree)):
      assert e.sharding == p.sharding, key
  extra = jax.device_get(state.extra_emas)
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[-3], np.float64)
  p0, p1, p2 = (leaf(p) for p in params)
  for d in (0.5, 0.9):  # e1 = d p0 + (1-d) p1, e2 = d e1 + (1-d) p2 (no warmup).
    want = d * (d * p0 + (1 - d) * p1) + (1 - d) * p2
    np.testing.assert_allclose(leaf(extra[ema_lib.state_key(ema_lib.DECAY, d)]), want, rtol=1e-5,
                               atol=1e-6)
  beta2 = float(ema_lib.power_beta(2, ema_lib.sigma_rel_to_gamma(0.1)))  # beta_1 = 0: e1 = p1.
  np.testing.assert_allclose(leaf(extra[ema_lib.state_key(ema_lib.SIGMA_REL, 0.1)]),
                             beta2 * p1 + (1 - beta2) * p2, rtol=1e-5, atol=1e-6)


def _small_state(extra_keys=()):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
  tx = train_state.create_optimizer(tiny.get_config().optim, 10)
  return train_state.TrainState(
      step=jnp.asarray(3, jnp.int32), params=params,
      ema_params=jax.tree.map(lambda p: p + 1.0, params), opt_state=tx.init(params),
      extra_emas={k: jax.tree.map(lambda p, i=i: p * (i + 2.0), params)
                  for i, k in enumerate(extra_keys)} or None)


def test_checkpoint_layout_and_old_checkpoints_with_extra_emas(tmp_path):
  """No extra EMAs: the layout is unchanged (no 'extra_emas' item). A checkpoint without them
  restores into a state that has them (they start at its params); one with them round-trips
  exactly, and sample/eval read a single one by name."""
  keys = ('decay_0p9', 'sigma_rel_0p1')
  plain = _small_state()
  assert checkpoints.EXTRA_EMA_ITEM not in checkpoints.state_items(plain)
  old_dir, new_dir = tmp_path / 'old', tmp_path / 'new'
  for workdir, state in ((old_dir, plain), (new_dir, _small_state(keys))):
    manager = checkpoints.create_manager(str(workdir), async_save=False)
    checkpoints.save(manager, 3, state)
    manager.wait_until_finished()
    manager.close()
  assert not (old_dir / 'checkpoints' / '3' / checkpoints.EXTRA_EMA_ITEM).exists()
  assert (new_dir / 'checkpoints' / '3' / checkpoints.EXTRA_EMA_ITEM).is_dir()
  target = _small_state(keys)
  for workdir, want in ((old_dir, {k: plain.params for k in keys}),
                        (new_dir, _small_state(keys).extra_emas)):
    manager = checkpoints.create_manager(str(workdir), read_only=True, async_save=False)
    restored, step = checkpoints.restore_latest(manager, target)
    manager.close()
    assert step == 3
    for k in keys:
      np.testing.assert_array_equal(restored.extra_emas[k]['w'], want[k]['w'])
    np.testing.assert_array_equal(restored.ema_params['w'], plain.ema_params['w'])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          plain.params)
  one, step = restore.restore_extra_ema(str(new_dir), 'sigma_rel_0p1', 'sigma_rel:0.1',
                                            abstract)
  np.testing.assert_array_equal(one['w'], _small_state(keys).extra_emas['sigma_rel_0p1']['w'])
  with pytest.raises(checkpoints.NoCheckpointError, match='no EMA'):
    restore.restore_extra_ema(str(old_dir), 'decay_0p9', 'decay:0.9', abstract)


# ------------------------------------------------------------------ end to end through the CLI


EMA_FLAGS = ['--config.optim.ema_decays=(0.2,0.99)', '--config.optim.ema_sigma_rels=(0.05,0.1)',
             '--config.optim.ema_snapshot_every_steps=2', '--config.training.num_train_steps=6',
             '--config.training.sample_every_steps=0', '--config.training.keep_checkpoints=1']


def test_train_posthoc_and_sample_through_the_cli(tmp_path, cli_env):
  """tiny: train 6 steps with 2 extra decays, 2 power EMAs and snapshots every 2 steps; then
  --mode=posthoc_ema for sigma_rel 0.08 writes sum_i w_i snapshot_i, and --mode=sample draws
  with it (and with an extra decay), each different from the primary EMA's samples."""
  workdir = tmp_path / 'run'
  proc = run_cli(cli_env, f'--workdir={workdir}', *EMA_FLAGS)
  assert proc.returncode == 0, _tail(proc)
  assert sorted(int(p.name) for p in (workdir / 'ema_snapshots').iterdir()
                if p.name.isdigit()) == [2, 4, 6]  # keep_checkpoints=1 does not touch them.
  assert [p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()] == ['6']

  proc = run_cli(cli_env, f'--workdir={workdir}', '--mode=posthoc_ema',
                 '--config.posthoc_ema.sigma_rel=0.08')
  assert proc.returncode == 0, _tail(proc)
  out = workdir / 'posthoc_ema' / 'sigma_rel_0p08' / '6'
  assert 'relative L2 fit error' in proc.stderr
  fit = posthoc_ema.read_fit(out)
  assert fit['step'] == 6 and len(fit['snapshots']) == 6 and 0 <= fit['relative_error'] < 0.5

  # The written parameters are the fitted combination of the snapshots.
  config = tiny.get_config()
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  abstract = train_state.abstract_train_state(config, mesh).ema_params
  recon, step = posthoc_ema.restore_reconstruction(str(workdir), 0.08, abstract)
  assert step == 6
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  reader = posthoc_ema.create_snapshot_manager(str(workdir), async_save=False, read_only=True)
  terms = []
  for s in (2, 4, 6):
    keys = [key for step, key, _ in fit['snapshots'] if step == s]
    snap = reader.restore(s, args=ocp.args.Composite(power_emas=ocp.args.StandardRestore(
        {key: abstract for key in keys})))['power_emas']
    terms += [(jax.device_get(snap[key]), w) for step, key, w in fit['snapshots'] if step == s]
  reader.close()
  want = ema_lib.weighted_sum([t for t, _ in terms], [w for _, w in terms])
  for a, b in zip(jax.tree.leaves(jax.device_get(recon)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  expected_weights, _ = ema_lib.solve_posthoc(
      [s for s, _, _ in fit['snapshots']],
      [ema_lib.sigma_rel_to_gamma(0.05 if k.endswith('0p05') else 0.1)
       for _, k, _ in fit['snapshots']], 6, ema_lib.sigma_rel_to_gamma(0.08))
  np.testing.assert_allclose([w for _, _, w in fit['snapshots']], expected_weights, rtol=1e-6)

  arrays = {}
  for name in ('', 'posthoc:0.08', 'decay:0.2'):
    proc = run_cli(cli_env, f'--workdir={workdir}', '--mode=sample', f'--config.sample.ema={name}',
                   '--config.sample.num_samples=8', '--config.sample.batch_size=8')
    assert proc.returncode == 0, _tail(proc)
    found = [p for p in (workdir / 'samples').rglob('samples.npz')]
    new = [p for p in found if p not in arrays.values()]
    assert len(new) == 1, found
    arrays[name] = new[0]
  images = {n: np.load(p)['arr_0'] for n, p in arrays.items()}
  assert all(x.shape == (8, 8, 8, 1) for x in images.values())
  assert not np.array_equal(images[''], images['posthoc:0.08'])
  # digits' primary EMA warms up as min(d, (1+n)/(10+n)): 0.2 differs from it at n >= 2.
  assert not np.array_equal(images[''], images['decay:0.2'])

  proc = run_cli(cli_env, f'--workdir={workdir}', '--mode=sample',
                 '--config.sample.ema=posthoc:0.2')
  assert proc.returncode != 0 and 'posthoc_ema.sigma_rel=0.2' in proc.stderr, _tail(proc)


# ------------------------------------------------------------------ skipped non-finite steps


def test_skipped_steps_keep_the_power_emas_and_their_reconstruction_exact(tmp_path, monkeypatch):
  """training.on_nonfinite='skip' with step 3's batch NaN: 6 steps are 5 applied updates
  theta_1..theta_5 (the params of steps 1, 2, 4, 5, 6; step 3 leaves them as step 2's). Each
  power-EMA snapshot (steps 2, 4, 6 after 2, 3, 5 updates) is the closed-form power profile of
  the applied updates, sum_tau w_tau(n) theta_tau; a post-hoc EMA is the profile solve_posthoc
  fitted on those update counts (exactly the tracked EMA for its own sigma_rel). Counting
  steps instead (t = step + 1) shifts every weight from step 3 on: snapshot 4 would be
  built from t = 1, 2, 4 and its reconstruction would not match."""
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from diffusion_jax.modes import train as train_mode  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real = pipeline.global_batches

  def poisoned(dataset, batch_sharding):
    for i, batch in enumerate(real(dataset, batch_sharding)):
      yield dict(batch, image=batch['image'] * jnp.nan) if i == 2 else batch

  monkeypatch.setattr(pipeline, 'global_batches', poisoned)
  config = tiny.get_config()
  config.model.unet.dropout = 0.0
  config.optim.warmup_steps, config.optim.learning_rate = 0, 1e-2  # Big steps: clear weights.
  config.optim.ema_sigma_rels = (0.05, 0.1)
  config.optim.ema_snapshot_every_steps = 2
  config.training.update(num_train_steps=6, checkpoint_every_steps=1, keep_checkpoints=10,
                         log_every_steps=2, sample_every_steps=0, on_nonfinite='skip')
  workdir = tmp_path / 'run'
  state = train_mode.train_and_evaluate(config, str(workdir))
  assert (int(state.step), int(state.num_updates)) == (6, 5)
  assert not (workdir / 'samples').exists()  # sample_every_steps=0: no grid, not even the last.

  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  abstract = train_state.abstract_train_state(config, mesh)
  manager = checkpoints.create_manager(str(workdir), read_only=True, async_save=False)
  params = {s: jax.device_get(manager.restore(s, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract.params)))['params']) for s in range(1, 7)}
  manager.close()
  leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  for a, b in zip(leaves(params[3]), leaves(params[2])):
    np.testing.assert_array_equal(a, b)  # The skipped step changed nothing.
  thetas = [leaves(params[s]) for s in (1, 2, 4, 5, 6)]

  def ideal(weights):  # sum_tau weights[tau - 1] theta_tau, leaf by leaf, in float64.
    return [sum(w * theta[i] for w, theta in zip(weights, thetas)) for i in range(len(thetas[0]))]

  infos = posthoc_ema.list_snapshots(str(workdir))
  assert [(i['step'], i['updates']) for i in infos] == [(2, 2), (4, 3), (6, 5)]
  reader = posthoc_ema.create_snapshot_manager(str(workdir), async_save=False, read_only=True)
  snapshots = {}
  for info in infos:
    snapshots[info['step']] = jax.device_get(reader.restore(info['step'], args=ocp.args.Composite(
        power_emas=ocp.args.StandardRestore({k: abstract.ema_params for k in info['emas']})))[
            'power_emas'])
  reader.close()
  for info in infos:
    n = info['updates']
    for key, spec in info['emas'].items():
      want = ideal(list(ema_lib.power_profile(n, spec['gamma'], n)))
      for got, w in zip(leaves(snapshots[info['step']][key]), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=f'{info["step"]} {key}')

  for sigma_rel in (0.1, 0.08):
    config.posthoc_ema.sigma_rel = sigma_rel
    posthoc_ema.reconstruct(config, str(workdir), mesh)
    recon, step = posthoc_ema.restore_reconstruction(str(workdir), sigma_rel,
                                                     abstract.ema_params)
    fit = posthoc_ema.read_fit(posthoc_ema.reconstruction_dir(str(workdir), sigma_rel) / '6')
    assert step == 6 and fit['updates'] == 5
    # The profile the fit assumed: sum_i x_i w_i(tau) over the applied updates tau = 1..5.
    by_step = {i['step']: i for i in infos}
    assumed = sum(w * ema_lib.power_profile(by_step[s]['updates'],
                                            by_step[s]['emas'][key]['gamma'], 5)
                  for s, key, w in fit['snapshots'])
    if sigma_rel == 0.1:  # A tracked EMA: the fit is exact, the target's own profile.
      assert fit['relative_error'] < 1e-6
      np.testing.assert_allclose(
          assumed, ema_lib.power_profile(5, ema_lib.sigma_rel_to_gamma(0.1), 5), atol=1e-9)
    for got, w in zip(leaves(recon), ideal(list(assumed))):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
