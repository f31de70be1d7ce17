"""Models in and out: diffusers `UNet2DModel` folders <-> diffusion-jax run directories.

  python -m diffusion_jax.convert --from=diffusers --source=DIR --workdir=RUN \\
      [--config=configs/cifar10_ddpm.py]   # the fields the diffusers folder does not set
  python -m diffusion_jax.convert --to=diffusers --workdir=RUN --out=DIR
  python -m diffusion_jax.convert --from=openai --source=MODEL.pt --workdir=RUN \\
      --model_flags="..." [--diffusion_flags="..."]   # see openai_checkpoints.py

Our U-Net (unet.py) is diffusers' DDPM-family `UNet2DModel` (DownBlock2D / AttnDownBlock2D /
UpBlock2D / AttnUpBlock2D; its flip_sin_to_cos, freq_shift, norm_eps and downsample_padding are
config.model fields of the same names), so a state dict maps one-to-one onto our parameters:

  conv   OIHW -> HWIO               linear  [out, in] -> [in, out]
  to_q/to_k/to_v [h*d, c] -> [c, h, d]    to_out.0 [c, h*d] -> [h, d, c]
  GroupNorm weight -> scale         Embedding weight -> embedding

Import derives a full config (diffusion_jax/config/defaults.py's get_config() plus what the UNet and scheduler
configs say; a diffusers option our config cannot express is an error naming it), checks every
key and shape before anything is written, and saves `<workdir>/config.json` and a step-0
checkpoint whose params and EMA params are the imported weights. Export writes the EMA params
as config.json + diffusion_pytorch_model.safetensors + scheduler_config.json.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from diffusion_jax.config import defaults
from diffusion_jax.nn import backbones
from diffusion_jax.training import train_state
from diffusion_jax.interop import torch_pickle
from diffusion_jax.training import checkpoints
from diffusion_jax.config import run_config
from diffusion_jax.training import restore
from diffusion_jax.parallel import sharding

PyTree = Any
StateDict = Dict[str, np.ndarray]

WEIGHTS_SAFETENSORS = 'diffusion_pytorch_model.safetensors'
WEIGHTS_BIN = 'diffusion_pytorch_model.bin'
UNET_CONFIG = 'config.json'
SCHEDULER_CONFIG = 'scheduler_config.json'

# diffusers' own defaults for UNet2DModel / DDPMScheduler arguments (what a config.json that
# lacks a key means, e.g. older hub configs); these are diffusers' semantics, not ours.
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
    sample_max_value=1.0, rescale_betas_zero_snr=False)

# Options whose value must be exactly this for our network (no config field of ours varies them).
FIXED_UNET_OPTIONS: Dict[str, Any] = dict(
    center_input_sample=False, time_embedding_type='positional',
    mid_block_type='UNetMidBlock2D', mid_block_scale_factor=1, downsample_type='conv',
    upsample_type='conv', act_fn='silu', add_attention=True, class_embed_type=None)
# UNet2DModel options that are config.model (or config.model.unet) fields of the same name and
# meaning.
MODEL_FIELD_OPTIONS = ('flip_sin_to_cos', 'freq_shift', 'norm_eps', 'downsample_padding')
BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear',
                  'squaredcos_cap_v2': 'cosine', 'sigmoid': 'sigmoid'}
PREDICTION_TYPES = {'epsilon': 'epsilon', 'sample': 'x0', 'v_prediction': 'v'}
VARIANCE_TYPES = ('fixed_small', 'fixed_large', 'learned_range')
DOWN_BLOCKS = {'DownBlock2D': False, 'AttnDownBlock2D': True}
UP_BLOCKS = {'UpBlock2D': False, 'AttnUpBlock2D': True}


class ConversionError(ValueError):
  """The source cannot be converted exactly; the message names the option, block or key."""


# ------------------------------------------------------------------ configs

def _unet_option(unet_config: Mapping[str, Any], name: str) -> Any:
  return unet_config[name] if name in unet_config else DIFFUSERS_UNET_DEFAULTS[name]


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1, abs(b))
  return a == b


def config_from_diffusers(unet_config: Mapping[str, Any],
                          scheduler_config: Optional[Mapping[str, Any]] = None,
                          base: Optional[ml_collections.ConfigDict] = None
                          ) -> ml_collections.ConfigDict:
  """Our full config for a diffusers UNet2DModel (+ DDPM/DDIM scheduler) config.

  Starts from `base` (diffusion_jax/config/defaults.py's get_config() when None) and sets data.resolution,
  data.channels, config.model and config.diffusion (and sample.variance / clip_denoised from
  the scheduler). Raises ConversionError naming the first option ours cannot express.
  """
  if base is None:
    base = defaults.get_config()
  config = ml_collections.ConfigDict(base.to_dict())
  opt = lambda name: _unet_option(unet_config, name)
  class_name = unet_config.get('_class_name', 'UNet2DModel')
  if class_name != 'UNet2DModel':
    raise ConversionError(f'config.json is a {class_name}; only UNet2DModel converts.')
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
                          f'{down_types}: our model.unet.attn_resolutions puts attention at the same '
                          'resolutions on both paths.')
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
  classes = opt('num_class_embeds')
  model.num_classes = 0 if classes is None else int(classes) - 1  # Ours adds the null class.
  model.learn_sigma = out_ch == 2 * in_ch
  model.null_class = True
  model.timestep_scale = 1.0
  if opt('downsample_padding') not in (0, 1):
    raise ConversionError(f'UNet2DModel option downsample_padding={opt("downsample_padding")!r} '
                          'is not supported (0 or 1, model.unet.downsample_padding).')
  for name in MODEL_FIELD_OPTIONS:
    section = model.unet if name in model.unet else model
    section[name] = type(section[name])(opt(name))
  config.data.resolution = resolution
  config.data.channels = in_ch
  if scheduler_config is not None:
    _apply_scheduler(config, scheduler_config)
  return config


def _apply_scheduler(config: ml_collections.ConfigDict, scheduler: Mapping[str, Any]) -> None:
  """Sets config.diffusion (and sample.variance / clip_denoised) from a DDPM/DDIM scheduler."""
  opt = lambda name: scheduler[name] if name in scheduler else DIFFUSERS_SCHEDULER_DEFAULTS[name]
  if opt('trained_betas') is not None:
    raise ConversionError('scheduler option trained_betas is set; diffusion.ddpm.beta_schedule '
                          'only names schedules.')
  if opt('rescale_betas_zero_snr'):
    raise ConversionError('scheduler option rescale_betas_zero_snr=True has no equivalent in '
                          'config.diffusion.')
  if opt('beta_schedule') not in BETA_SCHEDULES:
    raise ConversionError(f'scheduler option beta_schedule={opt("beta_schedule")!r} is not '
                          f'supported; use one of {sorted(BETA_SCHEDULES)}.')
  if opt('prediction_type') not in PREDICTION_TYPES:
    raise ConversionError(f'scheduler option prediction_type={opt("prediction_type")!r} is not '
                          f'supported; use one of {sorted(PREDICTION_TYPES)}.')
  if opt('thresholding'):
    raise ConversionError('scheduler option thresholding=True is not converted; set '
                          'sample.thresholding=dynamic yourself.')
  if float(opt('clip_sample_range')) != 1.0:
    raise ConversionError(f'scheduler option clip_sample_range={opt("clip_sample_range")} is '
                          'not 1.0, the range sample.clip_denoised clips to.')
  config.diffusion.objective = 'ddpm'  # What a DDPM/DDIM scheduler describes.
  d = config.diffusion.ddpm
  d.num_timesteps = int(opt('num_train_timesteps'))
  d.beta_schedule = BETA_SCHEDULES[opt('beta_schedule')]
  d.beta_start, d.beta_end = float(opt('beta_start')), float(opt('beta_end'))
  d.prediction_type = PREDICTION_TYPES[opt('prediction_type')]
  variance = scheduler['variance_type'] if 'variance_type' in scheduler else None
  if variance is not None:  # DDIMScheduler has no variance_type.
    if variance not in VARIANCE_TYPES:
      raise ConversionError(f'scheduler option variance_type={variance!r} is not supported; '
                            f'use one of {VARIANCE_TYPES}.')
    config.sample.variance = variance
  config.sample.clip_denoised = bool(opt('clip_sample'))


def diffusers_configs(config: ml_collections.ConfigDict) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(UNet2DModel config.json, DDPMScheduler scheduler_config.json) for our config."""
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
  unet.update({name: (u if name in u else m)[name] for name in MODEL_FIELD_OPTIONS})
  d = config.diffusion.ddpm
  inverse_schedules = {v: k for k, v in BETA_SCHEDULES.items()}
  inverse_predictions = {v: k for k, v in PREDICTION_TYPES.items()}
  if d.beta_schedule not in inverse_schedules:
    raise ConversionError(f'diffusion.ddpm.beta_schedule={d.beta_schedule!r} has no DDPMScheduler '
                          'beta_schedule.')
  if config.sample.variance not in VARIANCE_TYPES:
    raise ConversionError(f'sample.variance={config.sample.variance!r} has no DDPMScheduler '
                          f'variance_type; use one of {VARIANCE_TYPES}.')
  scheduler = dict(
      _class_name='DDPMScheduler', num_train_timesteps=int(d.num_timesteps),
      beta_schedule=inverse_schedules[d.beta_schedule], beta_start=float(d.beta_start),
      beta_end=float(d.beta_end), prediction_type=inverse_predictions[d.prediction_type],
      variance_type=config.sample.variance, clip_sample=bool(config.sample.clip_denoised),
      clip_sample_range=1.0, trained_betas=None)
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
_LEAVES = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'embedding': 'weight'}
_LEVEL_MODULE = re.compile(r'^(down|up)_(\d+)_(res|attn)_(\d+)$|^(down|up)_(\d+)_(downsample|upsample)$')


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
  parts = [_module_prefix(path[0], num_levels)]
  for name in path[1:-1]:
    if name == 'GroupNorm_0':
      continue
    if name not in _SUBMODULES:
      raise ConversionError(f'our parameter {"/".join(path)} has no diffusers counterpart.')
    parts.append(_SUBMODULES[name])
  parts.append(_LEAVES[path[-1]])
  return '.'.join(parts)


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
    flat = value.reshape(value.shape[0], -1) if layout == 'qkv' else value.reshape(-1, value.shape[-1])
    return np.ascontiguousarray(flat.T)
  return np.ascontiguousarray(value.reshape(torch_shape(path, value.shape)))


