"""guided-diffusion's noisy classifiers -> our NoisyClassifier (interop/openai_classifier.py),
classifier-guided sampling against their code, and the ADM-G configs.

The fixtures (tests/fixtures/openai_classifier/, made by make_openai_classifier_fixture.py with
the original guided-diffusion code and torch) hold tiny random EncoderUNetModels and their
logits, the published classifiers' key/shape maps and a guided sampling reference (their
p_sample_loop / ddim_sample_loop with classifier_sample.py's cond_fn); these tests need neither
torch nor that code.
"""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives
from diffusion_jax.config import run_config
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.interop import common
from diffusion_jax.interop import openai
from diffusion_jax.interop import openai_classifier
from diffusion_jax.interop import torch_pickle
from diffusion_jax.modes import validation
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.sampling import classifier_guidance
from diffusion_jax.training import restore

REPO = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(REPO))
FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'openai_classifier'
UNET_FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'openai' / 'guided_imagenet64_style'
CLASSIFIERS = ('attention_updown', 'adaptive_conv', 'spatial_half')
GUIDING = 'attention_updown'  # The classifier of the guided sampling reference.
# The README's CLASSIFIER_FLAGS string (128x128, 25-step DDIM section).
README_128 = ('--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 '
              '--classifier_width 128 --classifier_pool attention --classifier_resblock_updown '
              'True --classifier_use_scale_shift_norm True --classifier_scale 1.0 '
              '--classifier_use_fp16 True')


def _flags(name):
  return json.loads((FIXTURES / name / 'flags.json').read_text())


def _load(name):
  flags = _flags(name)
  return openai_classifier.load(str(FIXTURES / name / 'model.pt'), flags['classifier_flags'],
                                flags['diffusion_flags'])


def _nhwc(x_nchw):
  return jnp.asarray(np.asarray(x_nchw).transpose(0, 2, 3, 1))


def _classifier_fn(config, params):
  model = backbones.create_model(config.model, config.data.channels)
  return lambda x, t: model.apply({'params': params}, x, t)


# ------------------------------------------------------------------ the network


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_imported_logits_match_the_original_code(name):
  """Our classifier with the imported weights gives their EncoderUNetModel's logits (through
  their SpacedDiffusion wrapper, so rescale_timesteps included) on the same (x, t)."""
  config, params = _load(name)
  ref = np.load(FIXTURES / name / 'outputs.npz')
  logits = np.asarray(_classifier_fn(config, params)(_nhwc(ref['x']), jnp.asarray(ref['t'])))
  assert logits.shape == ref['logits'].shape
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-5, rtol=0)
  assert np.abs(ref['logits']).max() > 0.2  # Random weights: not a comparison of zeros ...
  assert np.ptp(ref['logits'], axis=0).max() > 0.01  # ... and the inputs / t matter.


def test_fixtures_cover_each_head_and_half_tensors():
  """The fixtures exercise the three heads, both downsamplings, rescaled timesteps, and a
  float16 state dict (cast to float32 on import)."""
  configs = {name: _load(name)[0] for name in CLASSIFIERS}
  assert [configs[n].model.classifier.pool for n in CLASSIFIERS] == ['attention', 'adaptive',
                                                                     'spatial']
  assert [configs[n].model.classifier.resblock_updown for n in CLASSIFIERS] == [True, False, True]
  assert configs['adaptive_conv'].model.timestep_scale == 1000 / 4000
  state = torch_pickle.load_state_dict(str(FIXTURES / 'spatial_half' / 'model.pt'))
  assert {t.dtype for t in state.values()} == {np.dtype('float16')}
  _, params = _load('spatial_half')
  assert {leaf.dtype for _, leaf in common.leaf_paths(params)} == {np.dtype('float32')}


