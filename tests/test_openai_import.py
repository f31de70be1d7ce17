"""improved/guided-diffusion checkpoints -> our U-Net (diffusion_jax/interop/openai.py).

The fixtures (tests/fixtures/openai/, made by make_openai_fixture.py with the original openai
model code and torch) hold tiny random UNetModels, their outputs and a respaced sampler
reference; these tests need neither torch nor that code.
"""

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives
from diffusion_jax.config import run_config
from diffusion_jax.interop import common
from diffusion_jax.interop import openai
from diffusion_jax.interop import torch_pickle
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.processes import discrete
from diffusion_jax.sampling import solvers
from diffusion_jax.training import restore

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'openai'
MODELS = ('improved_cifar10_style', 'guided_legacy_heads', 'guided_imagenet64_style',
          'guided_lsun_style')


def _flags(name):
  return json.loads((FIXTURES / name / 'flags.json').read_text())


def _load(name, extra_diffusion_flags=''):
  flags = _flags(name)
  return openai.load(str(FIXTURES / name / 'model.pt'), flags['model_flags'],
                                 flags['diffusion_flags'] + extra_diffusion_flags)


def _nhwc(x_nchw):
  return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


@pytest.mark.parametrize('name', MODELS)
def test_imported_forward_matches_the_original_code(name):
  """Our U-Net with the imported weights gives the original UNetModel's output (through its
  SpacedDiffusion wrapper, so rescale_timesteps included) on the same (x, t, y)."""
  config, params = _load(name)
  ref = np.load(FIXTURES / name / 'outputs.npz')
  model = backbones.create_model(config.model, config.data.channels)
  y = jnp.asarray(ref['y']) if 'y' in ref else None
  out = np.asarray(model.apply({'params': params}, _nhwc(ref['x']), jnp.asarray(ref['t']), y))
  np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref['out'], atol=1e-5, rtol=0)
  assert np.abs(ref['out']).max() > 0.3  # Random weights: the comparison is not of zeros.


def test_flags_become_config_fields():
  """Each flag lands in the field that expresses it, with the codebase's defaults."""
  cifar = openai.config_from_flags(openai.parse_flags(
      '--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3',
      '--diffusion_steps 4000 --noise_schedule cosine'))
  m, u = cifar.model, cifar.model.unet
  assert (u.ch, tuple(u.ch_mult), u.num_res_blocks, u.dropout) == (128, (1, 2, 2, 2), 3, 0.3)
  assert tuple(u.attn_resolutions) == (16, 8) and (u.num_heads, u.num_head_channels) == (4, -1)
  assert m.learn_sigma and u.use_scale_shift_norm and not u.resblock_updown
  assert m.timestep_scale == 1000 / 4000  # improved-diffusion: rescale_timesteps=True default.
  assert (m.flip_sin_to_cos, m.freq_shift, u.norm_eps, u.downsample_padding) == (True, 0, 1e-5, 1)
  assert (cifar.diffusion.ddpm.num_timesteps,
          cifar.diffusion.ddpm.beta_schedule) == (4000, 'cosine')
  assert cifar.diffusion.ddpm.vlb_weight == 0.001  # rescale_learned_sigmas=True: (T/1000) L_t.
  assert (cifar.sample.sampler, cifar.sample.variance) == ('ddpm', 'learned_range')
  from configs import digits_dit  # pylint: disable=g-import-not-at-top
  onto_dit = openai.config_from_flags(openai.parse_flags(
      '--image_size 32 --num_channels 128 --num_res_blocks 3', '--diffusion_steps 4000'),
                                                  base=digits_dit.get_config())
  assert (onto_dit.model.arch, onto_dit.diffusion.objective) == ('unet', 'ddpm')
  guided = openai.config_from_flags(openai.parse_flags(
      '--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 '
      '--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 '
      '--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True',
      '--timestep_respacing 250'))
  g = guided.model
  assert tuple(g.unet.ch_mult) == (1, 1, 2, 3, 4) and tuple(g.unet.attn_resolutions) == (32, 16, 8)
  assert (g.num_classes, g.null_class, g.unet.resblock_updown, g.timestep_scale) == (1000, False,
                                                                                    True, 1.0)
  assert (guided.sample.spacing, guided.diffusion.ddpm.beta_start) == ('250', 1e-4)
  linear = openai.config_from_flags(openai.parse_flags(
      '--image_size 64 --num_channels 128 --num_res_blocks 3 --sigma_small True',
      '--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False'))
  # Their linear schedule is Ho et al.'s scaled by 1000 / T; L_t unscaled -> vlb_weight 1 / T.
  assert np.isclose(linear.diffusion.ddpm.beta_start, 2.5e-5) and np.isclose(
      linear.diffusion.ddpm.beta_end, 0.005)
  assert linear.diffusion.ddpm.vlb_weight == 1 / 4000 and linear.sample.variance == 'fixed_small'


