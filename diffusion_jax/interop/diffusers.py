"""Models in and out: diffusers `UNet2DModel` folders <-> diffusion-jax run directories.

  python -m diffusion_jax.convert --from=diffusers --source=DIR --workdir=RUN \\
      [--config=configs/cifar10_ddpm.py]   # the fields the diffusers folder does not set
  python -m diffusion_jax.convert --to=diffusers --workdir=RUN --out=DIR

DIR is a `UNet2DModel` folder (config.json + diffusion_pytorch_model.safetensors or .bin; its
scheduler_config.json beside it or in ../scheduler/) or a pipeline root as
`DDPMPipeline.save_pretrained` writes it and the hub holds it (model_index.json, unet/,
scheduler/).

Our U-Net (nn/unet.py) is diffusers' DDPM-family `UNet2DModel` (DownBlock2D / AttnDownBlock2D /
UpBlock2D / AttnUpBlock2D; its flip_sin_to_cos, freq_shift, norm_eps and downsample_padding are
config.model fields of the same names), so a state dict maps one-to-one onto our parameters:

  conv   OIHW -> HWIO               linear  [out, in] -> [in, out]
  to_q/to_k/to_v [h*d, c] -> [c, h, d]    to_out.0 [c, h*d] -> [h, d, c]
  GroupNorm weight -> scale         Embedding weight -> embedding

The 2022 uploads (google/ddpm-cifar10-32 and the other google/ddpm-* models) name the attention
projections as diffusers' deprecated AttentionBlock did: query / key / value / proj_attn for
to_q / to_k / to_v / to_out.0, same shapes (diffusers renames them when it loads such a file);
both layouts are read.

Import derives a full config (the --config file, else diffusion_jax/config/defaults.py, plus what
the UNet and scheduler configs say). Every key of both JSON files is mapped to a field or refused
by name (CONFIG_KEYS / SCHEDULER_KEYS say which); keys starting with '_' are metadata, which
diffusers drops too, but for `_class_name` (checked) and NULL_CLASS_KEY. `num_class_embeds` rows
are all classes unless the import is told (`null_class`) or the folder says (NULL_CLASS_KEY,
written by our export) that the last one is the classifier-free-guidance null class; the notes of
the import say which it chose and why. Every key, shape and dtype of the weights is checked
before a tensor is read, and only then `<workdir>/config.json` and a step-0 checkpoint (params =
EMA = the imported weights) are written (common.py). Export writes the EMA params as config.json
+ diffusion_pytorch_model.safetensors + scheduler_config.json.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

from diffusion_jax import objectives
from diffusion_jax.config import defaults
from diffusion_jax.config import run_config
from diffusion_jax.interop import common
from diffusion_jax.interop import torch_pickle
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.training import restore

PyTree = Any
StateDict = Dict[str, np.ndarray]
ConversionError = common.ConversionError

WEIGHTS_SAFETENSORS = 'diffusion_pytorch_model.safetensors'
WEIGHTS_BIN = 'diffusion_pytorch_model.bin'
UNET_CONFIG = 'config.json'
SCHEDULER_CONFIG = 'scheduler_config.json'
PIPELINE_INDEX = 'model_index.json'
# Written by our export (diffusers ignores '_' keys): whether the last class row is the null
# class, so that a round trip keeps model.null_class.
NULL_CLASS_KEY = '_diffusion_jax_null_class'

# diffusers' own defaults for UNet2DModel / DDPMScheduler / DDIMScheduler arguments (what a
# config.json that lacks a key means, e.g. older hub configs); diffusers' semantics, not ours.
DIFFUSERS_UNET_DEFAULTS: Dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type='positional', time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True, down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D',
                                            'AttnDownBlock2D'),
    mid_block_type='UNetMidBlock2D',
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0,
    act_fn='silu', attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift='default', add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)
DIFFUSERS_SCHEDULER_DEFAULTS: Dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
    trained_betas=None, variance_type='fixed_small', clip_sample=True, prediction_type='epsilon',
    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
    sample_max_value=1.0, timestep_spacing='leading', steps_offset=0,
    rescale_betas_zero_snr=False, set_alpha_to_one=True)

# Options whose value must be exactly this for our network (no config field of ours varies them).
FIXED_UNET_OPTIONS: Dict[str, Any] = dict(
    center_input_sample=False, time_embedding_type='positional',
    mid_block_type='UNetMidBlock2D', mid_block_scale_factor=1, downsample_type='conv',
    upsample_type='conv', act_fn='silu', add_attention=True, class_embed_type=None)
# UNet2DModel options that are config.model (or config.model.unet) fields of the same name and
# meaning.
MODEL_FIELD_OPTIONS = ('flip_sin_to_cos', 'freq_shift', 'norm_eps', 'downsample_padding')
# Every UNet2DModel argument: each is mapped to a config field or checked above. Its
# num_train_timesteps sizes the 'learned' time embedding only, which FIXED_UNET_OPTIONS refuses.
CONFIG_KEYS = tuple(DIFFUSERS_UNET_DEFAULTS)
BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear',
                  'squaredcos_cap_v2': 'cosine', 'sigmoid': 'sigmoid'}
PREDICTION_TYPES = {'epsilon': 'epsilon', 'sample': 'x0', 'v_prediction': 'v'}
VARIANCE_TYPES = ('fixed_small', 'fixed_large', 'learned_range')
# diffusers' timestep_spacing values, which sample.spacing reads the same way for the ddpm and
# ddim samplers (processes/respacing.py).
TIMESTEP_SPACINGS = ('linspace', 'leading', 'trailing')
# The scheduler classes that convert, and the sampler each is (sample.sampler).
SCHEDULER_SAMPLERS = {'DDPMScheduler': 'ddpm', 'DDIMScheduler': 'ddim'}
# The arguments of each (diffusers 0.42), plus what the 2022 schedulers wrote: tensor_format (the
# array library the scheduler computed in: no effect on the numbers) and timestep_values (None).
_COMMON_SCHEDULER_KEYS = (
    'num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'trained_betas',
    'clip_sample', 'prediction_type', 'thresholding', 'dynamic_thresholding_ratio',
    'clip_sample_range', 'sample_max_value', 'timestep_spacing', 'steps_offset',
    'rescale_betas_zero_snr', 'tensor_format', 'timestep_values')
SCHEDULER_KEYS = {'DDPMScheduler': _COMMON_SCHEDULER_KEYS + ('variance_type',),
                  'DDIMScheduler': _COMMON_SCHEDULER_KEYS + ('set_alpha_to_one',)}
DOWN_BLOCKS = {'DownBlock2D': False, 'AttnDownBlock2D': True}
UP_BLOCKS = {'UpBlock2D': False, 'AttnUpBlock2D': True}


# ------------------------------------------------------------------ configs

def _unet_option(unet_config: Mapping[str, Any], name: str) -> Any:
  return unet_config[name] if name in unet_config else DIFFUSERS_UNET_DEFAULTS[name]


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1, abs(b))
  return a == b


def _check_keys(config: Mapping[str, Any], known: Sequence[str], what: str) -> None:
  """Refuses a key of a diffusers JSON file that the import does not map (metadata keys
  starting with '_' aside, which diffusers itself drops)."""
  unknown = sorted(k for k in config if not str(k).startswith('_') and k not in known)
  if unknown:
    raise ConversionError(f'{what} has option {unknown[0]}={config[unknown[0]]!r}, which this '
                          f'import does not know (it maps {", ".join(sorted(known))}); it may '
                          'change the model, so it is not ignored.')


def class_rows(unet_config: Mapping[str, Any], null_class: Optional[bool]
               ) -> Tuple[int, bool, str]:
  """(model.num_classes, model.null_class, why) for a UNet2DModel's `num_class_embeds` rows.

  null_class True: the last row is the classifier-free-guidance null class; False: every row is
  a class; None: NULL_CLASS_KEY of the config (our export writes it), else False (diffusers'
  UNet2DModel has no null class of its own).
  """
  rows = _unet_option(unet_config, 'num_class_embeds')
  if rows is None:
    return 0, True, 'unconditional (num_class_embeds is not set)'
  rows = int(rows)
  marker = unet_config.get(NULL_CLASS_KEY)
  if null_class is not None:
    chosen, why = bool(null_class), 'as the import was told (--null_class)'
  elif isinstance(marker, bool):
    chosen, why = marker, f'as config.json says ({NULL_CLASS_KEY}, written by diffusion-jax)'
  else:
    chosen, why = False, ("diffusers' UNet2DModel has no null class, so every row is a class; "
                          'import with --null_class=true if the last row is the '
                          'classifier-free-guidance null class')
  if chosen and rows < 2:
    raise ConversionError(f'num_class_embeds={rows} with null_class=True leaves no class.')
  num_classes = rows - 1 if chosen else rows
  return num_classes, chosen, (f'num_class_embeds={rows}: model.num_classes={num_classes}, '
                               f'model.null_class={chosen}, {why}.')


def config_from_diffusers(unet_config: Mapping[str, Any],
                          scheduler_config: Optional[Mapping[str, Any]] = None,
                          base: Optional[ml_collections.ConfigDict] = None, *,
                          null_class: Optional[bool] = None,
                          notes: Optional[List[str]] = None) -> ml_collections.ConfigDict:
  """Our full config for a diffusers UNet2DModel (+ DDPM/DDIM scheduler) config.

  Starts from `base` (diffusion_jax/config/defaults.py's get_config() when None) and sets
  data.resolution, data.channels, config.model and config.diffusion (and the sample fields the
  scheduler states). `null_class`: see `class_rows`. The choices made are appended to `notes`
  (when given) as sentences. Raises ConversionError naming the first option ours cannot express.
  """
  if base is None:
    base = defaults.get_config()
  config = ml_collections.ConfigDict(base.to_dict())
  opt = lambda name: _unet_option(unet_config, name)
  class_name = unet_config.get('_class_name', 'UNet2DModel')
  if class_name != 'UNet2DModel':
    raise ConversionError(f'config.json is a {class_name}; only UNet2DModel converts.')
  _check_keys(unet_config, CONFIG_KEYS, 'The UNet2DModel config.json')
  for name, needed in FIXED_UNET_OPTIONS.items():
    if not _same(opt(name), needed):
      raise ConversionError(
          f'UNet2DModel option {name}={opt(name)!r} has no equivalent in our U-Net (it needs '
          f'{name}={needed!r}); this model cannot be converted exactly.')
  down_types, up_types = list(opt('down_block_types')), list(opt('up_block_types'))
  for kind, types, known in (('down', down_types, DOWN_BLOCKS), ('up', up_types, UP_BLOCKS)):
    for i, block in enumerate(types):
      if block not in known:
        raise ConversionError(f'UNet2DModel {kind}_block_types[{i}]={block!r} is an unknown '
                              f'block type; supported: {sorted(known)}.')
  channels_out = list(opt('block_out_channels'))
  if not (len(down_types) == len(up_types) == len(channels_out)):
    raise ConversionError(f'down_block_types ({len(down_types)}), up_block_types '
                          f'({len(up_types)}) and block_out_channels ({len(channels_out)}) '
                          'must have the same length.')
  down_attn = [DOWN_BLOCKS[b] for b in down_types]
  up_attn = [UP_BLOCKS[b] for b in reversed(up_types)]
  if down_attn != up_attn:
    raise ConversionError(f'up_block_types={up_types} is not the mirror of down_block_types='
                          f'{down_types}: our model.unet.attn_resolutions puts attention at the '
                          'same resolutions on both paths.')
  ch = int(channels_out[0])
  if any(c % ch for c in channels_out):
    raise ConversionError(f'block_out_channels={channels_out} are not multiples of the first; '
                          'model.unet.ch_mult cannot express them.')
  size = opt('sample_size')
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ConversionError(f'sample_size={size} is not square; data.resolution is one size.')
    size = size[0]
  if size is None:
    raise ConversionError('UNet2DModel option sample_size is missing: data.resolution needs it.')
  in_ch, out_ch = int(opt('in_channels')), int(opt('out_channels'))
  if out_ch not in (in_ch, 2 * in_ch):
    raise ConversionError(f'out_channels={out_ch} with in_channels={in_ch}: ours outputs '
                          'in_channels (or 2x with model.learn_sigma).')
  if opt('time_embedding_dim') not in (None, 4 * ch):
    raise ConversionError(f'time_embedding_dim={opt("time_embedding_dim")} is not 4 * '
                          f'block_out_channels[0] = {4 * ch}, the only size ours has.')
  groups = int(opt('norm_num_groups'))
  if opt('attn_norm_num_groups') not in (None, groups):
    raise ConversionError(f'attn_norm_num_groups={opt("attn_norm_num_groups")} differs from '
                          f'norm_num_groups={groups}; ours has one model.unet.num_groups.')
  shift = opt('resnet_time_scale_shift')
  if shift not in ('default', 'scale_shift'):
    raise ConversionError(f'resnet_time_scale_shift={shift!r} is not supported '
                          "('default' or 'scale_shift').")
  if shift == 'scale_shift' and opt('attn_norm_num_groups') is None:
    raise ConversionError("resnet_time_scale_shift='scale_shift' without attn_norm_num_groups "
                          'gives a middle attention without GroupNorm, which ours always has.')
  head_dim = opt('attention_head_dim')
  resolution = int(size)
  model = config.model
  model.arch = 'unet'  # A UNet2DModel, whatever --config's network was.
  model.unet.ch = ch
  model.unet.ch_mult = tuple(int(c // ch) for c in channels_out)
  model.unet.num_res_blocks = int(opt('layers_per_block'))
  model.unet.attn_resolutions = tuple(resolution // 2**i for i, a in enumerate(down_attn) if a)
  model.unet.num_heads = 1
  model.unet.num_head_channels = -1 if head_dim is None else int(head_dim)
  model.unet.dropout = float(opt('dropout'))
  model.unet.resblock_updown = False
  model.unet.use_scale_shift_norm = shift == 'scale_shift'
  model.unet.num_groups = groups
  model.num_classes, model.null_class, why = class_rows(unet_config, null_class)
  model.learn_sigma = out_ch == 2 * in_ch
  model.timestep_scale = 1.0
  if opt('downsample_padding') not in (0, 1):
    raise ConversionError(f'UNet2DModel option downsample_padding={opt("downsample_padding")!r} '
                          'is not supported (0 or 1, model.unet.downsample_padding).')
  for name in MODEL_FIELD_OPTIONS:
    section = model.unet if name in model.unet else model
    section[name] = type(section[name])(opt(name))
  config.data.resolution = resolution
  config.data.channels = in_ch
  if notes is not None and model.num_classes:
    notes.append(why)
  if scheduler_config is not None:
    _apply_scheduler(config, scheduler_config, notes)
  errors = backbones.check_model_config(model, resolution) + objectives.check_config(config)
  if errors:
    raise ConversionError('the diffusers configs give a config ours cannot run: '
                          + ' '.join(errors))
  return config


def _apply_scheduler(config: ml_collections.ConfigDict, scheduler: Mapping[str, Any],
                     notes: Optional[List[str]] = None) -> None:
  """Sets config.diffusion and the sample fields a DDPM/DDIM scheduler config states: the
  sampler (its class), spacing, variance (DDPM) or set_alpha_to_one (DDIM), x0 clipping."""
  class_name = scheduler.get('_class_name', 'DDPMScheduler')
  if class_name not in SCHEDULER_SAMPLERS:
    raise ConversionError(f'scheduler_config.json is a {class_name!r}; the schedulers that '
                          f'convert are {sorted(SCHEDULER_SAMPLERS)} (sample.sampler ddpm / ddim; '
                          'edit _class_name to import the betas and pick another sampler).')
  # A scheduler made from another class's config keeps that class's options (diffusers ignores
  # them), so the other DDPM-family class's keys are accepted and have no effect.
  _check_keys(scheduler, sorted(set(SCHEDULER_KEYS['DDPMScheduler'])
                                | set(SCHEDULER_KEYS['DDIMScheduler'])),
              f'The {class_name} scheduler_config.json')
  opt = lambda name: scheduler[name] if name in scheduler else DIFFUSERS_SCHEDULER_DEFAULTS[name]
  if opt('trained_betas') is not None:
    raise ConversionError('scheduler option trained_betas is set; diffusion.ddpm.beta_schedule '
                          'only names schedules.')
  if scheduler.get('timestep_values') is not None:
    raise ConversionError('scheduler option timestep_values is set; sample.spacing only names '
                          'spacings.')
  if opt('rescale_betas_zero_snr'):
    raise ConversionError('scheduler option rescale_betas_zero_snr=True has no equivalent in '
                          'config.diffusion.')
  if opt('beta_schedule') not in BETA_SCHEDULES:
    raise ConversionError(f'scheduler option beta_schedule={opt("beta_schedule")!r} is not '
                          f'supported; use one of {sorted(BETA_SCHEDULES)}.')
  if opt('prediction_type') not in PREDICTION_TYPES:
    raise ConversionError(f'scheduler option prediction_type={opt("prediction_type")!r} is not '
                          f'supported; use one of {sorted(PREDICTION_TYPES)}.')
  # dynamic_thresholding_ratio and sample_max_value act only with thresholding=True.
  if opt('thresholding'):
    raise ConversionError('scheduler option thresholding=True is not converted; set '
                          'sample.thresholding=dynamic yourself.')
  if float(opt('clip_sample_range')) != 1.0:
    raise ConversionError(f'scheduler option clip_sample_range={opt("clip_sample_range")} is '
                          'not 1.0, the range sample.clip_denoised clips to.')
  spacing = opt('timestep_spacing')
  if spacing not in TIMESTEP_SPACINGS:
    raise ConversionError(f'scheduler option timestep_spacing={spacing!r} is not one of '
                          f'{TIMESTEP_SPACINGS}, the spacings sample.spacing shares.')
  offset = opt('steps_offset')
  if offset != 0 and spacing == 'leading':  # diffusers adds it to the leading timesteps only.
    raise ConversionError(f"scheduler option steps_offset={offset!r} with timestep_spacing="
                          "'leading' shifts every timestep; sample.spacing='leading' has no "
                          'offset.')
  config.diffusion.objective = 'ddpm'  # What a DDPM/DDIM scheduler describes.
  d = config.diffusion.ddpm
  d.num_timesteps = int(opt('num_train_timesteps'))
  d.beta_schedule = BETA_SCHEDULES[opt('beta_schedule')]
  d.beta_start, d.beta_end = float(opt('beta_start')), float(opt('beta_end'))
  d.prediction_type = PREDICTION_TYPES[opt('prediction_type')]
  s = config.sample
  s.sampler, s.spacing = SCHEDULER_SAMPLERS[class_name], spacing
  if class_name == 'DDPMScheduler':
    variance = opt('variance_type')
    if variance not in VARIANCE_TYPES:
      raise ConversionError(f'scheduler option variance_type={variance!r} is not supported; '
                            f'use one of {VARIANCE_TYPES}.')
    s.variance = variance
  else:
    s.set_alpha_to_one = bool(opt('set_alpha_to_one'))
  s.clip_denoised = bool(opt('clip_sample'))
  if notes is not None:
    notes.append(f'{class_name}: sample.sampler={s.sampler!r}, sample.spacing={spacing!r} '
                 '(the sampler the pipeline runs; any sample.* field can be changed with '
                 '--config.sample.<field> in --mode=sample).')


def diffusers_configs(config: ml_collections.ConfigDict) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(UNet2DModel config.json, scheduler_config.json) for our config.

  The scheduler is a DDIMScheduler for a run that samples with ddim, else a DDPMScheduler (the
  training process; diffusers' DDPMPipeline samples it ancestrally), with sample.spacing as its
  timestep_spacing where diffusers has that spacing. A class-conditional model's config.json
  also says (NULL_CLASS_KEY) whether its last class row is the null class.
  """
  m, u, resolution = config.model, config.model.unet, config.data.resolution
  if m.arch != 'unet':
    raise ConversionError(f"model.arch={m.arch!r}: only the U-Net (model.arch='unet') exports "
                          'as a diffusers UNet2DModel; use --mode=export for this run.')
  if config.diffusion.objective != 'ddpm':
    raise ConversionError(f'diffusion.objective={config.diffusion.objective!r}: a diffusers '
                          'DDPMScheduler describes the discrete-time ddpm objective only; use '
                          '--mode=export for this run.')
  if u.resblock_updown:
    raise ConversionError('model.unet.resblock_updown=True: the UNet2DModel DownBlock2D/UpBlock2D '
                          'layout has no resnet up/downsampling; cannot export.')
  if m.timestep_scale != 1.0:
    raise ConversionError(f'model.timestep_scale={m.timestep_scale} (improved-diffusion\'s '
                          'rescale_timesteps): UNet2DModel feeds the timestep unscaled; '
                          'cannot export.')
  channels_out = [int(u.ch * mult) for mult in u.ch_mult]
  attn = [resolution // 2**i in tuple(u.attn_resolutions) for i in range(len(u.ch_mult))]
  if u.num_head_channels > 0:
    head_dim = int(u.num_head_channels)
  elif u.num_heads == 1:
    head_dim = None
  else:
    raise ConversionError(f'model.unet.num_heads={u.num_heads}: UNet2DModel sets heads by one '
                          'attention_head_dim; export with num_heads=1 or num_head_channels.')
  channels = int(config.data.channels)
  unet = dict(FIXED_UNET_OPTIONS)
  unet.update(
      _class_name='UNet2DModel', sample_size=int(resolution), in_channels=channels,
      out_channels=channels * (2 if m.learn_sigma else 1),
      down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D' for a in attn],
      up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)],
      block_out_channels=channels_out, layers_per_block=int(u.num_res_blocks),
      dropout=float(u.dropout), attention_head_dim=head_dim, norm_num_groups=int(u.num_groups),
      attn_norm_num_groups=int(u.num_groups) if u.use_scale_shift_norm else None,
      resnet_time_scale_shift='scale_shift' if u.use_scale_shift_norm else 'default',
      num_class_embeds=(int(m.num_classes) + int(m.null_class)) if m.num_classes > 0 else None,
      time_embedding_dim=None, num_train_timesteps=None)
  if m.num_classes > 0:
    unet[NULL_CLASS_KEY] = bool(m.null_class)
  unet.update({name: (u if name in u else m)[name] for name in MODEL_FIELD_OPTIONS})
  d = config.diffusion.ddpm
  inverse_schedules = {v: k for k, v in BETA_SCHEDULES.items()}
  inverse_predictions = {v: k for k, v in PREDICTION_TYPES.items()}
  if d.beta_schedule not in inverse_schedules:
    raise ConversionError(f'diffusion.ddpm.beta_schedule={d.beta_schedule!r} has no DDPMScheduler '
                          'beta_schedule.')
  s = config.sample
  scheduler = dict(
      num_train_timesteps=int(d.num_timesteps), beta_schedule=inverse_schedules[d.beta_schedule],
      beta_start=float(d.beta_start), beta_end=float(d.beta_end),
      prediction_type=inverse_predictions[d.prediction_type], clip_sample=bool(s.clip_denoised),
      clip_sample_range=1.0, trained_betas=None, steps_offset=0)
  if s.spacing in TIMESTEP_SPACINGS:
    scheduler['timestep_spacing'] = s.spacing
  if s.sampler == 'ddim':
    scheduler.update(_class_name='DDIMScheduler', set_alpha_to_one=bool(s.set_alpha_to_one))
  else:
    if s.variance not in VARIANCE_TYPES:
      raise ConversionError(f'sample.variance={s.variance!r} has no DDPMScheduler '
                            f'variance_type; use one of {VARIANCE_TYPES}.')
    scheduler.update(_class_name='DDPMScheduler', variance_type=s.variance)
  return unet, scheduler


