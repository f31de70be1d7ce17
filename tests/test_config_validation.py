"""Config validation: every bad field fails fast with a ConfigError naming it, before anything
is compiled or written; every shipped config validates; sampling an empty workdir says what to do.

Nothing here compiles a model: the errors are raised before (that is the point), and the
shipped configs are only validated.
"""

import glob
import importlib
import os
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax import objectives
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.data import checks as data_checks
from diffusion_jax.modes import train as train_mode
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config

SHIPPED_CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs',
                                                                                  '*.py'))
                         if not os.path.basename(p).startswith('_'))


def _set(config, dotted, value):
  *parents, leaf = dotted.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


# (overrides, fields the message must name)
BAD_CONFIGS = {
    'unknown_beta_schedule': ({'diffusion.ddpm.beta_schedule': 'exponential'},
                              ['diffusion.ddpm.beta_schedule', 'exponential']),
    'unknown_sampler': ({'sample.sampler': 'nope'}, ['sample.sampler', 'nope']),
    'unknown_tfds_dataset': ({'data.dataset': 'no_such_dataset_xyz'},
                             ['data.dataset', 'no_such_dataset_xyz']),
    'resolution_not_divisible': ({'data.resolution': 10, 'model.unet.ch_mult': (1, 2, 2),
                                  'model.unet.attn_resolutions': ()},
                                 ['data.resolution=10', 'model.unet.ch_mult']),
    'batch_not_divisible_by_devices': ({'training.batch_size': 12}, ['training.batch_size=12']),
    'attention_resolution_not_reached': ({'model.unet.attn_resolutions': (4, 2)},
                                         ['model.unet.attn_resolutions', '[2]']),
    'unknown_prediction_type': ({'diffusion.ddpm.prediction_type': 'score'},
                                ['diffusion.ddpm.prediction_type', 'score']),
    'folder_dataset_without_folder': ({'data.dataset': 'folder', 'data.folder': ''},
                                      ['data.folder']),
}


@pytest.mark.parametrize('name', sorted(BAD_CONFIGS))
def test_bad_config_fails_fast_and_writes_nothing(tmp_path, name):
  overrides, fields = BAD_CONFIGS[name]
  config = tiny.get_config()
  validate_config(config)  # The base is fine ...
  for key, value in overrides.items():
    _set(config, key, value)
  workdir = tmp_path / 'w'
  with pytest.raises(ConfigError) as info:  # ... and each override alone breaks it.
    train_mode.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  for field in fields:
    assert field in message, (field, message)
  assert not workdir.exists()
  assert list(tmp_path.iterdir()) == []


def test_missing_folder_path_fails_and_writes_nothing(tmp_path):
  # Not a ConfigError (validate_config does not look at the disk), but the run must still fail
  # with a message naming data.folder and leave the workdir alone.
  config = tiny.get_config()
  config.data.dataset = 'folder'
  config.data.folder = str(tmp_path / 'no_such_folder')
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match='data.folder') as info:
    train_mode.train_and_evaluate(config, str(workdir))
  assert 'no_such_folder' in str(info.value)
  assert not workdir.exists(), sorted(str(p) for p in workdir.rglob('*'))


def test_every_problem_is_reported_at_once():
  config = tiny.get_config()
  config.sample.sampler = 'nope'
  config.diffusion.ddpm.prediction_type = 'score'
  config.training.batch_size = 12
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=8)
  message = str(info.value)
  for field in ('sample.sampler', 'diffusion.ddpm.prediction_type', 'training.batch_size'):
    assert field in message
  assert message.count('\n') >= 3  # Header + one line per problem.


def test_a_field_nothing_reads_is_refused_with_the_nearest_field(tmp_path):
  """ConfigDict.update adds any key: a field of an older layout or a typo would be silently
  ignored. Validation names it and the field meant, in every mode, before anything is written."""
  config = tiny.get_config()
  config.model.update(ch=8)  # model.unet.ch since the per-backbone sections.
  config.training.batchsize = 4
  for mode in ('train', 'sample', 'export'):
    with pytest.raises(ConfigError) as info:
      validate_config(config, mode=mode, num_devices=1)
    assert 'model.ch is not a config field' in str(info.value)
    assert 'did you mean model.classifier.ch or model.unet.ch?' in str(info.value)
    assert 'training.batchsize' in str(info.value) and 'training.batch_size' in str(info.value)
  with pytest.raises(ConfigError, match='model.ch'):
    train_mode.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_device_count_decides_batch_divisibility():
  config = tiny.get_config()
  config.training.batch_size = 12
  config.training.num_grid_samples = 12
  config.sample.batch_size = 12
  validate_config(config, num_devices=4)  # 12 = 3 x 4 devices: fine.
  validate_config(config, num_devices=2)
  with pytest.raises(ConfigError, match='training.batch_size=12'):
    validate_config(config, num_devices=8)
  config.mesh.data = 4  # Only 4 of the 8 devices share the batch: fine again, when asked for.
  config.mesh.allow_idle_devices = True
  validate_config(config, num_devices=8)


