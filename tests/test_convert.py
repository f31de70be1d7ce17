"""diffusers UNet2DModel <-> diffusion-jax conversion (diffusion_jax/interop/diffusers.py, cli.py).

The fixtures (tests/fixtures/diffusers/, made by make_diffusers_fixture.py with torch and
diffusers) hold tiny random UNet2DModels and their outputs; these tests need neither.
"""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from configs import cifar10_ddpm
from diffusion_jax import images
from diffusion_jax import objectives
from diffusion_jax.config import run_config
from diffusion_jax.interop import common
from diffusion_jax.interop import diffusers
from diffusion_jax.interop import torch_pickle
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.pipelines import sampler
from diffusion_jax.processes import discrete
from diffusion_jax.training import checkpoints
from diffusion_jax.training import restore

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'diffusers'
LAYOUTS = ('attn_low_lpb1', 'attn_high_lpb2_heads', 'class_scale_shift', 'openai_style_options')
# The fixtures whose last class row is the classifier-free-guidance null class (the import is told
# so: diffusers' UNet2DModel itself has no null class).
NULL_CLASS = {'class_scale_shift': True}

# google/ddpm-cifar10-32's unet config.json (its hub file has no dropout, attn_norm_num_groups,
# ... keys: they take diffusers' defaults).
DDPM_CIFAR10_UNET = {
    '_class_name': 'UNet2DModel', 'act_fn': 'silu', 'attention_head_dim': None,
    'block_out_channels': [128, 256, 256, 256], 'center_input_sample': False,
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
    'downsample_padding': 0, 'flip_sin_to_cos': False, 'freq_shift': 1, 'in_channels': 3,
    'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-06,
    'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 32,
    'time_embedding_type': 'positional',
    'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D']}


def _imported(name):
  unet_config, scheduler_config, state_dict = diffusers.load_diffusers_folder(str(FIXTURES / name))
  config = diffusers.config_from_diffusers(unet_config, scheduler_config,
                                           null_class=NULL_CLASS.get(name))
  return config, diffusers.params_from_state_dict(state_dict, config), state_dict


def _forward(config, params, x_nchw, t, y=None):
  model = backbones.create_model(config.model, config.data.channels)
  out = model.apply({'params': params}, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
                    jnp.asarray(t), None if y is None else jnp.asarray(y))
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_import_onto_a_dit_or_edm_base_makes_a_ddpm_unet_and_export_refuses_them():
  """A UNet2DModel + DDPMScheduler is a ddpm U-Net whatever --config was; a DiT or non-ddpm run
  has no diffusers form and says so (naming the field) instead of writing a wrong folder."""
  from configs import digits_dit, digits_edm  # pylint: disable=g-import-not-at-top
  unet_config, scheduler_config, _ = diffusers.load_diffusers_folder(
      str(FIXTURES / 'attn_low_lpb1'))
  for base in (digits_dit.get_config(), digits_edm.get_config()):
    config = diffusers.config_from_diffusers(unet_config, scheduler_config, base=base)
    assert (config.model.arch, config.diffusion.objective) == ('unet', 'ddpm')
  with pytest.raises(diffusers.ConversionError, match=r"model.arch='dit'.*--mode=export"):
    diffusers.diffusers_configs(digits_dit.get_config())
  with pytest.raises(diffusers.ConversionError, match=r"diffusion.objective='edm'.*--mode=export"):
    diffusers.diffusers_configs(digits_edm.get_config())


@pytest.mark.parametrize('name', LAYOUTS)
def test_imported_forward_matches_diffusers(name):
  """Our U-Net with the imported weights gives diffusers' output on the same (x, t, y)."""
  config, params, _ = _imported(name)
  ref = np.load(FIXTURES / name / 'outputs.npz')
  y = ref['y'] if 'y' in ref else None
  out = _forward(config, params, ref['x'], ref['t'], y)
  assert out.shape == ref['out'].shape
  np.testing.assert_allclose(out, ref['out'], atol=1e-5, rtol=0)
  assert np.abs(ref['out']).max() > 0.1  # Random weights: the comparison is not of zeros.