# ------------------------------------------------------------------ tensors

_TOP_LEVEL = {'conv_in': 'conv_in', 'temb_dense0': 'time_embedding.linear_1',
              'temb_dense1': 'time_embedding.linear_2', 'class_embed': 'class_embedding',
              'norm_out': 'conv_norm_out', 'conv_out': 'conv_out',
              'mid_res_0': 'mid_block.resnets.0', 'mid_res_1': 'mid_block.resnets.1',
              'mid_attn': 'mid_block.attentions.0'}
_SUBMODULES = {'norm1': 'norm1', 'conv1': 'conv1', 'temb_proj': 'time_emb_proj', 'norm2': 'norm2',
               'conv2': 'conv2', 'skip': 'conv_shortcut', 'norm': 'group_norm', 'query': 'to_q',
               'key': 'to_k', 'value': 'to_v', 'proj_out': 'to_out.0'}
_LEVEL_MODULE = re.compile(r'^(down|up)_(\d+)_(res|attn)_(\d+)$'
                           r'|^(down|up)_(\d+)_(downsample|upsample)$')


def _module_prefix(name: str, num_levels: int) -> str:
  if name in _TOP_LEVEL:
    return _TOP_LEVEL[name]
  match = _LEVEL_MODULE.match(name)
  if not match:
    raise ConversionError(f'our parameter {name!r} has no diffusers counterpart.')
  if match.group(1):
    path, level, kind, index = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    block = level if path == 'down' else num_levels - 1 - level
    return f'{path}_blocks.{block}.{"resnets" if kind == "res" else "attentions"}.{index}'
  path, level, kind = match.group(5), int(match.group(6)), match.group(7)
  block = level if path == 'down' else num_levels - 1 - level
  return f'{path}_blocks.{block}.{kind}rs.0.conv'