def test_published_architectures_map_key_for_key():
  """The README flags of published checkpoints give configs whose every tensor has the key and
  shape the original code's state dict has (shapes.json, built from their code), and no other."""
  table = json.loads((FIXTURES / 'shapes.json').read_text())
  assert len(table) == 4
  for name, entry in table.items():
    flags = openai.parse_flags(entry['model_flags'], entry['diffusion_flags'])
    assert flags['codebase'] == entry['codebase'], name
    config = openai.config_from_flags(flags)
    ours = openai.expected_shapes(config)
    theirs = {k: tuple(v) for k, v in entry['shapes'].items()}
    assert sorted(ours) == sorted(theirs), name
    assert ours == theirs, name
    assert sum(int(np.prod(s)) for s in ours.values()) == entry['num_params'], name


def test_respaced_ddim_gives_the_network_rescaled_timesteps():
  """improved-diffusion with 4000 steps and timestep_respacing='ddim3': the kept steps are
  0, 1334, 2668 and the network sees t * 1000 / T; our DDIM trajectory and a learned-range
  reverse step on the respaced schedule equal the original code's."""
  config, params = _load('improved_cifar10_style', ' --timestep_respacing ddim3 --use_ddim True')
  ref = np.load(FIXTURES / 'improved_cifar10_style' / 'outputs.npz')
  assert (config.sample.sampler, config.sample.spacing) == ('ddim', 'ddim3')
  schedule = discrete.make_schedule(config.diffusion.ddpm)
  sched = solvers.sampling_schedule(schedule, 'ddim', config.sample.steps, config.sample.spacing)
  kept = np.asarray(sched.timesteps)
  np.testing.assert_array_equal(kept, [0, 1334, 2668])
  np.testing.assert_array_equal(ref['ddim_timestep_map'], kept)
  # Closed form of the convention: their network saw kept[::-1] * 1000 / 4000 at the 3 steps.
  np.testing.assert_allclose(ref['ddim_seen_t'][:, 0], kept[::-1] * 0.25, rtol=0, atol=0)
  np.testing.assert_allclose(config.model.timestep_scale * kept[::-1], ref['ddim_seen_t'][:, 0])
  model = backbones.create_model(config.model, 3)
  unscaled = model.clone(timestep_scale=1.0)
  x = _nhwc(ref['pmv_x'])
  np.testing.assert_array_equal(  # Our network given t sees t * timestep_scale.
      model.apply({'params': params}, x, jnp.array([2668])),
      unscaled.apply({'params': params}, x, jnp.array([667.0])))

  apply_fn = lambda x_t, t: model.apply({'params': params}, x_t, t)
  assert config.model.learn_sigma
  _, trajectory = objectives.get('ddpm').sample(
      apply_fn, config, _nhwc(ref['ddim_noise']), jax.random.PRNGKey(0), trajectory_every=1)
  ours = np.asarray(trajectory.x_t).transpose(0, 1, 4, 2, 3)
  assert ours.shape == ref['ddim_trajectory'].shape
  np.testing.assert_allclose(ours, ref['ddim_trajectory'], atol=2e-5, rtol=0)

  index = int(ref['pmv_index'])
  t = jnp.array([index])
  output = model.apply({'params': params}, x, sched.timesteps[t])
  mean, log_var, _ = discrete.p_mean_variance(sched, output, x, t, 'epsilon', learn_sigma=True,
                                               clip_denoised=True)
  np.testing.assert_allclose(np.asarray(mean).transpose(0, 3, 1, 2), ref['pmv_mean'], atol=1e-5,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(log_var).transpose(0, 3, 1, 2), ref['pmv_log_variance'],
                             atol=1e-5, rtol=1e-5)