def test_derived_configs():
  """Each UNet2DModel option lands in the config field that expresses it."""
  low, _, _ = _imported('attn_low_lpb1')
  assert (low.model.unet.ch, tuple(low.model.unet.ch_mult),
          low.model.unet.num_res_blocks) == (8, (1, 2), 1)
  assert tuple(low.model.unet.attn_resolutions) == (4,) and low.model.unet.num_head_channels == -1
  assert (low.data.resolution, low.data.channels, low.model.unet.num_groups) == (8, 3, 4)
  heads, _, _ = _imported('attn_high_lpb2_heads')
  assert tuple(heads.model.unet.attn_resolutions) == (8,)
  assert heads.model.unet.num_head_channels == 4
  assert heads.model.unet.num_res_blocks == 2 and heads.data.channels == 1
  openai_style, _, _ = _imported('openai_style_options')
  m = openai_style.model
  assert (m.flip_sin_to_cos, m.freq_shift, m.unet.norm_eps, m.unet.downsample_padding) == (
      True, 0, 1e-5, 1)
  assert (low.model.flip_sin_to_cos, low.model.freq_shift, low.model.unet.norm_eps,
          low.model.unet.downsample_padding) == (False, 1, 1e-6, 0)
  cond, _, _ = _imported('class_scale_shift')
  assert cond.model.num_classes == 3 and cond.model.learn_sigma
  assert cond.model.unet.use_scale_shift_norm and tuple(cond.model.unet.ch_mult) == (1, 1, 2)
  assert (cond.diffusion.ddpm.num_timesteps, cond.diffusion.ddpm.beta_schedule) == (1000, 'linear')
  assert (cond.diffusion.ddpm.beta_start, cond.diffusion.ddpm.beta_end) == (1e-4, 0.02)


@pytest.mark.parametrize('name', LAYOUTS)
def test_export_reproduces_the_original_tensors(name):
  """Imported then exported tensors equal the diffusers file bit for bit; so do the configs."""
  config, params, original = _imported(name)
  exported = diffusers.state_dict_from_params(params, len(config.model.unet.ch_mult))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  unet, scheduler = diffusers.diffusers_configs(config)
  source = json.loads((FIXTURES / name / 'config.json').read_text())
  for key, value in unet.items():
    if key in source:
      assert source[key] == value, key
  assert diffusers.config_from_diffusers(unet, scheduler).to_dict() == config.to_dict()


def test_workdir_round_trip(tmp_path):
  """diffusers folder -> run dir -> diffusers folder -> run dir: the same tensors throughout."""
  source = FIXTURES / 'attn_high_lpb2_heads'  # The .bin one.
  config = diffusers.import_diffusers(str(source), str(tmp_path / 'run'))
  saved = run_config.load_run_config(str(tmp_path / 'run'))
  assert saved.to_dict() == config.to_dict()
  mesh = sharding.create_mesh(config.mesh)
  params, step = restore.restore_params(config, str(tmp_path / 'run'), mesh, use_ema=False)
  ema, _ = restore.restore_params(config, str(tmp_path / 'run'), mesh, use_ema=True)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, params, ema)

  diffusers.export_diffusers(str(tmp_path / 'run'), str(tmp_path / 'out'))
  exported = safetensors_numpy.load_file(str(tmp_path / 'out' / diffusers.WEIGHTS_SAFETENSORS))
  original = torch_pickle.load_state_dict(str(source / diffusers.WEIGHTS_BIN))
  assert sorted(exported) == sorted(original)
  for key in original:
    np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
  scheduler = json.loads((tmp_path / 'out' / 'scheduler_config.json').read_text())
  assert scheduler['_class_name'] == 'DDPMScheduler' and scheduler['num_train_timesteps'] == 1000
  assert scheduler['beta_schedule'] == 'linear' and scheduler['prediction_type'] == 'epsilon'

  again = diffusers.import_diffusers(str(tmp_path / 'out'), str(tmp_path / 'run2'))
  assert again.model.to_dict() == config.model.to_dict()
  params2, _ = restore.restore_params(again, str(tmp_path / 'run2'), mesh, use_ema=True)
  jax.tree.map(np.testing.assert_array_equal, params2, ema)