def diffusers_key(path: Sequence[str], num_levels: int) -> str:
  """The diffusers state-dict key of our parameter at `path` ('down_0_res_0', 'conv1', 'kernel')."""
  return common.torch_key(path, _module_prefix(path[0], num_levels), _SUBMODULES, 'diffusers')


def _layout(path: Sequence[str], ndim: int) -> str:
  """How our leaf is laid out relative to torch: conv | dense | qkv | out | same."""
  if path[-1] == 'kernel':
    if ndim == 4:
      return 'conv'
    if ndim == 2:
      return 'dense'
    return 'out' if path[-2] == 'proj_out' else 'qkv'
  if path[-1] == 'bias' and ndim == 2:
    return 'qkv'
  return 'same'


def torch_shape(path: Sequence[str], shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The diffusers tensor shape of our parameter of `shape` at `path`."""
  layout = _layout(path, len(shape))
  if layout == 'conv':
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if layout == 'dense':
    return (shape[1], shape[0])
  if layout == 'qkv':
    return (shape[1] * shape[2], shape[0]) if len(shape) == 3 else (shape[0] * shape[1],)
  if layout == 'out':
    return (shape[2], shape[0] * shape[1])
  return tuple(shape)


def from_torch(path: Sequence[str], tensor: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """A diffusers tensor in our layout `shape` (conv OIHW->HWIO, linear transposed, heads split)."""
  layout = _layout(path, len(shape))
  if layout == 'conv':
    return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
  if layout in ('dense', 'out') or (layout == 'qkv' and len(shape) == 3):
    return np.ascontiguousarray(tensor.T).reshape(shape)
  return tensor.reshape(shape)


def to_torch(path: Sequence[str], value: np.ndarray) -> np.ndarray:
  """Inverse of `from_torch`: our parameter in diffusers' layout."""
  layout = _layout(path, value.ndim)
  if layout == 'conv':
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if layout in ('dense', 'out') or (layout == 'qkv' and value.ndim == 3):
    flat = (value.reshape(value.shape[0], -1) if layout == 'qkv'
            else value.reshape(-1, value.shape[-1]))
    return np.ascontiguousarray(flat.T)
  return np.ascontiguousarray(value.reshape(torch_shape(path, value.shape)))


# The 2022 (deprecated AttentionBlock) names of the attention projections, in diffusers'
# attention modules: `<block>.attentions.<i>.<old>.<weight|bias>` is today's `<new>`; the
# group_norm keeps its name and no shape changes.
LEGACY_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_LEGACY_KEY = re.compile(r'^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions'
                         r'\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$')
_MODERN_KEY = re.compile(r'^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$')


def legacy_key(key: str) -> Optional[str]:
  """The 2022 name of today's attention key ('...attentions.0.to_out.0.weight' ->
  '...attentions.0.proj_attn.weight'), or None for a key that was not renamed."""
  match = _MODERN_KEY.match(key)
  if not match:
    return None
  old = {v: k for k, v in LEGACY_ATTENTION_NAMES.items()}[match.group(2)]
  return f'{match.group(1)}.{old}.{match.group(3)}'


def modern_state_dict(state_dict: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, str]]:
  """(state dict under today's names, {today's name: the file's 2022 name}) of a state dict in
  either layout. A file holding a tensor under both names is a ConversionError naming them."""
  out: Dict[str, Any] = {}
  renamed: Dict[str, str] = {}
  for key, tensor in state_dict.items():
    match = _LEGACY_KEY.match(key)
    new = (f'{match.group(1)}.{LEGACY_ATTENTION_NAMES[match.group(2)]}.{match.group(3)}'
           if match else key)
    if new in out:
      raise ConversionError(f'The checkpoint holds both {key!r} and {renamed.get(new, new)!r}, '
                            'the 2022 and the current name of one tensor.')
    out[new] = tensor
    if match:
      renamed[new] = key
  return out, renamed