def test_flags_become_config_fields():
  """Each flag lands in the field that expresses it, with guided-diffusion's defaults."""
  config = openai_classifier.config_from_flags(openai_classifier.parse_flags(README_128))
  m, c = config.model, config.model.classifier
  assert m.arch == 'classifier' and config.diffusion.objective == 'noisy_classifier'
  assert (c.ch, tuple(c.ch_mult), c.num_res_blocks) == (128, (1, 1, 2, 3, 4), 2)
  assert tuple(c.attn_resolutions) == (32, 16, 8) and (c.num_heads, c.num_head_channels) == (1, 64)
  assert (c.pool, c.use_scale_shift_norm, c.resblock_updown) == ('attention', True, True)
  assert (c.num_groups, c.norm_eps, c.downsample_padding, c.dropout) == (32, 1e-5, 1, 0.0)
  assert (m.num_classes, m.null_class, m.learn_sigma) == (1000, False, False)
  assert (m.flip_sin_to_cos, m.freq_shift, m.timestep_scale) == (True, 0, 1.0)
  assert (config.data.resolution, config.data.channels) == (128, 3)
  d = config.diffusion.ddpm
  assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end) == (1000, 'linear', 1e-4,
                                                                          0.02)
  assert config.sample.classifier_scale == 1.0
  # The 64x64 command line (depth 4), a cosine schedule with rescaled timesteps, scale 0.5.
  small = openai_classifier.config_from_flags(openai_classifier.parse_flags(
      '--image_size 64 --classifier_scale 0.5 --classifier_depth 4',
      '--diffusion_steps 4000 --noise_schedule cosine --rescale_timesteps True '
      '--learn_sigma True --timestep_respacing 250'))
  assert tuple(small.model.classifier.ch_mult) == (1, 2, 3, 4)
  assert small.model.classifier.num_res_blocks == 4
  assert tuple(small.model.classifier.attn_resolutions) == (32, 16, 8)
  assert (small.diffusion.ddpm.num_timesteps, small.diffusion.ddpm.beta_schedule) == (4000,
                                                                                      'cosine')
  assert small.model.timestep_scale == 0.25 and small.sample.classifier_scale == 0.5
  # 512x512: create_classifier's 0.5 multiplier, which our classifier takes.
  large = openai_classifier.config_from_flags(openai_classifier.parse_flags('--image_size 512'))
  assert tuple(large.model.classifier.ch_mult) == (0.5, 1, 1, 2, 2, 4, 4)
  # The schedule is set exactly as the diffusion model's import sets it (guidance compares them).
  model_config = openai.config_from_flags(openai.parse_flags('--image_size 64 --use_fp16 True',
                                                             '--noise_schedule linear'))
  classifier = openai_classifier.config_from_flags(openai_classifier.parse_flags(
      '--image_size 64'))
  assert classifier.diffusion.ddpm.to_dict() == {
      **classifier.diffusion.ddpm.to_dict(),
      **{k: model_config.diffusion.ddpm[k] for k in classifier_guidance.SCHEDULE_FIELDS}}