def _leaf_paths(tree: PyTree) -> List[Tuple[Tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(k.key) for k in keys), leaf) for keys, leaf in flat]


def abstract_params(config: ml_collections.ConfigDict) -> PyTree:
  """Shapes and dtypes of our parameters for `config` (nothing is computed)."""
  model = backbones.create_model(config.model, config.data.channels)
  image_shape = (config.data.resolution, config.data.resolution, config.data.channels)
  return jax.eval_shape(lambda: train_state.init_params(model, jax.random.PRNGKey(0), image_shape))


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
                           ) -> PyTree:
  """Our parameter tree (numpy, config.model.param_dtype) from a diffusers state dict.

  Every key of ours must be present with its exact shape and every diffusers key must be used;
  otherwise ConversionError names the key.
  """
  target = abstract_params(config)
  num_levels = len(config.model.unet.ch_mult)
  used, leaves = set(), []
  for path, leaf in _leaf_paths(target):
    key = diffusers_key(path, num_levels)
    if key not in state_dict:
      raise ConversionError(f'The checkpoint has no tensor {key!r} (our {"/".join(path)}, shape '
                            f'{torch_shape(path, leaf.shape)}): it is not this architecture.')
    tensor = np.asarray(state_dict[key])
    expected = torch_shape(path, leaf.shape)
    if tuple(tensor.shape) != expected:
      raise ConversionError(f'Tensor {key!r} has shape {tuple(tensor.shape)}, expected '
                            f'{expected} for our {"/".join(path)}.')
    used.add(key)
    leaves.append(from_torch(path, tensor.astype(np.float32), leaf.shape).astype(leaf.dtype))
  extra = sorted(set(state_dict) - used)
  if extra:
    raise ConversionError(f'The checkpoint has tensors our model does not: {extra[:5]}'
                          f'{" ..." if len(extra) > 5 else ""} ({len(extra)} in all).')
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def state_dict_from_params(params: PyTree, num_levels: int) -> StateDict:
  """The diffusers state dict (float32 numpy) of our parameters."""
  return {diffusers_key(path, num_levels): to_torch(path, np.asarray(leaf, np.float32))
          for path, leaf in _leaf_paths(params)}


