"""Run directories written before the 2026-12 package layout still load, sample and resume.

tests/fixtures/run_v0 was written by the code of commit 9c0ae21 (flat config fields such as
model.ch and diffusion.num_timesteps; tests/fixtures/make_run_v0_fixture.py says how): the
config.json, checkpoint 3 of a 6-step run of configs/tiny.py with an 8-channel U-Net, the
parameters and EMA that run reached at step 6, a CPU export of its sampler, and the old default
config (every flat field).
"""

import json
import pathlib
import platform
import shutil

import jax
import numpy as np
import pytest

from diffusion_jax import serving
from diffusion_jax.config import defaults, migration, run_config
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.modes import train as train_mode
from diffusion_jax.nn import backbones
from diffusion_jax.pipelines import sampler

FIXTURE = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'run_v0'


def _meta():
  return json.loads((FIXTURE / 'meta.json').read_text())


def _cpu_model():
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _copy(tmp_path):
  run = tmp_path / 'run_v0'
  shutil.copytree(FIXTURE, run)
  return run


def test_old_config_json_reads_in_the_new_layout():
  config = run_config.load_run_config(str(FIXTURE))
  assert (config.model.unet.ch, config.model.unet.num_groups) == (8, 4)
  assert config.model.unet.ch_mult == (1, 2)  # Lists come back as tuples.
  assert config.diffusion.ddpm.num_timesteps == 100
  assert config.model.arch == 'unet' and config.diffusion.objective == 'ddpm'
  # No flat field is left over next to its section.
  raw = json.loads((FIXTURE / 'config.json').read_text())
  assert 'ch' in raw['model'] and 'num_timesteps' in raw['diffusion']  # It is the old layout.
  flat = run_config.flatten(config)
  assert 'model.ch' not in flat and 'diffusion.num_timesteps' not in flat
  assert set(flat) == set(run_config.flatten(defaults.get_config()))


def test_every_old_default_field_has_its_new_place():
  """configs/default.py of the old code, migrated, has exactly today's fields, with today's
  defaults except where the old shared value is kept on purpose (the DiT read the U-Net's
  dropout of 0.1; today's DiT default is the paper's 0.0)."""
  old = json.loads((FIXTURE / 'old_default_config.json').read_text())
  migrated = run_config.flatten(migration.migrate(old))
  new = run_config.flatten(defaults.get_config())
  # Fields added since the fixture was written come from today's defaults when a run is read
  # (run_config.config_from_json); the old config has no field without a place.
  added_since = {k for k in new if k.startswith(('compile.', 'model.classifier.',
                                                 'diffusion.noisy_classifier.',
                                                 'sample.classifier_'))}
  assert set(migrated) == set(new) - added_since
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  changed = {k for k in migrated if norm(migrated[k]) != norm(new[k])}
  assert changed == {'model.dit.dropout'}, changed
  assert migrated['model.dit.dropout'] == old['model']['dropout'] == 0.1
  # A config already in today's layout is left as it is.
  assert migration.migrate(defaults.get_config().to_dict()) == defaults.get_config().to_dict()


def test_old_run_samples_as_its_export_does(tmp_path):
  """--mode=sample on the old run directory (checkpoint 3) writes its samples; the old export
  (step 6) still loads, and today's sampling program run on its weights draws its images."""
  run = _copy(tmp_path)
  config = run_config.config_for_run(run_config.load_run_config(str(run)),
                                     {'sample.num_samples': 16})
  out_dir = sample_mode.generate(config, str(run))
  with np.load(out_dir / 'samples.npz') as data:
    images = data['arr_0']
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 5

  export_dir = next((FIXTURE / 'export').iterdir())
  old = serving.load(export_dir)
  assert old.card['step'] == 6
  expected = old.sample(8, seed=3, as_uint8=False)
  model = backbones.create_model(config.model, config.data.channels)
  body = jax.jit(sampler.make_sample_body(model, config))
  key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
  got = np.asarray(body(old._params, key, old.default_labels(8)))  # pylint: disable=protected-access
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_old_run_resumes_bit_identically(tmp_path):
  """Training resumed from the old checkpoint 3 with today's code reaches the parameters and EMA
  the old code reached at step 6 (bit for bit on the processor that wrote them; another one's
  XLA may order float sums differently)."""
  run = _copy(tmp_path)
  config = run_config.load_run_config(str(run))
  state = train_mode.train_and_evaluate(config, str(run))
  assert int(state.step) == 6
  want = np.load(FIXTURE / 'continued_step6.npz')
  got = {jax.tree_util.keystr(path): np.asarray(leaf)
         for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}
  assert set(want.files) <= set(got)
  same_machine = _cpu_model() == _meta()['cpu_model'] and jax.device_count() == 8
  for name in want.files:
    if same_machine:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    else:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_changed_network_field_is_still_refused(tmp_path):
  run = _copy(tmp_path)
  saved = run_config.load_run_config(str(run))
  with pytest.raises(run_config.LockedFieldError, match=r'model\.unet\.ch: run has 8'):
    run_config.config_for_run(saved, {'model.unet.ch': 16})