def _cifar10_state_dict():
  """A state dict with google/ddpm-cifar10-32's keys and shapes (from our tree's inverse map)."""
  config = cifar10_ddpm.get_config()
  target = common.abstract_params(config)
  rows = [(diffusers.diffusers_key(path, 4), diffusers.torch_shape(path, leaf.shape))
          for path, leaf in common.leaf_paths(target)]
  return {key: np.zeros(shape, np.float32) for key, shape in rows}


def test_cifar10_ddpm_key_and_shape_map():
  """The 35.7M-parameter CIFAR-10 DDPM: hub config -> our config, 328 tensors, known shapes."""
  config = diffusers.config_from_diffusers(DDPM_CIFAR10_UNET)
  expected = cifar10_ddpm.get_config().model.to_dict()
  got = config.model.to_dict()
  expected['unet'].pop('dropout'), got['unet'].pop('dropout')  # The hub config leaves it at 0.
  assert got == expected
  state_dict = _cifar10_state_dict()
  assert len(state_dict) == 328
  assert sum(v.size for v in state_dict.values()) == 35_746_307
  known = {  # Shapes of google/ddpm-cifar10-32's diffusion_pytorch_model.safetensors.
      'conv_in.weight': (128, 3, 3, 3), 'time_embedding.linear_1.weight': (512, 128),
      'time_embedding.linear_2.weight': (512, 512),
      'down_blocks.0.resnets.0.time_emb_proj.weight': (128, 512),
      'down_blocks.0.downsamplers.0.conv.weight': (128, 128, 3, 3),
      'down_blocks.1.resnets.0.conv_shortcut.weight': (256, 128, 1, 1),
      'down_blocks.1.attentions.1.to_q.weight': (256, 256),
      'down_blocks.1.attentions.1.group_norm.weight': (256,),
      'mid_block.attentions.0.to_out.0.weight': (256, 256),
      'up_blocks.0.resnets.0.conv1.weight': (256, 512, 3, 3),
      'up_blocks.2.attentions.2.to_v.bias': (256,),
      'up_blocks.2.upsamplers.0.conv.weight': (256, 256, 3, 3),
      'up_blocks.3.resnets.0.conv1.weight': (128, 384, 3, 3),
      'up_blocks.3.resnets.2.conv_shortcut.weight': (128, 256, 1, 1),
      'conv_norm_out.weight': (128,), 'conv_out.weight': (3, 128, 3, 3)}
  for key, shape in known.items():
    assert state_dict[key].shape == shape, key
  assert 'up_blocks.3.upsamplers.0.conv.weight' not in state_dict  # Last level: no upsampler.
  assert 'down_blocks.3.downsamplers.0.conv.weight' not in state_dict
  del state_dict['up_blocks.3.resnets.2.conv_shortcut.weight']
  with pytest.raises(diffusers.ConversionError, match='up_blocks.3.resnets.2.conv_shortcut.weight'):
    diffusers.params_from_state_dict(state_dict, config)


def _corrupt_copy(tmp_path, name='attn_low_lpb1'):
  folder = tmp_path / 'src'
  shutil.copytree(FIXTURES / name, folder)
  return folder


def _edit_tensors(folder, edit):
  path = folder / diffusers.WEIGHTS_SAFETENSORS
  tensors = safetensors_numpy.load_file(str(path))
  edit(tensors)
  path.write_bytes(safetensors_numpy.save(tensors))