# ------------------------------------------------------------------ files

def load_diffusers_folder(source: str) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]],
                                                Mapping[str, np.ndarray]]:
  """(UNet config, scheduler config or None, state dict) of a diffusers UNet2DModel folder.

  Reads config.json, diffusion_pytorch_model.safetensors (preferred) or .bin (through the
  restricted unpickler of torch_pickle.py), and scheduler_config.json if present (also one
  folder up, as in a pipeline's unet/ + scheduler/ layout).
  """
  folder = epath.Path(source)
  config_file = folder / UNET_CONFIG
  if not config_file.exists():
    raise FileNotFoundError(f'{config_file} is missing: --source must be a diffusers UNet2DModel '
                            'folder (config.json + diffusion_pytorch_model.safetensors).')
  unet_config = json.loads(config_file.read_text())
  scheduler_config = None
  for candidate in (folder / SCHEDULER_CONFIG, folder.parent / 'scheduler' / SCHEDULER_CONFIG):
    if candidate.exists():
      scheduler_config = json.loads(candidate.read_text())
      break
  if (folder / WEIGHTS_SAFETENSORS).exists():
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    state_dict = safetensors_numpy.load((folder / WEIGHTS_SAFETENSORS).read_bytes())
  elif (folder / WEIGHTS_BIN).exists():
    state_dict = torch_pickle.load_state_dict(str(folder / WEIGHTS_BIN))
  else:
    raise FileNotFoundError(f'{folder} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN}.')
  return unet_config, scheduler_config, state_dict