def params_from_state_dict(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict
                           ) -> PyTree:
  """Our parameter tree (numpy, config.model.param_dtype) from a diffusers state dict, in the
  current layout or the 2022 one (LEGACY_ATTENTION_NAMES).

  Every key of ours must be present with its exact shape and a floating dtype, and every key of
  the file must be used, before any tensor is read; otherwise ConversionError names the key as
  the file has it.
  """
  state_dict, renamed = modern_state_dict(state_dict)
  num_levels = len(config.model.unet.ch_mult)

  def describe(key: str) -> str:
    if key in renamed:
      return f'{renamed[key]!r} (today {key!r})'
    old = legacy_key(key)
    return f'{key!r} (2022 name {old!r})' if renamed and old else repr(key)

  return common.params_from_state_dict(
      state_dict, common.abstract_params(config), lambda path: diffusers_key(path, num_levels),
      torch_shape, from_torch, missing_hint='it is not this architecture.', describe=describe)


def state_dict_from_params(params: PyTree, num_levels: int) -> StateDict:
  """The diffusers state dict (float32 numpy, current names) of our parameters."""
  return {diffusers_key(path, num_levels): to_torch(path, np.asarray(leaf, np.float32))
          for path, leaf in common.leaf_paths(params)}


# ------------------------------------------------------------------ files

