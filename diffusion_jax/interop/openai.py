"""improved-diffusion / guided-diffusion checkpoints (OpenAI's `UNetModel` .pt files) -> our U-Net.

  python -m diffusion_jax.convert --from=openai --source=MODEL.pt --workdir=RUN \\
      --model_flags="$MODEL_FLAGS" [--diffusion_flags="$DIFFUSION_FLAGS"]

The two flag strings are the ones those READMEs publish next to each checkpoint; they are parsed
together, as their scripts do (`image_sample.py $MODEL_FLAGS $DIFFUSION_FLAGS`), with the
defaults of the codebase the flags come from: guided-diffusion's when any flag only it has is
given (num_head_channels, channel_mult, resblock_updown, use_fp16, use_new_attention_order),
else improved-diffusion's (the two differ in rescale_timesteps / rescale_learned_sigmas, which
improved-diffusion turns on by default).

Every architectural difference to our defaults is a config.model field (config/defaults.py):
[cos, sin] timestep features at frequencies 10000^(-i/half) (flip_sin_to_cos, freq_shift=0),
GroupNorm eps 1e-5 (norm_eps), one pixel of padding on every side of the stride-2 convolutions
(downsample_padding=1), a class embedding without a null row (null_class=False), and
improved-diffusion's rescale_timesteps, the network seeing t * 1000 / T (timestep_scale).
`attention_resolutions` are feature-map sizes in their flags, as in ours (their model turns them
into downsample factors image_size // r).

Weights: their fused attention projection `qkv` (a 1x1 conv1d [3C, C, 1]) is split into our
query / key / value [C, heads, C/heads]. Its output channels are ordered per head (head, q|k|v,
d) by QKVAttentionLegacy (use_new_attention_order=False) and (q|k|v, head, d) by QKVAttention;
both orders compute the same attention, so the order is only how the tensor is read. Every key
and shape is checked before anything is written; a flag, key or shape ours cannot take exactly
is a ConversionError naming it.
"""

from __future__ import annotations

import shlex
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from diffusion_jax.config import defaults
from diffusion_jax.interop import common
from diffusion_jax.interop import torch_pickle
from diffusion_jax.interop.common import ConversionError
from diffusion_jax.nn import backbones
from diffusion_jax.objectives import ddpm

PyTree = Any

# Their flags: name -> (type, improved-diffusion default, guided-diffusion default). These are
# their scripts' semantics (script_util.model_and_diffusion_defaults and image_sample.py), not
# our defaults. None = the flag does not exist in that codebase.
FLAGS: Dict[str, Tuple[type, Any, Any]] = {
    'image_size': (int, 64, 64),
    'num_channels': (int, 128, 128),
    'num_res_blocks': (int, 2, 2),
    'num_heads': (int, 4, 4),
    'num_heads_upsample': (int, -1, -1),
    'num_head_channels': (int, None, -1),
    'attention_resolutions': (str, '16,8', '16,8'),
    'channel_mult': (str, None, ''),
    'dropout': (float, 0.0, 0.0),
    'class_cond': (bool, False, False),
    'use_checkpoint': (bool, False, False),      # Gradient checkpointing: no effect on weights.
    'use_scale_shift_norm': (bool, True, True),
    'resblock_updown': (bool, None, False),
    'use_fp16': (bool, None, False),             # fp16 torso: the saved weights are float32.
    'use_new_attention_order': (bool, None, False),
    'learn_sigma': (bool, False, False),
    'sigma_small': (bool, False, None),
    'diffusion_steps': (int, 1000, 1000),
    'noise_schedule': (str, 'linear', 'linear'),
    'timestep_respacing': (str, '', ''),
    'use_kl': (bool, False, False),
    'predict_xstart': (bool, False, False),
    'rescale_timesteps': (bool, True, False),
    'rescale_learned_sigmas': (bool, True, False),
    'use_ddim': (bool, False, False),            # image_sample.py's sampler choice ...
    'clip_denoised': (bool, True, True),         # ... and x0 clipping.
    # Not theirs: normalization() is always GroupNorm(32, C); this names another group count
    # for a model built with a patched normalization() (the test fixtures' tiny ones).
    'num_groups': (int, 32, 32),
}
GUIDED_ONLY = tuple(name for name, (_, improved, _g) in FLAGS.items() if improved is None)
IMPROVED_ONLY = tuple(name for name, (_, _i, guided) in FLAGS.items() if guided is None)
NUM_CLASSES = 1000  # class_cond=True: their NUM_CLASSES (ImageNet).
# Default channel_mult per image_size (their create_model; the sizes both define agree).
CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4),
                256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}