def _edit_config(folder, **changes):
  path = folder / 'config.json'
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize('case,message', [
    ('missing_key', 'down_blocks.1.attentions.0.to_k.weight'),
    ('wrong_shape', 'mid_block.resnets.0.conv1.weight'),
    ('extra_key', 'down_blocks.0.attentions.0.to_q.weight'),
    ('unknown_block', 'CrossAttnDownBlock2D'),
    ('unsupported_option', 'center_input_sample=True'),
    ('foreign_global', 'os.system'),
])
def test_bad_sources_fail_and_write_nothing(tmp_path, case, message):
  """Each defect raises an error naming the key / block / option / global; no workdir appears."""
  folder = _corrupt_copy(tmp_path, 'attn_high_lpb2_heads' if case == 'foreign_global'
                         else 'attn_low_lpb1')
  if case == 'missing_key':
    _edit_tensors(folder, lambda t: t.pop(message))
  elif case == 'wrong_shape':
    _edit_tensors(folder, lambda t: t.update({message: t[message][:, :4]}))
  elif case == 'extra_key':
    _edit_tensors(folder, lambda t: t.update({message: np.zeros((8, 8), np.float32)}))
  elif case == 'unknown_block':
    _edit_config(folder, down_block_types=['CrossAttnDownBlock2D', 'AttnDownBlock2D'])
  elif case == 'unsupported_option':
    _edit_config(folder, center_input_sample=True)
  else:  # A .bin whose pickle asks for os.system.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
      archive.writestr('archive/data.pkl', b'\x80\x02cos\nsystem\nq\x00.')
    (folder / diffusers.WEIGHTS_BIN).write_bytes(buffer.getvalue())
  error = torch_pickle.UnsafePickleError if case == 'foreign_global' else diffusers.ConversionError
  with pytest.raises(error, match=message.replace('.', r'\.').replace('(', r'\(')):
    diffusers.import_diffusers(str(folder), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_import_refuses_an_existing_run(tmp_path):
  """A workdir that already has a config.json is left alone."""
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{"kept": true}')
  with pytest.raises(diffusers.ConversionError, match='already holds a run'):
    diffusers.import_diffusers(str(FIXTURES / 'attn_low_lpb1'), str(run))
  assert json.loads((run / 'config.json').read_text()) == {'kept': True}
  assert not (run / 'checkpoints').exists()


def test_sample_mode_on_converted_workdir(tmp_path):
  """--mode=sample on an imported run gives the images of sampling the imported params directly."""
  workdir = str(tmp_path / 'run')
  diffusers.import_diffusers(str(FIXTURES / 'attn_low_lpb1'), workdir)
  config = run_config.load_run_config(workdir)
  config.sample.sampler, config.sample.steps = 'ddim', 3
  config.sample.num_samples = config.sample.batch_size = 8
  out_dir = sample_mode.generate(config, workdir)
  arr = np.load(out_dir / 'samples.npz')['arr_0']
  assert arr.shape == (8, 8, 8, 3) and arr.dtype == np.uint8

  _, params, _ = _imported('attn_low_lpb1')
  mesh = sharding.create_mesh(config.mesh)
  model = backbones.create_model(config.model, config.data.channels)
  sample_fn = sampler.make_sample_fn(model, config, mesh, 8)
  direct = sample_fn(params, jax.random.fold_in(jax.random.PRNGKey(config.sample.seed), 0),
                     np.zeros((8,), np.int32))
  np.testing.assert_array_equal(arr, images.to_uint8(np.asarray(direct)))
  assert len(np.unique(arr)) > 10


def _scheduler_trajectory(sampler, steps, spacing, noise_key=None, **sample_fields):
  """Our x_t after each of `steps` steps of `sampler` from the fixture's x_T on the imported
  network (NCHW like the fixture), with ref[noise_key] as the per-step noise if given."""
  config, params, _ = _imported('attn_low_lpb1')
  ref = np.load(FIXTURES / 'attn_low_lpb1' / 'outputs.npz')
  model = backbones.create_model(config.model, config.data.channels)
  apply_fn = lambda x, t: model.apply({'params': params}, x, t)
  config.sample.sampler, config.sample.steps, config.sample.spacing = sampler, steps, spacing
  for field, value in sample_fields.items():
    config.sample[field] = value
  noise = jnp.asarray(ref['ddim_noise'].transpose(0, 2, 3, 1))
  variance_noise = (None if noise_key is None
                    else jnp.asarray(ref[noise_key].transpose(0, 1, 3, 4, 2)))
  assert config.diffusion.ddpm.prediction_type == 'epsilon'
  _, trajectory = objectives.get('ddpm').sample(
      apply_fn, config, noise, jax.random.PRNGKey(0), trajectory_every=1,
      variance_noise=variance_noise)
  return np.asarray(trajectory.x_t).transpose(0, 1, 4, 2, 3), ref


def _assert_float32_close(ours, ref):
  """Each step within 1e-5 of the step's largest |value| (at least 1): float32 rounding of a
  random unclipped network whose samples grow to |x| ~ 600 is ~1e-7 relative to that scale."""
  scale = np.maximum(np.abs(ref).max(axis=tuple(range(1, ref.ndim))), 1.0)
  err = np.abs(ours - ref).max(axis=tuple(range(1, ref.ndim)))
  assert np.all(err <= 1e-5 * scale), (err, scale)


def test_ddim_trajectory_matches_diffusers_scheduler():
  """10 DDIM steps (eta 0, leading spacing) equal diffusers' DDIMScheduler on the same network,
  with eps recomputed from the clipped x0 (use_clipped_model_output=True, our default) as the
  fixture asked; diffusers' default (False) keeps the model's eps and gives another trajectory."""
  ours, ref = _scheduler_trajectory('ddim', 10, 'leading')
  np.testing.assert_array_equal(ref['ddim_timesteps'], np.arange(900, -1, -100))
  assert ours.shape == ref['ddim_trajectory'].shape
  np.testing.assert_allclose(ours, ref['ddim_trajectory'], atol=2e-5, rtol=0)
  unclipped_eps, _ = _scheduler_trajectory('ddim', 10, 'leading', use_clipped_model_output=False)
  assert np.abs(unclipped_eps - ref['ddim_trajectory']).max() > 1e-3


def test_stochastic_ddim_trajectories_match_diffusers_scheduler():
  """DDIM with eta > 0 and diffusers' per-step `variance_noise`: eta = 1 with DDIMScheduler's
  defaults (leading, clip_sample, use_clipped_model_output=False, set_alpha_to_one), and eta =
  0.5 with trailing spacing, set_alpha_to_one=False (the last step stops at abar of training
  step 0, which trailing does not keep) and no clipping. Each equals diffusers to float32
  precision; the float64 coefficients matter at the last steps (issue 9)."""
  ours, ref = _scheduler_trajectory('ddim', 10, 'leading', 'variance_noise', eta=1.0,
                                   use_clipped_model_output=False)
  _assert_float32_close(ours, ref['ddim_eta1_trajectory'])
  np.testing.assert_array_equal(ref['ddim_trailing_timesteps'], np.arange(999, 0, -100))
  fields = dict(eta=0.5, set_alpha_to_one=False, clip_denoised=False)
  ours, _ = _scheduler_trajectory('ddim', 10, 'trailing', 'variance_noise', **fields)
  _assert_float32_close(ours, ref['ddim_trailing_trajectory'])
  # set_alpha_to_one=True would take the last step to abar = 1: a different end point.
  to_one, _ = _scheduler_trajectory('ddim', 10, 'trailing', 'variance_noise',
                                    **dict(fields, set_alpha_to_one=True))
  np.testing.assert_array_equal(to_one[:-1], ours[:-1])
  assert np.abs(to_one[-1] - ref['ddim_trailing_trajectory'][-1]).max() > 1e-2


def test_ddpm_trajectory_matches_diffusers_scheduler():
  """10 DDPMScheduler steps (leading, clip_sample, fixed_small) with the noise its seeded
  generators drew, given to our ddpm sampler as variance_noise."""
  ours, ref = _scheduler_trajectory('ddpm', 10, 'leading', 'ddpm_variance_noise')
  _assert_float32_close(ours, ref['ddpm_trajectory'])


def test_dpm_solver_trajectory_matches_diffusers_scheduler():
  """10 DPM-Solver++(2M) steps with sample.spacing='linspace' run on diffusers'
  DPMSolverMultistepScheduler timesteps (999, 899, ..., 100, then the clean sample) and, with
  thresholding 'auto' (no clipping for dpm_solver_pp, as diffusers), give its trajectory."""
  ours, ref = _scheduler_trajectory('dpm_solver_pp', 10, 'linspace')
  np.testing.assert_array_equal(ref['dpm_timesteps'], [999, 899, 799, 699, 599, 500, 400, 300,
                                                       200, 100])
  _assert_float32_close(ours, ref['dpm_trajectory'])


def test_command_line_import_and_export(tmp_path):
  """`python -m diffusion_jax.convert` both ways; a bad source exits non-zero naming the key."""
  root = pathlib.Path(__file__).parent.parent
  env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
  run = lambda *args: subprocess.run([sys.executable, '-m', 'diffusion_jax.convert', *args],
                                     cwd=root, env=env, capture_output=True, text=True,
                                     check=False)
  source = FIXTURES / 'attn_low_lpb1'
  done = run('--from=diffusers', f'--source={source}', f'--workdir={tmp_path / "run"}')
  assert done.returncode == 0, done.stderr
  done = run('--to=diffusers', f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "out"}')
  assert done.returncode == 0, done.stderr
  exported = safetensors_numpy.load_file(str(tmp_path / 'out' / diffusers.WEIGHTS_SAFETENSORS))
  original = safetensors_numpy.load_file(str(source / diffusers.WEIGHTS_SAFETENSORS))
  assert sorted(exported) == sorted(original)
  for key in original:
    np.testing.assert_array_equal(exported[key], original[key], err_msg=key)

  bad = _corrupt_copy(tmp_path)
  _edit_tensors(bad, lambda t: t.pop('conv_out.bias'))
  done = run('--from=diffusers', f'--source={bad}', f'--workdir={tmp_path / "bad_run"}')
  assert done.returncode != 0 and 'conv_out.bias' in done.stderr
  assert not (tmp_path / 'bad_run').exists()


def test_ddpm_step_matches_diffusers_scheduler():
  """One reverse step at t = 371: our posterior mean + fixed_small std times diffusers' noise
  equals DDPMScheduler.step's prev_sample (clipped x0, as both do)."""
  config, params, _ = _imported('attn_low_lpb1')
  ref = np.load(FIXTURES / 'attn_low_lpb1' / 'outputs.npz')
  t = np.full((2,), int(ref['ddpm_t']), np.int32)
  x = ref['ddpm_x'].transpose(0, 2, 3, 1)
  model = backbones.create_model(config.model, config.data.channels)
  output = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(t))
  schedule = discrete.make_schedule(config.diffusion.ddpm)
  mean, log_var, _ = discrete.p_mean_variance(
      schedule, output, jnp.asarray(x), jnp.asarray(t), 'epsilon', learn_sigma=False,
      variance=config.sample.variance, clip_denoised=config.sample.clip_denoised)
  prev = mean + jnp.exp(0.5 * log_var) * ref['ddpm_noise'].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(prev).transpose(0, 3, 1, 2), ref['ddpm_prev'],
                             atol=1e-5, rtol=0)