_SAFETENSORS_DTYPES = {'F16': 'float16', 'BF16': 'bfloat16', 'F32': 'float32', 'F64': 'float64',
                       'I8': 'int8', 'U8': 'uint8', 'I16': 'int16', 'I32': 'int32',
                       'I64': 'int64', 'BOOL': 'bool'}


class SafetensorsTensor:
  """A tensor of a .safetensors file, not yet read: `shape`, `dtype_name`, `numpy()` (the
  safetensors library checks the header's offsets against the file)."""

  def __init__(self, handle: Any, key: str):
    self._handle, self._key = handle, key
    view = handle.get_slice(key)
    self.shape = tuple(int(n) for n in view.get_shape())
    self.dtype_name = _SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())

  def numpy(self) -> np.ndarray:
    if self.dtype_name == 'bfloat16':
      raise ConversionError(f'Tensor {self._key!r} is bfloat16, which numpy safetensors cannot '
                            'read; save the model in float32 or float16.')
    return self._handle.get_tensor(self._key)

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self.numpy()
    return out if dtype is None else out.astype(dtype)


def _read_json(path: epath.Path) -> Dict[str, Any]:
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f'{path} is not valid JSON ({e}).') from None
  if not isinstance(value, dict):
    raise ConversionError(f'{path} holds a {type(value).__name__}, not a JSON object.')
  return value