def test_published_classifiers_map_key_for_key():
  """The README flags of the published classifiers give configs whose every tensor has the key
  and shape their create_classifier's state dict has (shapes.json, built from their code), and
  no other."""
  table = json.loads((FIXTURES / 'shapes.json').read_text())
  assert sorted(table) == ['128x128_classifier', '256x256_classifier', '512x512_classifier',
                           '64x64_classifier']
  for name, entry in table.items():
    config = openai_classifier.config_from_flags(openai_classifier.parse_flags(
        entry['classifier_flags'], entry['diffusion_flags']))
    ours = openai_classifier.expected_shapes(config)
    theirs = {k: tuple(v) for k, v in entry['shapes'].items()}
    assert sorted(ours) == sorted(theirs), (name, sorted(set(ours) ^ set(theirs))[:5])
    assert ours == theirs, name
    assert sum(int(np.prod(s)) for s in ours.values()) == entry['num_params'], name


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize('case,message', [
    ('unknown_flag', '--classifier_fancy_pool'),
    ('model_flag', '--num_channels'),
    ('missing_tensor', 'input_blocks.2.0.in_layers.2.weight'),
    ('extra_tensor', 'out.2.extra_proj.weight'),
    ('misshapen_tensor', "'out.2.positional_embedding' has shape (8, 4)"),
    ('wrong_flags', "'input_blocks.0.0.bias' has shape (4,), expected (8,)"),
    ('bad_pool', "--classifier_pool='mean'"),
    ('unsupported_size', '--image_size=8'),
])
def test_bad_checkpoints_and_flags_fail_and_write_nothing(tmp_path, monkeypatch, case, message):
  """Each defect raises a ConversionError naming the tensor / flag; no workdir appears."""
  name = GUIDING
  flags = _flags(name)
  source = FIXTURES / name / 'model.pt'
  original = torch_pickle.load_state_dict(str(source))
  edit = None
  if case == 'unknown_flag':
    flags['classifier_flags'] += ' --classifier_fancy_pool True'
  elif case == 'model_flag':  # A MODEL_FLAGS flag of the diffusion model is named as such.
    flags['classifier_flags'] += ' --num_channels 192'
    message = '--num_channels is not a classifier'
  elif case == 'missing_tensor':
    edit = lambda sd: sd.pop(message)
  elif case == 'extra_tensor':
    edit = lambda sd: sd.update({message: np.zeros((3, 3), np.float32)})
  elif case == 'misshapen_tensor':
    key = 'out.2.positional_embedding'  # [C, HW+1] = [8, 17]; cut to [8, 4].
    edit = lambda sd: sd.update({key: sd[key][:, :4]})
  elif case == 'wrong_flags':  # The checkpoint is not the classifier the flags describe.
    flags['classifier_flags'] = flags['classifier_flags'].replace('--classifier_width 4',
                                                                  '--classifier_width 8')
  elif case == 'bad_pool':
    flags['classifier_flags'] += ' --classifier_pool mean'
  else:  # create_classifier has no 8x8 channel_mult: without ours, the flag is named.
    flags['classifier_flags'] = re.sub(r'--classifier_channel_mult \S+', '',
                                       flags['classifier_flags'])
  if edit is not None:  # The importer reads the edited copy of the fixture's state dict.
    edited = dict(original)
    edit(edited)
    monkeypatch.setattr(torch_pickle, 'open_state_dict', {str(source): edited}.__getitem__)
  with pytest.raises(common.ConversionError, match=re.escape(message)):
    openai_classifier.import_openai_classifier(str(source), str(tmp_path / 'run'),
                                               flags['classifier_flags'],
                                               flags['diffusion_flags'])
  assert not (tmp_path / 'run').exists()


def _convert(*args):
  """`python -m diffusion_jax.convert ARGS` in a fresh process (CPU)."""
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.convert', *args], cwd=REPO,
                        env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'},
                        capture_output=True, text=True, check=False)


def test_command_line_import(tmp_path):
  """`python -m diffusion_jax.convert --from=openai_classifier` writes a run that
  restore_params reads (params and EMA both the imported weights), a noisy-classifier run; an
  unknown flag exits non-zero naming it and writes nothing."""
  name = 'adaptive_conv'
  flags = _flags(name)
  source = FIXTURES / name / 'model.pt'
  done = _convert('--from=openai_classifier', f'--source={source}',
                  f'--workdir={tmp_path / "run"}',
                  f'--classifier_flags={flags["classifier_flags"]} --classifier_scale 3.5',
                  f'--diffusion_flags={flags["diffusion_flags"]}')
  assert done.returncode == 0, done.stderr
  config = run_config.load_run_config(str(tmp_path / 'run'))
  expected_config, expected = _load(name)
  assert config.model.to_dict() == expected_config.model.to_dict()
  assert config.diffusion.ddpm.to_dict() == expected_config.diffusion.ddpm.to_dict()
  assert (config.model.arch, config.diffusion.objective) == ('classifier', 'noisy_classifier')
  assert config.sample.classifier_scale == 3.5
  mesh = sharding.create_mesh(config.mesh)
  for use_ema in (True, False):
    params, step = restore.restore_params(config, str(tmp_path / 'run'), mesh, use_ema=use_ema)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)

  done = _convert('--from=openai_classifier', f'--source={source}',
                  f'--workdir={tmp_path / "bad"}',
                  f'--classifier_flags={flags["classifier_flags"]} --classifier_fancy_pool True')
  assert done.returncode != 0 and '--classifier_fancy_pool' in done.stderr
  assert not (tmp_path / 'bad').exists()