def test_unknown_mode_is_rejected():
  with pytest.raises(ConfigError, match='mode'):
    validate_config(tiny.get_config(), mode='serve')


def test_dataset_name_is_only_checked_when_data_is_read():
  config = tiny.get_config()
  config.data.dataset = 'no_such_dataset_xyz'
  validate_config(config, mode='sample')  # Sampling never reads the dataset.
  with pytest.raises(ConfigError, match='data.dataset'):
    validate_config(config, mode='train')


def test_shipped_config_list_is_complete():
  for name in ('default', 'digits', 'tiny', 'cifar10_ddpm', 'celeba64', 'stl10_96'):
    assert name in SHIPPED_CONFIGS


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_shipped_configs_validate(name):
  """Every config in configs/ passes for training and sampling on the 8 test devices (tfds
  names are checked against tfds.list_builders: nothing is downloaded)."""
  config = importlib.import_module(f'configs.{name}').get_config()
  # Classifier-guided configs (ADM-G) need their classifier's run, and are validated with one
  # in tests/test_classifier_import.py; here their model and sampler fields are.
  config.sample.classifier_scale = 0.0
  assert jax.device_count() == 8
  validate_config(config, mode='train')
  if objectives.draws_samples(config.diffusion.objective):  # Not a noisy classifier's run.
    validate_config(config, mode='sample')


def test_sample_mode_on_empty_workdir_says_train_first(tmp_path):
  workdir = tmp_path / 'empty'
  with pytest.raises(FileNotFoundError, match='train first') as info:
    sample_mode.generate(tiny.get_config(), str(workdir))
  assert str(workdir) in str(info.value)
  assert not workdir.exists()  # Looking for checkpoints does not create the run.


def test_sample_mode_validates_before_reading_checkpoints(tmp_path):
  config = tiny.get_config()
  config.sample.sampler = 'nope'
  with pytest.raises(ConfigError, match='sample.sampler'):
    sample_mode.generate(config, str(tmp_path / 'empty'))
  assert not (tmp_path / 'empty').exists()


POD_DEVICES = (1, 8, 16, 64, 256)
POD_PROCESSES = (1, 2, 4, 8, 16, 32)