def test_scheduler_options_map_or_fail():
  """Scheduler names map to ours (squaredcos_cap_v2 -> cosine, v_prediction -> v); options ours
  cannot express are errors naming them; export refuses what UNet2DModel cannot express."""
  config = diffusers.config_from_diffusers(DDPM_CIFAR10_UNET, {
      '_class_name': 'DDIMScheduler', 'num_train_timesteps': 500,
      'beta_schedule': 'squaredcos_cap_v2', 'prediction_type': 'v_prediction',
      'clip_sample': False})
  assert (config.diffusion.ddpm.num_timesteps,
          config.diffusion.ddpm.beta_schedule) == (500, 'cosine')
  assert config.diffusion.ddpm.prediction_type == 'v' and not config.sample.clip_denoised
  unet, scheduler = diffusers.diffusers_configs(config)
  assert (scheduler['beta_schedule'], scheduler['prediction_type']) == ('squaredcos_cap_v2',
                                                                       'v_prediction')
  assert unet['up_block_types'] == DDPM_CIFAR10_UNET['up_block_types']
  for bad, message in [({'trained_betas': [0.1, 0.2]}, 'trained_betas'),
                       ({'beta_schedule': 'exp'}, "beta_schedule='exp'"),
                       ({'rescale_betas_zero_snr': True}, 'rescale_betas_zero_snr')]:
    with pytest.raises(diffusers.ConversionError, match=message):
      diffusers.config_from_diffusers(DDPM_CIFAR10_UNET, bad)
  for option, value in [('downsample_padding', 2), ('add_attention', False),
                        ('time_embedding_type', 'fourier'), ('mid_block_scale_factor', 2)]:
    with pytest.raises(diffusers.ConversionError, match=f'{option}={value!r}'):
      diffusers.config_from_diffusers({**DDPM_CIFAR10_UNET, option: value})
  config.model.unet.resblock_updown = True
  with pytest.raises(diffusers.ConversionError, match='model.unet.resblock_updown'):
    diffusers.diffusers_configs(config)