# ------------------------------------------------------------------ guided sampling


def _guided_setup(spacing, sampler):
  """The fixture U-Net's config (respaced as their reference), apply_fn, the classifier_fn and
  the reference arrays."""
  ref = np.load(FIXTURES / 'guided_sampling.npz')
  flags = json.loads((UNET_FIXTURE / 'flags.json').read_text())
  config, params = openai.load(str(UNET_FIXTURE / 'model.pt'), flags['model_flags'],
                               flags['diffusion_flags'] + f' --timestep_respacing {spacing}')
  assert str(ref[f'{sampler}_spacing']) == spacing
  config.sample.sampler = sampler
  config.sample.classifier_scale = float(ref['classifier_scale'])
  model = backbones.create_model(config.model, config.data.channels)
  apply_fn = lambda x, t, y=None: model.apply({'params': params}, x, t, y)
  classifier_config, classifier_params = _load(GUIDING)
  config.sample.classifier_workdir = 'unused'  # The pairing check reads only the two configs.
  assert classifier_guidance.check_classifier_run(
      config.sample, config.model, config.data, config.diffusion.ddpm, classifier_config,
      config.diffusion.objective) == []
  return config, apply_fn, _classifier_fn(classifier_config, classifier_params), ref


def _sample(config, apply_fn, ref, **kwargs):
  _, trajectory = objectives.get('ddpm').sample(
      apply_fn, config, _nhwc(ref['x_T']), jax.random.PRNGKey(0),
      labels=jnp.asarray(ref['y'], jnp.int32), trajectory_every=1, **kwargs)
  return np.asarray(trajectory.x_t).transpose(0, 1, 4, 2, 3)