TRUE_WORDS, FALSE_WORDS = ('yes', 'true', 't', 'y', '1'), ('no', 'false', 'f', 'n', '0')


# ------------------------------------------------------------------ flags

def flag_value(name: str, kind: type, text: str) -> Any:
  """`text` of flag --name as `kind` (bools as their str2bool reads them), else ConversionError."""
  try:
    if kind is bool:
      if text.lower() in TRUE_WORDS:
        return True
      if text.lower() in FALSE_WORDS:
        return False
      raise ValueError(text)
    return kind(text)
  except ValueError:
    raise ConversionError(f'flag --{name}={text!r} is not a {kind.__name__}.') from None


def split_flags(texts: Sequence[str], known: Collection[str], what: str,
                hint: Callable[[str], str] = lambda name: '') -> Dict[str, str]:
  """{name: value text} of flag strings (read one after the other) as their argparse reads
  them: `--name value` and `--name=value` both parse, a later repeat wins. A name outside
  `known` is a ConversionError saying it is not `what` (plus `hint(name)`), as is a stray token
  or a flag without a value."""
  tokens = [token for text in texts for token in shlex.split(text or '')]
  given: Dict[str, str] = {}
  i = 0
  while i < len(tokens):
    token = tokens[i]
    if not token.startswith('--'):
      raise ConversionError(f'unexpected {token!r} in the flags: give --name value pairs.')
    name, eq, value = token[2:].partition('=')
    if name not in known:
      raise ConversionError(f'flag --{name} is not {what}{hint(name)}; known: {sorted(known)}.')
    if not eq:
      if i + 1 >= len(tokens):
        raise ConversionError(f'flag --{name} has no value.')
      i += 1
      value = tokens[i]
    given[name] = value
    i += 1
  return given


def parse_flags(model_flags: str, diffusion_flags: str = '') -> Dict[str, Any]:
  """Every flag of FLAGS with its value (given, or the codebase's default), plus 'codebase'.

  `--name value` and `--name=value` both parse; a later repeat wins (argparse). An unknown
  flag, a flag of the other codebase or a malformed value is a ConversionError naming it.
  """
  given = split_flags((model_flags, diffusion_flags), FLAGS,
                      'a model or diffusion flag of improved/guided-diffusion that converts')
  guided = [n for n in GUIDED_ONLY if n in given]
  improved = [n for n in IMPROVED_ONLY if n in given]
  if guided and improved:
    raise ConversionError(f'flag --{improved[0]} is improved-diffusion\'s but --{guided[0]} is '
                          'guided-diffusion\'s: the flags mix the two codebases.')
  codebase = 'guided' if guided else 'improved'
  flags: Dict[str, Any] = {'codebase': codebase}
  for name, (kind, improved_default, guided_default) in FLAGS.items():
    default = guided_default if codebase == 'guided' else improved_default
    flags[name] = flag_value(name, kind, given[name]) if name in given else default
  return flags


def _channel_mult(flags: Mapping[str, Any]) -> Tuple[int, ...]:
  text, size = flags['channel_mult'], flags['image_size']
  if text:
    try:
      mult = tuple(float(m) for m in text.split(','))
    except ValueError:
      raise ConversionError(f'flag --channel_mult={text!r} is not a list of numbers.') from None
  elif size in CHANNEL_MULT:
    mult = CHANNEL_MULT[size]
  else:
    raise ConversionError(f'flag --image_size={size} has no default channel_mult; give '
                          '--channel_mult.')
  if mult[0] != 1 or any(m != int(m) for m in mult):
    raise ConversionError(f'channel_mult={mult} (flag --channel_mult / --image_size): ours needs '
                          'whole multipliers starting at 1 (the 512x512 model has 0.5).')
  return tuple(int(m) for m in mult)


