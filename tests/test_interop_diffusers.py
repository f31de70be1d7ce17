"""The diffusers checkpoints users bring (issue 27): the 2022 attention names, pipeline roots,
every config key mapped or refused, the null class made explicit, and the run's own config in
the modes that read a run.

Fixtures (tests/fixtures/diffusers/, made by make_diffusers_fixture.py with torch and diffusers):
legacy_attention_pipeline (a 2022-style pipeline root, .bin with query/key/value/proj_attn),
unet2d_defaults_pipeline (DDPMPipeline.save_pretrained, UNet2DModel's default options) and
ddpm_cifar10_keys.json (google/ddpm-cifar10-32's key -> shape lists in both layouts, from
diffusers' own modules). No torch here.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from configs import cifar10_ddpm, tiny
from diffusion_jax.config import defaults
from diffusion_jax.config import run_config
from diffusion_jax.interop import cli
from diffusion_jax.interop import common
from diffusion_jax.interop import diffusers
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.training import restore

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'diffusers'
LEGACY = FIXTURES / 'legacy_attention_pipeline'
DEFAULTS = FIXTURES / 'unet2d_defaults_pipeline'
KEYS = json.loads((FIXTURES / 'ddpm_cifar10_keys.json').read_text())


def _forward(config, params, ref):
  model = backbones.create_model(config.model, config.data.channels)
  out = model.apply({'params': params}, jnp.asarray(ref['x'].transpose(0, 2, 3, 1)),
                    jnp.asarray(ref['t']))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _cifar10_config():
  unet = json.loads((LEGACY / 'unet' / 'config.json').read_text())
  hub = {k: v for k, v in unet.items() if k.startswith('_')}
  hub.update(act_fn='silu', attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
             center_input_sample=False,
             down_block_types=['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
             downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3,
             layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-06, norm_num_groups=32,
             out_channels=3, sample_size=32, time_embedding_type='positional',
             up_block_types=['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'])
  return diffusers.config_from_diffusers(hub)


def test_cifar10_key_lists_of_both_layouts_are_ours():
  """google/ddpm-cifar10-32's tensors as diffusers lays them out today and as the 2022 upload
  names them: our map gives exactly the current list, and a state dict under either list
  converts to the same parameters; a 2022 tensor that is missing is named by its 2022 name."""
  config = _cifar10_config()
  target = common.abstract_params(config)
  ours = {diffusers.diffusers_key(path, 4): list(diffusers.torch_shape(path, leaf.shape))
          for path, leaf in common.leaf_paths(target)}
  assert ours == KEYS['current']
  legacy, current = KEYS['legacy'], KEYS['current']
  assert len(legacy) == len(current) == 328 and sorted(legacy) != sorted(current)
  assert 'mid_block.attentions.0.proj_attn.weight' in legacy
  assert 'down_blocks.1.attentions.0.query.bias' in legacy
  assert {k for k in legacy if k not in current} == {
      diffusers.legacy_key(k) for k in current if k not in legacy}
  rng = np.random.default_rng(0)
  values = {k: rng.standard_normal(v).astype(np.float32) for k, v in current.items()}
  renamed = {diffusers.legacy_key(k) or k: v for k, v in values.items()}
  assert sorted(renamed) == sorted(legacy)
  a = diffusers.params_from_state_dict(values, config)
  b = diffusers.params_from_state_dict(renamed, config)
  np.testing.assert_array_equal(a['mid_attn']['proj_out']['kernel'],
                                b['mid_attn']['proj_out']['kernel'])
  np.testing.assert_array_equal(  # [c, h, d] of to_q [h*d, c], one head.
      b['down_1_attn_0']['query']['kernel'][:, 0, :],
      values['down_blocks.1.attentions.0.to_q.weight'].T)
  del renamed['down_blocks.1.attentions.1.key.weight']
  with pytest.raises(diffusers.ConversionError,
                     match=r"'down_blocks\.1\.attentions\.1\.to_k\.weight' \(2022 name "
                           r"'down_blocks\.1\.attentions\.1\.key\.weight'\)"):
    diffusers.params_from_state_dict(renamed, config)
  both = dict(values, **{'mid_block.attentions.0.query.weight':
                         values['mid_block.attentions.0.to_q.weight']})
  with pytest.raises(diffusers.ConversionError, match='both'):
    diffusers.params_from_state_dict(both, config)


@pytest.mark.parametrize('root', [LEGACY, DEFAULTS], ids=['2022_layout', 'default_options'])
def test_pipeline_roots_import_with_diffusers_forward(tmp_path, root):
  """A pipeline root (model_index.json, unet/, scheduler/) imports through the command's
  function; the run's network gives diffusers' output on the fixture's inputs."""
  config = diffusers.import_diffusers(str(root), str(tmp_path / 'run'))
  _, _, state_dict = diffusers.load_diffusers_folder(str(root))
  params = diffusers.params_from_state_dict(state_dict, config)
  ref = np.load(root / 'outputs.npz')
  np.testing.assert_allclose(_forward(config, params, ref), ref['out'], atol=1e-5, rtol=0)
  assert np.abs(ref['out']).max() > 0.1
  assert run_config.load_run_config(str(tmp_path / 'run')).to_dict() == config.to_dict()
  unet = json.loads((root / 'unet' / 'config.json').read_text())
  assert (config.model.freq_shift, config.model.unet.norm_eps) == (unet['freq_shift'],
                                                                   unet['norm_eps'])
  # The unet/ folder itself also imports, with the pipeline's scheduler one folder up.
  again = diffusers.import_diffusers(str(root / 'unet'), str(tmp_path / 'run2'))
  assert again.to_dict() == config.to_dict()