def test_guided_ddpm_matches_condition_mean():
  """Their p_sample_loop with classifier_sample.py's cond_fn (the mean form mu + s Sigma grad
  log p(y|x_t), learned range, respacing '4', classifier fed the mapped timesteps), given the
  same per-step noise: our ddpm sampler's every step matches."""
  config, apply_fn, classifier_fn, ref = _guided_setup('4', 'ddpm')
  noise = jnp.asarray(ref['ddpm_noise'].transpose(0, 1, 3, 4, 2))
  ours = _sample(config, apply_fn, ref, variance_noise=noise, classifier_fn=classifier_fn)
  assert ours.shape == ref['ddpm_samples'].shape
  np.testing.assert_allclose(ours, ref['ddpm_samples'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours[-1], ref['ddpm_final'], atol=1e-5, rtol=0)
  # Guidance is visible at this tolerance: their unguided run from the same noise differs.
  assert np.abs(ref['unguided_ddpm_final'] - ref['ddpm_final']).max() > 1e-3


def test_guided_ddim_matches_condition_score():
  """Their ddim_sample_loop (eta 0, respacing 'ddim3') with cond_fn: the score form
  eps - s sqrt(1 - abar) grad log p(y|x_t) on the clipped x0's eps; our ddim matches each step."""
  config, apply_fn, classifier_fn, ref = _guided_setup('ddim3', 'ddim')
  ours = _sample(config, apply_fn, ref, classifier_fn=classifier_fn)
  assert ours.shape == ref['ddim_samples'].shape
  np.testing.assert_allclose(ours, ref['ddim_samples'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours[-1], ref['ddim_final'], atol=1e-5, rtol=0)
  assert np.abs(ref['unguided_ddim_final'] - ref['ddim_final']).max() > 1e-3


# ------------------------------------------------------------------ ADM-G configs

# (config module, option, the diffusion model's flags, its convert's DIFFUSION_FLAGS, the
# classifier's DIFFUSION_FLAGS): the docstrings' commands.
ADM_G = [
    ('adm_g_imagenet64', '', 'MODEL_FLAGS', '--timestep_respacing 250',
     '--diffusion_steps 1000 --noise_schedule cosine'),
    ('adm_g_imagenet64', 'ddim25', 'MODEL_FLAGS', '--timestep_respacing ddim25 --use_ddim True',
     '--diffusion_steps 1000 --noise_schedule cosine'),
    ('adm_g_imagenet128', '', 'MODEL_FLAGS', '--timestep_respacing 250', ''),
    ('adm_g_imagenet128', 'ddim25', 'MODEL_FLAGS', '--timestep_respacing ddim25 --use_ddim True',
     ''),
    ('adm_g_imagenet256', '', 'MODEL_FLAGS', '--timestep_respacing 250', ''),
    ('adm_g_imagenet256', 'uncond', 'UNCOND_MODEL_FLAGS', '--timestep_respacing 250', ''),
    ('adm_g_imagenet256', 'uncond,ddim25', 'UNCOND_MODEL_FLAGS',
     '--timestep_respacing ddim25 --use_ddim True', ''),
]
# The README's scales: 64 1.0, 128 0.5 (1.0 in its 25-step DDIM section), 256 1.0, uncond 10.
SCALES = {('adm_g_imagenet64', ''): 1.0, ('adm_g_imagenet64', 'ddim25'): 1.0,
          ('adm_g_imagenet128', ''): 0.5, ('adm_g_imagenet128', 'ddim25'): 1.0,
          ('adm_g_imagenet256', ''): 1.0, ('adm_g_imagenet256', 'uncond'): 10.0,
          ('adm_g_imagenet256', 'uncond,ddim25'): 10.0}


def _adm_g(name, option):
  module = importlib.import_module(f'configs.{name}')
  return module, module.get_config(option) if option else module.get_config()


@pytest.mark.parametrize('name,option,model_flags,diffusion_flags,classifier_diffusion', ADM_G)
def test_adm_g_configs_agree_with_the_import_and_validate(tmp_path, name, option, model_flags,
                                                          diffusion_flags,
                                                          classifier_diffusion):
  """Each ADM-G config is field for field what `convert --from=openai --config=<it>` writes
  for the README's MODEL_FLAGS (so the converted run samples with its settings), has the
  README's scale, steps and sample count, and passes --mode=sample validation guided by the
  README's classifier (its config.json written as `convert --from=openai_classifier` writes
  it), whose schedule must be the model's."""
  module, config = _adm_g(name, option)
  converted = openai.config_from_flags(
      openai.parse_flags(getattr(module, model_flags), diffusion_flags), base=config)
  assert converted.to_dict() == config.to_dict()
  s = config.sample
  assert s.classifier_scale == SCALES[(name, option)]
  assert (s.sampler, s.spacing) == (('ddim', 'ddim25') if 'ddim25' in option else ('ddpm', '250'))
  assert (s.variance, s.num_samples, config.eval.num_samples) == ('learned_range', 50_000, 50_000)
  classifier = openai_classifier.config_from_flags(
      openai_classifier.parse_flags(module.CLASSIFIER_FLAGS, classifier_diffusion))
  workdir = tmp_path / 'classifier'
  run_config.save_run_config(classifier, str(workdir))
  config.sample.classifier_workdir = str(workdir)
  validation.validate_config(config, mode='sample', num_devices=8, num_processes=1)
  # A classifier of another schedule is refused by name.
  openai.set_schedule(classifier.diffusion.ddpm, 1000,
                      'linear' if config.diffusion.ddpm.beta_schedule == 'cosine' else 'cosine')
  run_config.save_run_config(classifier, str(workdir))
  with pytest.raises(ConfigError, match='diffusion.ddpm.beta_schedule'):
    validation.validate_config(config, mode='sample', num_devices=8, num_processes=1)


def test_adm_g_config_options_are_checked():
  """An unknown option of configs/adm_g_*.py:OPTION is refused by name."""
  module, _ = _adm_g('adm_g_imagenet128', '')
  with pytest.raises(ValueError, match="'uncond'"):
    module.get_config('uncond')