def test_export_of_openai_conventions():
  """An imported improved/guided-diffusion model exports its U-Net options; a rescaled timestep
  (which UNet2DModel cannot express) and its absent null class are handled, not dropped."""
  config, _, _ = _imported('class_scale_shift')
  config.model.null_class = False
  config.model.flip_sin_to_cos, config.model.freq_shift = True, 0
  unet, _ = diffusers.diffusers_configs(config)
  assert unet['num_class_embeds'] == config.model.num_classes  # No extra null row.
  assert (unet['flip_sin_to_cos'], unet['freq_shift']) == (True, 0)
  config.model.timestep_scale = 0.25
  with pytest.raises(diffusers.ConversionError, match='model.timestep_scale=0.25'):
    diffusers.diffusers_configs(config)


def test_fine_tuning_resumes_from_the_imported_weights(tmp_path):
  """--mode=train on an imported run starts from its step-0 checkpoint (the diffusers weights,
  EMA too) and trains on: the 8x8x1 fixture model fine-tunes on the digits for 2 steps."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  config = diffusers.import_diffusers(str(FIXTURES / 'attn_high_lpb2_heads'), workdir,
                                    base=tiny.get_config())
  assert (config.data.dataset, config.data.channels) == ('digits', 1)
  config.training.num_train_steps = 2
  config.training.sample_every_steps = 0
  config.training.checkpoint_every_steps = 2
  state = loop.train(config, workdir)
  assert int(state.step) == 2 and checkpoints.latest_step_on_disk(workdir) == 2
  _, imported, _ = _imported('attn_high_lpb2_heads')
  mesh = sharding.create_mesh(config.mesh)
  start, _ = restore.restore_params(config, workdir, mesh, use_ema=False)  # Newest: 2.
  changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), start, imported)
  assert max(jax.tree.leaves(changed)) > 0  # Trained on from the imported weights ...
  assert max(jax.tree.leaves(changed)) < 0.05  # ... by two small warm-up Adam steps, not anew.