def write_workdir(config: ml_collections.ConfigDict, params: PyTree, workdir: str) -> None:
  """Saves config.json and a step-0 checkpoint with params = ema_params = `params`."""
  params = jax.tree.map(jnp.asarray, params)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), params), opt_state=tx.init(params))
  run_config.save_run_config(config, workdir)
  manager = checkpoints.create_manager(workdir, keep=1, async_save=False)
  checkpoints.save(manager, 0, state, config)
  manager.wait_until_finished()
  manager.close()


def import_diffusers(source: str, workdir: str,
                     base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """Converts a diffusers UNet2DModel folder into a run directory; returns its config.

  Everything is checked before the first write; an existing run in `workdir` is refused.
  """
  if run_config.config_path(workdir).exists() or checkpoints.latest_step_on_disk(workdir) or (
      checkpoints.checkpoint_dir(workdir).exists()):
    raise ConversionError(f'{workdir} already holds a run (config.json or checkpoints/); '
                          'choose an empty --workdir.')
  unet_config, scheduler_config, state_dict = load_diffusers_folder(source)
  config = config_from_diffusers(unet_config, scheduler_config, base)
  params = params_from_state_dict(state_dict, config)
  write_workdir(config, params, workdir)
  return config


def export_diffusers(workdir: str, out: str, use_ema: bool = True) -> None:
  """Writes the run's (EMA) params as a diffusers UNet2DModel folder + scheduler_config.json."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
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