def attention_sizes(flag: str, text: str, image_size: int, levels: int) -> Tuple[int, ...]:
  """Our attn_resolutions (the feature-map sizes of the levels with attention) of their flag
  --`flag`=`text`: sizes r whose downsample factor image_size // r their model gets attention
  at (2**level). Listed factors no level reaches add nothing (their model has no weights)."""
  factors = set()
  for part in str(text).split(','):
    if not part.strip().isdigit() or int(part) < 1:
      raise ConversionError(f'flag --{flag}={text!r} is not a list of feature-map sizes.')
    factors.add(image_size // int(part))
  return tuple(image_size // 2**level for level in range(levels) if 2**level in factors)


def set_schedule(d: ml_collections.ConfigDict, steps: int, noise_schedule: str) -> None:
  """diffusion.ddpm `d`'s noise schedule as their create_gaussian_diffusion builds it from
  --diffusion_steps and --noise_schedule (linear or cosine)."""
  if noise_schedule not in ('linear', 'cosine'):
    raise ConversionError(f'flag --noise_schedule={noise_schedule!r} is not linear or cosine.')
  d.num_timesteps = steps
  if noise_schedule == 'linear':  # Their linear schedule scales with T (Ho et al.'s at 1000).
    scale = 1000 / steps  # In their order of operations, so the float64 betas are identical.
    d.beta_schedule, d.beta_start, d.beta_end = 'linear', scale * 0.0001, scale * 0.02
  else:
    d.beta_schedule = 'cosine'


def config_from_flags(flags: Mapping[str, Any],
                      base: Optional[ml_collections.ConfigDict] = None
                      ) -> ml_collections.ConfigDict:
  """Our full config for parsed flags: `base` (config/defaults.py when None) with data.resolution /
  channels, config.model, config.diffusion and the sampler (image_sample.py's: ddpm, or ddim with
  --use_ddim, on timestep_respacing) set from them."""
  if base is None:
    base = defaults.get_config()
  config = ml_collections.ConfigDict(base.to_dict())
  f = flags
  if f['num_head_channels'] in (None, -1) and f['num_heads_upsample'] not in (-1, f['num_heads']):
    raise ConversionError(f'flag --num_heads_upsample={f["num_heads_upsample"]} differs from '
                          f'--num_heads={f["num_heads"]}: ours has one head count per model.')
  if f['use_kl']:
    raise ConversionError('flag --use_kl=True (the L_vlb objective) has no config.diffusion loss; '
                          'drop it from DIFFUSION_FLAGS to import for sampling (the network is '
                          'the same; fine-tuning then uses the hybrid loss).')
  size, steps = int(f['image_size']), int(f['diffusion_steps'])
  mult = _channel_mult(f)
  m, u = config.model, config.model.unet
  m.arch = 'unet'  # Their UNetModel, whatever the base config's network was.
  u.ch, u.ch_mult, u.num_res_blocks = int(f['num_channels']), mult, int(f['num_res_blocks'])
  u.attn_resolutions = attention_sizes('attention_resolutions', f['attention_resolutions'],
                                       size, len(mult))
  u.num_heads = int(f['num_heads'])
  u.num_head_channels = -1 if f['num_head_channels'] is None else int(f['num_head_channels'])
  u.dropout = float(f['dropout'])
  u.resblock_updown = bool(f['resblock_updown'])
  u.use_scale_shift_norm = bool(f['use_scale_shift_norm'])
  u.num_groups = int(f['num_groups'])
  u.norm_eps, u.downsample_padding = 1e-5, 1
  m.num_classes = NUM_CLASSES if f['class_cond'] else 0
  m.null_class = False
  m.learn_sigma = bool(f['learn_sigma'])
  m.flip_sin_to_cos, m.freq_shift = True, 0
  m.timestep_scale = 1000.0 / steps if f['rescale_timesteps'] else 1.0
  config.data.resolution, config.data.channels = size, 3

  config.diffusion.objective = 'ddpm'  # improved/guided-diffusion's discrete-time objective.
  d = config.diffusion.ddpm
  set_schedule(d, steps, f['noise_schedule'])
  d.prediction_type = 'x0' if f['predict_xstart'] else 'epsilon'
  d.loss_weighting = 'simple'
  # Their hybrid loss adds L_t (MSE) or L_t * T / 1000 (RESCALED_MSE); ours adds vlb_weight T L_t.
  d.vlb_weight = 0.001 if f['rescale_learned_sigmas'] else 1.0 / steps

  s = config.sample
  s.sampler = 'ddim' if f['use_ddim'] else 'ddpm'
  s.steps = steps
  s.spacing = str(f['timestep_respacing']) or 'leading'  # '' keeps all T steps.
  s.eta = 0.0
  s.clip_denoised = bool(f['clip_denoised'])
  # Their samplers clip x0 to [-1, 1], DDIM recomputes eps from the clipped x0 and its last step
  # goes to abar = 1 (alphas_cumprod_prev[0] = 1).
  s.thresholding, s.use_clipped_model_output, s.set_alpha_to_one = 'static', True, True
  fixed = 'fixed_small' if f['sigma_small'] else 'fixed_large'
  s.variance = 'learned_range' if m.learn_sigma else fixed
  config.eval.variance = fixed

  errors = backbones.check_model_config(m, size) + ddpm.check_config(config)
  if errors:
    raise ConversionError('the flags give a config ours cannot run:\n  ' + '\n  '.join(errors))
  return config


# ------------------------------------------------------------------ tensors

# Their names of the modules inside our ResBlock / AttentionBlock, and of our top-level modules
# (the classifier's importer, openai_classifier.py, reads both for its torso).
BLOCK_SUBMODULES = {
    'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'temb_proj': 'emb_layers.1',
    'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'skip': 'skip_connection',
    'norm': 'norm', 'query': 'qkv', 'key': 'qkv', 'value': 'qkv', 'proj_out': 'proj_out'}
TOP_MODULES = {
    'conv_in': 'input_blocks.0.0', 'temb_dense0': 'time_embed.0', 'temb_dense1': 'time_embed.2',
    'class_embed': 'label_emb', 'norm_out': 'out.0', 'conv_out': 'out.2',
    'mid_res_0': 'middle_block.0', 'mid_attn': 'middle_block.1', 'mid_res_1': 'middle_block.2'}


def down_key(name: str, num_res_blocks: int, resblock_updown: bool) -> str:
  """Their `input_blocks` prefix of our down-path module `name` ('down_1_attn_0' ->
  'input_blocks.5.1' at 2 res blocks per level): the same in their UNetModel and their
  classifier's EncoderUNetModel."""
  parts = name.split('_')
  if len(parts) not in (3, 4) or parts[0] != 'down' or parts[2] not in ('res', 'attn',
                                                                        'downsample'):
    raise ConversionError(f'our parameter {name!r} has no openai counterpart.')
  level, kind = int(parts[1]), parts[2]
  index = 1 + level * (num_res_blocks + 1) + (int(parts[3]) if kind in ('res', 'attn')
                                              else num_res_blocks)
  position = {'res': '0', 'attn': '1', 'downsample': '0'}[kind]
  suffix = '.op' if kind == 'downsample' and not resblock_updown else ''
  return f'input_blocks.{index}.{position}{suffix}'


def _module_key(name: str, config: ml_collections.ConfigDict) -> str:
  """Their prefix of our top-level module `name` ('down_1_attn_0' -> 'input_blocks.5.1')."""
  if name in TOP_MODULES:
    return TOP_MODULES[name]
  parts = name.split('_')
  if len(parts) not in (3, 4) or parts[0] not in ('down', 'up'):
    raise ConversionError(f'our parameter {name!r} has no openai counterpart.')
  path, level, kind = parts[0], int(parts[1]), parts[2]
  m = config.model.unet
  per_level = m.num_res_blocks + 1
  if path == 'down':
    return down_key(name, m.num_res_blocks, m.resblock_updown)
  block = (len(m.ch_mult) - 1 - level) * per_level
  if kind in ('res', 'attn'):
    return f'output_blocks.{block + int(parts[3])}.{0 if kind == "res" else 1}'
  has_attn = config.data.resolution // 2**level in tuple(m.attn_resolutions)
  suffix = '.conv' if not m.resblock_updown else ''
  return f'output_blocks.{block + m.num_res_blocks}.{2 if has_attn else 1}{suffix}'


def openai_key(path: Sequence[str], config: ml_collections.ConfigDict) -> str:
  """Their state-dict key of our parameter at `path` (('mid_attn', 'query', 'kernel') ->
  'middle_block.1.qkv.weight')."""
  return common.torch_key(path, _module_key(path[0], config), BLOCK_SUBMODULES, 'openai')


def _qkv_rows(which: int, heads: int, dim: int, new_order: bool) -> np.ndarray:
  """Rows [heads, dim] of the fused qkv output that hold q (0), k (1) or v (2) of each head."""
  h, j = np.meshgrid(np.arange(heads), np.arange(dim), indexing='ij')
  return which * heads * dim + h * dim + j if new_order else h * 3 * dim + which * dim + j


def openai_shape(path: Sequence[str], shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """Their tensor shape of our parameter of `shape` at `path`."""
  if path[-2] in ('query', 'key', 'value'):
    channels = shape[0] if len(shape) == 3 else shape[0] * shape[1]
    return (3 * channels, channels, 1) if len(shape) == 3 else (3 * channels,)
  if path[-2] == 'proj_out' and len(shape) == 3:
    return (shape[2], shape[0] * shape[1], 1)
  if len(shape) == 4:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if len(shape) == 2 and path[-1] == 'kernel':
    return (shape[1], shape[0])
  return tuple(shape)


def from_openai(path: Sequence[str], tensor: np.ndarray, shape: Tuple[int, ...],
                new_order: bool) -> np.ndarray:
  """Their tensor in our layout `shape` (conv OIHW -> HWIO, linear transposed, qkv split)."""
  if path[-2] in ('query', 'key', 'value'):
    heads, dim = shape[-2], shape[-1]
    rows = _qkv_rows(('query', 'key', 'value').index(path[-2]), heads, dim, new_order)
    if len(shape) == 3:
      return np.ascontiguousarray(tensor[rows, :, 0].transpose(2, 0, 1))
    return tensor[rows]
  if path[-2] == 'proj_out' and len(shape) == 3:
    return np.ascontiguousarray(tensor[:, :, 0].T).reshape(shape)
  if len(shape) == 4:
    return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
  if len(shape) == 2 and path[-1] == 'kernel':
    return np.ascontiguousarray(tensor.T)
  return tensor.reshape(shape)


def expected_shapes(config: ml_collections.ConfigDict) -> Dict[str, Tuple[int, ...]]:
  """{their key: their shape} of the checkpoint `config` converts from (nothing is computed)."""
  return {openai_key(path, config): openai_shape(path, leaf.shape)
          for path, leaf in common.leaf_paths(common.abstract_params(config))}


def params_from_state_dict(state_dict: Mapping[str, Any],
                           config: ml_collections.ConfigDict, new_order: bool) -> PyTree:
  """Our parameter tree (numpy) from their state dict; every key must be present with its shape
  and a floating dtype and every one of theirs used, before any tensor is read, else
  ConversionError names the key."""
  return common.params_from_state_dict(
      state_dict, common.abstract_params(config), lambda path: openai_key(path, config),
      openai_shape, lambda path, tensor, shape: from_openai(path, tensor, shape, new_order),
      missing_hint='it is not the model these flags describe.', shape_hint=': check the flags',
      extra_hint='; check the flags')


# ------------------------------------------------------------------ files

def load(source: str, model_flags: str, diffusion_flags: str = '',
         base: Optional[ml_collections.ConfigDict] = None
         ) -> Tuple[ml_collections.ConfigDict, PyTree]:
  """(config, params) of an improved/guided-diffusion .pt and its flags; writes nothing."""
  flags = parse_flags(model_flags, diffusion_flags)
  config = config_from_flags(flags, base)  # Flag errors before the file is read.
  state_dict = torch_pickle.open_state_dict(source)  # Checked, not read.
  return config, params_from_state_dict(state_dict, config,
                                        bool(flags['use_new_attention_order']))


def import_openai(source: str, workdir: str, model_flags: str, diffusion_flags: str = '',
                  base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """Converts an improved/guided-diffusion .pt into a run directory; returns its config.

  Everything is checked before the first write; an existing run in `workdir` is refused.
  """
  common.check_empty_workdir(workdir)
  config, params = load(source, model_flags, diffusion_flags, base)
  common.write_run(config, params, workdir)
  return config