def _pipeline_folders(root: epath.Path) -> Tuple[epath.Path, Optional[epath.Path]]:
  """(unet folder, scheduler_config.json or None) of a pipeline root (model_index.json)."""
  index = _read_json(root / PIPELINE_INDEX)
  components = {k: v for k, v in index.items() if not str(k).startswith('_')}
  other = sorted(set(components) - {'unet', 'scheduler'})
  if 'unet' not in components or other:
    raise ConversionError(
        f'{root / PIPELINE_INDEX} is a {index.get("_class_name", "pipeline")} with components '
        f'{sorted(components)}: only a pipeline of a UNet2DModel (unet/) and a scheduler '
        f'converts{f"; {other} would be left out" if other else ""}.')
  unet = components['unet']
  if isinstance(unet, (list, tuple)) and len(unet) == 2 and unet[1] != 'UNet2DModel':
    raise ConversionError(f'{root / PIPELINE_INDEX}: its unet is a {unet[1]}; only UNet2DModel '
                          'converts.')
  scheduler = root / 'scheduler' / SCHEDULER_CONFIG
  return root / 'unet', scheduler if scheduler.exists() else None


def load_diffusers_folder(source: str) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]],
                                                Mapping[str, Any]]:
  """(UNet config, scheduler config or None, state dict) of a diffusers UNet2DModel folder or
  pipeline root (model_index.json, unet/, scheduler/).

  The state dict's tensors are not read yet (they have .shape and .numpy()): from
  diffusion_pytorch_model.safetensors (preferred) or .bin (through the restricted unpickler of
  torch_pickle.py, every tensor checked against its storage). The scheduler config is the
  folder's scheduler_config.json, or ../scheduler/'s for the unet/ folder of a pipeline.
  """
  folder = epath.Path(source)
  if (folder / PIPELINE_INDEX).exists():
    folder, scheduler_file = _pipeline_folders(folder)
  else:
    scheduler_file = next((c for c in (folder / SCHEDULER_CONFIG,
                                       folder.parent / 'scheduler' / SCHEDULER_CONFIG)
                           if c.exists()), None)
  config_file = folder / UNET_CONFIG
  if not config_file.exists():
    raise FileNotFoundError(f'{config_file} is missing: --source must be a diffusers UNet2DModel '
                            'folder (config.json + diffusion_pytorch_model.safetensors) or a '
                            'pipeline root (model_index.json, unet/, scheduler/).')
  unet_config = _read_json(config_file)
  scheduler_config = None if scheduler_file is None else _read_json(scheduler_file)
  if (folder / WEIGHTS_SAFETENSORS).exists():
    try:
      handle = safe_open(str(folder / WEIGHTS_SAFETENSORS), framework='numpy')
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
      raise ConversionError(f'{folder / WEIGHTS_SAFETENSORS} is not a readable safetensors file '
                            f'({type(e).__name__}: {e}).') from None
    state_dict = {key: SafetensorsTensor(handle, key) for key in handle.keys()}
  elif (folder / WEIGHTS_BIN).exists():
    state_dict = torch_pickle.open_state_dict(str(folder / WEIGHTS_BIN))
  else:
    found = sorted(p.name for p in folder.iterdir() if 'diffusion_pytorch_model' in p.name)
    seen = f' (it has {found}: variants and shards are not read)' if found else ''
    raise FileNotFoundError(f'{folder} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN}{seen}.')
  return unet_config, scheduler_config, state_dict