def _mode_batch(config, mode):
  """The global batch `mode` splits over the devices (None: it splits none)."""
  if mode == 'train':  # The grid's sampling batch is padded to the devices: any size works.
    return config.training.batch_size
  if mode == 'sample':
    return config.sample.batch_size
  return config.eval.batch_size


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_shipped_configs_validate_at_pod_scales(name, monkeypatch):
  """Each shipped config validates in train, sample and eval mode on 1..256 devices and 1..32
  processes (devices % processes == 0), wherever its mode's batch has at least one example per
  device (tiny/digits are laptop configs: a 16-image batch cannot split over 64 chips). The
  dataset-metadata check is done once per config in test_shipped_configs_validate."""
  monkeypatch.setattr(data_checks, '_check_data_source', lambda *args: None)
  config = importlib.import_module(f'configs.{name}').get_config()
  config.sample.classifier_scale = 0.0  # As in test_shipped_configs_validate.
  checked = 0
  draws = objectives.draws_samples(config.diffusion.objective)
  for mode in ('train', 'sample', 'eval') if draws else ('train',):
    for devices in POD_DEVICES:
      if _mode_batch(config, mode) < devices:
        continue
      for processes in POD_PROCESSES:
        if devices % processes:
          continue
        validate_config(config, mode=mode, num_devices=devices, num_processes=processes)
        checked += 1
  assert checked >= (3 if draws else 1) * 10  # Every mode ran at least on 1 and 8 devices.
  # Pod training keeps the shipped grid size (it need not divide over the chips); the batch
  # is raised to one image per chip where the shipped one is smaller.
  for devices in (128, 256):
    pod = config.copy_and_resolve_references()
    pod.training.batch_size = max(pod.training.batch_size, devices)
    validate_config(pod, mode='train', num_devices=devices, num_processes=devices // 4)


@pytest.mark.parametrize('name', ['cifar10_ddpm', 'cifar10_cond', 'cifar10_improved'])
def test_pod_configs_cover_every_pod_scale(name, monkeypatch):
  """The CIFAR-10 pod configs: sample/eval on 256 chips x 32 hosts, train on 128 (its batch)."""
  monkeypatch.setattr(data_checks, '_check_data_source', lambda *args: None)
  config = importlib.import_module(f'configs.{name}').get_config()
  for mode in ('train', 'sample', 'eval'):
    if mode == 'train' and _mode_batch(config, mode) < 256:  # As many chips as grid images.
      validate_config(config, mode=mode, num_devices=_mode_batch(config, mode),
                      num_processes=16)
      continue
    validate_config(config, mode=mode, num_devices=256, num_processes=32)


def test_sample_batch_is_only_checked_when_sampling():
  """The old code checked sample.batch_size=1000 against 16 chips in train mode and stopped."""
  config = tiny.get_config()
  config.sample.batch_size = 1000
  config.training.batch_size = 32
  validate_config(config, mode='train', num_devices=16, num_processes=4)
  with pytest.raises(ConfigError, match='sample.batch_size=1000') as info:
    validate_config(config, mode='sample', num_devices=16, num_processes=4)
  assert 'e.g. 1008' in str(info.value)  # The next multiple of 16.
  validate_config(config, mode='eval', num_devices=16, num_processes=4)  # vlb draws none.
  config.eval.metrics = ('vlb', 'fid')  # ... but fid does.
  with pytest.raises(ConfigError, match='sample.batch_size=1000'):
    validate_config(config, mode='eval', num_devices=16, num_processes=4)


def test_grid_samples_are_only_checked_in_train():
  """Any positive grid size trains on any device count (train pads the grid's sampling batch
  to a multiple of the devices); a grid of no images is an error in train mode only."""
  config = tiny.get_config()
  config.training.num_grid_samples = 12
  validate_config(config, mode='train', num_devices=8)
  config.training.num_grid_samples = 0
  validate_config(config, mode='sample', num_devices=8)
  with pytest.raises(ConfigError, match='training.num_grid_samples=0'):
    validate_config(config, mode='train', num_devices=8)


LATE_FAILURES = {
    'training.log_every_steps': 0,        # ZeroDivisionError in the loop before.
    'training.checkpoint_every_steps': 0,
    'training.keep_checkpoints': 0,
    'optim.learning_rate': -1e-4,
    'optim.warmup_steps': -1,
    'training.sample_every_steps': -5,
}


@pytest.mark.parametrize('field', sorted(LATE_FAILURES))
def test_values_that_failed_late_fail_at_validation(field):
  config = tiny.get_config()
  _set(config, field, LATE_FAILURES[field])
  with pytest.raises(ConfigError) as info:
    validate_config(config, mode='train', num_devices=8)
  assert f'{field}={LATE_FAILURES[field]}' in str(info.value)
  assert str(info.value).count('\n') == 1  # Exactly this one problem.


def test_num_classes_must_match_the_data():
  config = tiny.get_config()  # digits: 10 classes.
  config.model.num_classes = 7
  validate_config(config, mode='sample', num_devices=8)  # Sampling reads no data.
  with pytest.raises(ConfigError, match='model.num_classes=7') as info:
    validate_config(config, mode='train', num_devices=8)
  assert 'num_classes=10' in str(info.value)
  config.model.num_classes = 10
  validate_config(config, mode='train', num_devices=8)


def test_num_classes_of_a_folder_counts_its_class_folders(tmp_path):
  for name in ('cat', 'dog', 'owl'):
    (tmp_path / name).mkdir()
  config = tiny.get_config()
  config.data.dataset = 'folder'
  config.data.folder = str(tmp_path)
  config.data.label_key = 'label'
  config.model.num_classes = 2
  with pytest.raises(ConfigError, match='has 3 classes'):
    validate_config(config, mode='train', num_devices=8)
  config.model.num_classes = 3
  validate_config(config, mode='train', num_devices=8)


def test_idle_devices_are_an_error_unless_allowed(caplog):
  config = tiny.get_config()
  config.mesh.data = 4
  with pytest.raises(ConfigError, match='leaving 4 idle') as info:
    validate_config(config, mode='train', num_devices=8)
  assert 'mesh.allow_idle_devices' in str(info.value)
  config.mesh.allow_idle_devices = True
  with caplog.at_level('WARNING'):
    validate_config(config, mode='train', num_devices=8)
  assert any('IDLE DEVICES' in r.getMessage() for r in caplog.records)
  config.mesh.data, config.mesh.fsdp = 4, 2  # 4 x 2 = all 8: no opt-in needed.
  config.mesh.allow_idle_devices = False
  validate_config(config, mode='train', num_devices=8)


def test_eval_accepts_sample_metrics_and_rejects_unknown_ones():
  config = tiny.get_config()
  config.eval.metrics = ('fid', 'kid', 'precision_recall', 'is', 'classifier_fd', 'vlb')
  validate_config(config, mode='eval', num_devices=8)
  config.eval.metrics = ('vlb', 'nope')
  with pytest.raises(ConfigError, match='eval.metrics'):
    validate_config(config, mode='eval', num_devices=8)
  config.eval.metrics = ('fid',)
  config.eval.batch_size = 12  # Read only by likelihood metrics.
  validate_config(config, mode='eval', num_devices=8)


def test_run_config_overrides_keep_the_saved_run():
  """config_for_run: the saved run's config + the command-line overrides (only those are
  requests); an override of a network field is an error naming it with both values."""
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  saved = tiny.get_config()
  saved.sample.steps = 7  # Differs from tiny.py: the saved value must win ...
  merged = run_config.config_for_run(saved, {'sample.batch_size': 32, 'mesh.fsdp': 2})
  assert merged.sample.steps == 7  # ... and only the overrides change it.
  assert merged.sample.batch_size == 32 and merged.mesh.fsdp == 2
  assert run_config.flatten(merged) == run_config.flatten(saved) | {'sample.batch_size': 32,
                                                                   'mesh.fsdp': 2}
  assert saved.sample.batch_size == tiny.get_config().sample.batch_size  # Not mutated.

  requested = tiny.get_config()
  requested.model.unet.ch = 64
  requested.model.unet.ch_mult = (2, 2)
  requested.diffusion.ddpm.beta_schedule = 'cosine'
  assert run_config.locked_differences(saved, requested) == [
      ('diffusion.ddpm.beta_schedule', saved.diffusion.ddpm.beta_schedule, 'cosine'),
      ('model.unet.ch', saved.model.unet.ch, 64),
      ('model.unet.ch_mult', saved.model.unet.ch_mult, (2, 2))]
  with pytest.raises(run_config.LockedFieldError) as info:
    run_config.config_for_run(saved, {'model.unet.ch': 64, 'sample.steps': 3})
  message = str(info.value)
  assert f'model.unet.ch: run has {saved.model.unet.ch!r}, requested 64' in message
  assert 'sample.' not in message  # A sampling field may change.


def test_run_config_json_round_trip_has_no_locked_differences(tmp_path):
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  run_config.save_run_config(config, str(tmp_path))
  loaded = run_config.load_run_config(str(tmp_path))
  assert run_config.locked_differences(config, loaded) == []
  assert loaded.model.unet.ch_mult == tuple(config.model.unet.ch_mult)


def test_eval_summary_prints_each_kind_of_metric():
  import main  # pylint: disable=g-import-not-at-top
  results = {'step': 5, 'num_examples': 40, 'eval_split': 'test',
             'vlb': {'bpd': 3.25, 'prior_bpd': 0.0}, 'fid': {'fid': 12.5, 'step': 5}}
  text = main.eval_summary(results, 'runs/x')
  assert text.splitlines() == ['vlb: 3.2500 bits/dim on 40 images', 'fid: fid=12.5',
                               'Step 5; details in runs/x/eval/']
  only_samples = {'kid': {'kid': 0.015, 'kid_std': 0.002, 'step': 3}, 'step': 3}
  assert main.eval_summary(only_samples, 'w') == ('kid: kid=0.015, kid_std=0.002\n'
                                                   'Step 3; details in w/eval/')


def test_a_model_without_null_class_refuses_guidance_and_label_dropout():
  """model.null_class=False (an imported guided-diffusion model) has no null embedding row."""
  config = tiny.get_config()  # digits: 10 classes.
  config.model.num_classes = 10
  config.model.null_class = False
  validate_config(config, mode='train', num_devices=8)
  validate_config(config, mode='sample', num_devices=8)
  config.training.cond_drop_prob = 0.1
  with pytest.raises(ConfigError, match='training.cond_drop_prob=0.1'):
    validate_config(config, mode='train', num_devices=8)
  config.sample.guidance_scale = 3.0
  with pytest.raises(ConfigError, match='sample.guidance_scale=3.0 needs the null-class'):
    validate_config(config, mode='sample', num_devices=8)