def test_2022_configs_read_and_export_in_todays_names(tmp_path):
  """The 2022 scheduler config (tensor_format, timestep_values: null) maps; the import's state
  dict in today's names is the 2022 file's, renamed, and exports under today's names."""
  unet, scheduler, state_dict = diffusers.load_diffusers_folder(str(LEGACY))
  assert scheduler['tensor_format'] == 'pt' and 'timestep_values' in scheduler
  config = diffusers.config_from_diffusers(unet, scheduler)
  params = diffusers.params_from_state_dict(state_dict, config)
  exported = diffusers.state_dict_from_params(params, len(config.model.unet.ch_mult))
  modern, renamed = diffusers.modern_state_dict(state_dict)
  assert sorted(exported) == sorted(modern)
  assert len(renamed) == 4 * 4 * 2  # 4 attention modules (down 1, up 2, mid 1), 4 projections.
  for key, value in modern.items():
    np.testing.assert_array_equal(exported[key], np.asarray(value), err_msg=key)


def _folder(tmp_path, root=DEFAULTS):
  folder = tmp_path / 'src'
  shutil.copytree(root, folder)
  return folder


def _edit(path, **changes):
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize('where,changes,message', [
    ('unet', dict(cross_attention_dim=768), 'cross_attention_dim=768'),
    ('unet', dict(time_embedding_act_fn='gelu'), "time_embedding_act_fn='gelu'"),
    ('scheduler', dict(variance_clip=0.5), 'variance_clip=0.5'),
    ('scheduler', dict(_class_name='PNDMScheduler'), "'PNDMScheduler'"),
    ('scheduler', dict(steps_offset=1), 'steps_offset=1'),
    ('scheduler', dict(timestep_spacing='karras'), "timestep_spacing='karras'"),
    ('scheduler', dict(timestep_values=[999, 500]), 'timestep_values'),
    ('index', dict(vqvae=['diffusers', 'VQModel']), "'vqvae'"),
])
def test_config_keys_ours_cannot_take_are_refused_by_name(tmp_path, where, changes, message):
  """A key of config.json / scheduler_config.json / model_index.json that the import does not
  map is an error naming it (it used to be ignored); nothing is written."""
  folder = _folder(tmp_path)
  _edit({'unet': folder / 'unet' / 'config.json',
         'scheduler': folder / 'scheduler' / 'scheduler_config.json',
         'index': folder / 'model_index.json'}[where], **changes)
  with pytest.raises(diffusers.ConversionError, match=message.replace('[', r'\[')):
    diffusers.import_diffusers(str(folder), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_scheduler_keys_map_to_the_sample_fields():
  """_class_name is the sampler, timestep_spacing the spacing, set_alpha_to_one (DDIM) and
  variance_type (DDPM) their fields; a steps_offset outside leading spacing changes nothing in
  diffusers and is accepted; metadata keys ('_...') are ignored as diffusers ignores them."""
  unet = json.loads((DEFAULTS / 'unet' / 'config.json').read_text())
  base = dict(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02)
  ddim = diffusers.config_from_diffusers(unet, dict(
      base, _class_name='DDIMScheduler', timestep_spacing='trailing', steps_offset=1,
      set_alpha_to_one=False, clip_sample=False, _use_default_values=['x']))
  s = ddim.sample
  assert (s.sampler, s.spacing, s.set_alpha_to_one, s.clip_denoised) == ('ddim', 'trailing',
                                                                        False, False)
  ddpm = diffusers.config_from_diffusers(unet, dict(
      base, _class_name='DDPMScheduler', timestep_spacing='linspace',
      variance_type='fixed_large'))
  assert (ddpm.sample.sampler, ddpm.sample.spacing, ddpm.sample.variance) == (
      'ddpm', 'linspace', 'fixed_large')
  _, scheduler = diffusers.diffusers_configs(ddim)
  assert (scheduler['_class_name'], scheduler['timestep_spacing'],
          scheduler['set_alpha_to_one']) == ('DDIMScheduler', 'trailing', False)
  assert diffusers.config_from_diffusers(unet, scheduler).to_dict() == ddim.to_dict()


def test_class_rows_are_all_classes_unless_told_and_the_import_says_which():
  """num_class_embeds = 4: four classes and no null class by default (diffusers' UNet2DModel has
  none), three and the null row when told; the note says the choice and why; our export writes
  the choice into config.json so that a round trip keeps it."""
  unet = json.loads((FIXTURES / 'class_scale_shift' / 'config.json').read_text())
  notes = []
  plain = diffusers.config_from_diffusers(unet, notes=notes)
  assert (plain.model.num_classes, plain.model.null_class) == (4, False)
  assert any('num_class_embeds=4' in n and 'model.null_class=False' in n and '--null_class=true'
             in n for n in notes), notes
  notes = []
  told = diffusers.config_from_diffusers(unet, null_class=True, notes=notes)
  assert (told.model.num_classes, told.model.null_class) == (3, True)
  assert any('as the import was told' in n for n in notes), notes
  for config in (plain, told):
    exported, _ = diffusers.diffusers_configs(config)
    assert exported['num_class_embeds'] == 4
    assert exported[diffusers.NULL_CLASS_KEY] is config.model.null_class
    again = diffusers.config_from_diffusers(exported)
    assert (again.model.num_classes, again.model.null_class) == (config.model.num_classes,
                                                                 config.model.null_class)
  with pytest.raises(diffusers.ConversionError, match='leaves no class'):
    diffusers.config_from_diffusers({**unet, 'num_class_embeds': 1}, null_class=True)


def test_sample_modes_read_the_run_and_only_overrides_are_requests(tmp_path):
  """config_for_run(saved, overrides): the --config file's differing network fields are not
  requests (the README's cifar10_ddpm.py after an import); it supplies the run's missing
  non-network fields; an override of a network field that differs is an error naming it, one
  that equals the run's value or a free field is fine."""
  workdir = str(tmp_path / 'run')
  imported = diffusers.import_diffusers(str(DEFAULTS), workdir)
  text = run_config.config_path(workdir).read_text()
  saved_json = json.loads(text)
  del saved_json['export']  # A run that predates a section ...
  del saved_json['model']['unet']['dropout']  # ... and a network field.
  run_config.config_path(workdir).write_text(json.dumps(saved_json))
  requested = cifar10_ddpm.get_config()
  requested.export.platforms = ('cpu',)
  requested.model.unet.dropout = 0.3
  saved = run_config.load_run_config(workdir, fallback=requested)
  assert tuple(saved.export.platforms) == ('cpu',)  # Supplied by --config.
  # A network field the run lacks comes from the defaults (the behaviour before the field
  # existed), not from --config.
  assert saved.model.unet.dropout == defaults.get_config().model.unet.dropout != 0.3
  merged = run_config.config_for_run(saved, {'sample.steps': 7, 'model.conv_backend': 'xla',
                                             'model.unet.norm_eps': imported.model.unet.norm_eps})
  assert merged.sample.steps == 7 and merged.model.to_dict() == saved.model.to_dict()
  assert run_config.flatten(merged) == run_config.flatten(saved) | {'sample.steps': 7,
                                                                    'model.conv_backend': 'xla'}
  assert requested.model.unet.norm_eps != imported.model.unet.norm_eps  # cifar10 differs ...
  with pytest.raises(run_config.LockedFieldError) as info:  # ... but only overrides count.
    run_config.config_for_run(saved, {'model.unet.norm_eps': 1e-6, 'sample.steps': 3})
  message = str(info.value)
  assert 'model.unet.norm_eps: run has 1e-05, requested 1e-06' in message
  assert 'sample.' not in message and 'dropout' not in message


def test_command_line_null_class_flag_and_notes(tmp_path, capsys):
  """`convert --from=diffusers --null_class=true` prints what it chose and why."""
  values = flags.FlagValues()
  cli.define_flags(values)
  values(['convert', '--from=diffusers', f'--source={FIXTURES / "class_scale_shift"}',
          f'--workdir={tmp_path / "run"}', '--null_class=true'])
  cli.main([], values)
  out = capsys.readouterr().out
  assert 'note: num_class_embeds=4: model.num_classes=3, model.null_class=True' in out
  config = run_config.load_run_config(str(tmp_path / 'run'))
  assert (config.model.num_classes, config.model.null_class) == (3, True)


def test_write_run_starts_every_configured_ema_at_the_weights(tmp_path):
  """An import onto a base config with extra EMAs writes them too, so fine-tuning resumes."""
  base = tiny.get_config()
  base.optim.ema_decays = (0.9,)
  config = diffusers.import_diffusers(str(FIXTURES / 'attn_high_lpb2_heads'),
                                      str(tmp_path / 'run'), base=base)
  mesh = sharding.create_mesh(config.mesh)
  params, _ = restore.restore_params(config, str(tmp_path / 'run'), mesh, use_ema=False)
  [key] = ema_lib.ema_keys(config.optim)
  extra, step = restore.restore_extra_ema(str(tmp_path / 'run'), key, key,
                                          common.abstract_params(config))
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(extra))