def import_diffusers(source: str, workdir: str, base: Optional[ml_collections.ConfigDict] = None,
                     *, null_class: Optional[bool] = None,
                     notes: Optional[List[str]] = None) -> ml_collections.ConfigDict:
  """Converts a diffusers UNet2DModel folder or pipeline root into a run directory; returns its
  config (`null_class`, `notes`: see config_from_diffusers).

  Everything is checked before the first write; an existing run in `workdir` is refused.
  """
  common.check_empty_workdir(workdir)
  unet_config, scheduler_config, state_dict = load_diffusers_folder(source)
  config = config_from_diffusers(unet_config, scheduler_config, base, null_class=null_class,
                                 notes=notes)
  params = params_from_state_dict(state_dict, config)
  common.write_run(config, params, workdir)
  return config


def export_diffusers(workdir: str, out: str, use_ema: bool = True) -> None:
  """Writes the run's (EMA) params as a diffusers UNet2DModel folder + scheduler_config.json."""
  config = run_config.load_run_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{run_config.config_path(workdir)} is missing: export needs the '
                            "run's own config (written by training or by --from=diffusers).")
  unet, scheduler = diffusers_configs(config)  # Errors before any read of weights or write.
  mesh = sharding.create_mesh(config.mesh)
  params, _ = restore.restore_params(config, workdir, mesh, use_ema=use_ema)
  state_dict = state_dict_from_params(jax.device_get(params), len(config.model.unet.ch_mult))
  folder = epath.Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / WEIGHTS_SAFETENSORS).write_bytes(safetensors_numpy.save(state_dict))
  (folder / UNET_CONFIG).write_text(json.dumps(unet, indent=2, sort_keys=True))
  (folder / SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2, sort_keys=True))