def _write_foreign_pickle(path):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('archive/data.pkl', b'\x80\x02cos\nsystem\nq\x00.')
  path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize('case,message', [
    ('missing_key', 'input_blocks.3.0.in_layers.2.weight'),
    ('wrong_shape', 'middle_block.1.qkv.weight'),
    ('extra_key', 'input_blocks.9.0.op.weight'),
    ('unknown_flag', '--use_fancy_attention'),
    ('heads_upsample', '--num_heads_upsample=4'),
    ('wrong_flags', "'input_blocks.0.0.bias' has shape (4,), expected (8,)"),
    ('foreign_global', 'os.system'),
])
def test_bad_checkpoints_and_flags_fail_and_write_nothing(tmp_path, monkeypatch, case, message):
  """Each defect raises an error naming the key / flag / global; no workdir appears."""
  name = 'guided_legacy_heads'
  flags = _flags(name)
  source = FIXTURES / name / 'model.pt'
  original = torch_pickle.load_state_dict(str(source))
  edit = None
  if case == 'missing_key':
    edit = lambda sd: sd.pop(message)
  elif case == 'wrong_shape':
    edit = lambda sd: sd.update({message: sd[message][:, :4]})
  elif case == 'extra_key':
    edit = lambda sd: sd.update({message: np.zeros((4, 4, 3, 3), np.float32)})
  elif case == 'unknown_flag':
    flags['model_flags'] += ' --use_fancy_attention True'
  elif case == 'heads_upsample':
    flags['model_flags'] += ' --num_heads_upsample 4'
  elif case == 'wrong_flags':  # The checkpoint is not the model the flags describe.
    flags['model_flags'] = flags['model_flags'].replace('--num_channels 4', '--num_channels 8')
  else:
    source = tmp_path / 'model.pt'
    _write_foreign_pickle(source)
  if edit is not None:
    def load_edited(path):
      assert path == str(source)
      state_dict = dict(original)
      edit(state_dict)
      return state_dict
    monkeypatch.setattr(torch_pickle, 'open_state_dict', load_edited)
  error = torch_pickle.UnsafePickleError if case == 'foreign_global' else common.ConversionError
  with pytest.raises(error, match=re.escape(message)):
    openai.import_openai(str(source), str(tmp_path / 'run'), flags['model_flags'],
                                     flags['diffusion_flags'])
  assert not (tmp_path / 'run').exists()


def test_flags_ours_cannot_express_are_refused():
  """use_kl, a 0.5 channel multiplier and flags of both codebases are errors naming the flag."""
  for model_flags, message in [
      ('--image_size 64 --use_kl True', '--use_kl=True'),
      ('--image_size 512 --num_channels 256', r'channel_mult=\(0\.5'),
      ('--image_size 64 --sigma_small True --resblock_updown True', '--sigma_small'),
      ('--image_size 64 --learn_sigma maybe', "--learn_sigma='maybe'"),
      ('--image_size 64 --num_channels 100', 'model.unet.num_groups=32'),
  ]:
    with pytest.raises(common.ConversionError, match=message):
      openai.config_from_flags(openai.parse_flags(model_flags))


def test_command_line_import(tmp_path):
  """`python -m diffusion_jax.convert --from=openai` writes a run whose params are the imported
  ones; an unknown flag exits non-zero naming it and writes nothing."""
  name = 'guided_imagenet64_style'
  flags = _flags(name)
  root = pathlib.Path(__file__).parent.parent
  env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
  run = lambda *args: subprocess.run([sys.executable, '-m', 'diffusion_jax.convert', *args],
                                     cwd=root, env=env, capture_output=True, text=True,
                                     check=False)
  source = FIXTURES / name / 'model.pt'
  done = run('--from=openai', f'--source={source}', f'--workdir={tmp_path / "run"}',
             f'--model_flags={flags["model_flags"]}',
             f'--diffusion_flags={flags["diffusion_flags"]}')
  assert done.returncode == 0, done.stderr
  config = run_config.load_run_config(str(tmp_path / 'run'))
  expected_config, expected = _load(name)
  assert config.model.to_dict() == expected_config.model.to_dict()
  mesh = sharding.create_mesh(config.mesh)
  params, step = restore.restore_params(config, str(tmp_path / 'run'), mesh, use_ema=True)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)

  done = run('--from=openai', f'--source={source}', f'--workdir={tmp_path / "bad"}',
             f'--model_flags={flags["model_flags"]} --use_fancy_attention True')
  assert done.returncode != 0 and '--use_fancy_attention' in done.stderr
  assert not (tmp_path / 'bad').exists()
