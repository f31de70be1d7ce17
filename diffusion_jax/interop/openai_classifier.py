"""guided-diffusion's noisy classifiers (their `EncoderUNetModel` .pt files: 64x64_classifier.pt,
128x128_classifier.pt, 256x256_classifier.pt, 512x512_classifier.pt) -> our NoisyClassifier.

  python -m diffusion_jax.convert --from=openai_classifier --source=CLASSIFIER.pt --workdir=RUN \\
      --classifier_flags="$CLASSIFIER_FLAGS" [--diffusion_flags="$DIFFUSION_FLAGS"]

CLASSIFIER_FLAGS is the string guided-diffusion's README publishes (or the classifier flags of
its `classifier_sample.py` command lines, e.g. "--image_size 64 --classifier_scale 1.0
--classifier_depth 4"), read with their `classifier_defaults()` for the flags it leaves out.
`--classifier_scale` (classifier_sample.py's, default 1.0) does not change the network: it is
carried into the written run's `sample.classifier_scale` as the scale the classifier was
published with. `--classifier_use_fp16` only casts their torso at run time: the saved weights
are float32 (a float16 tensor is read and cast to float32 all the same).

DIFFUSION_FLAGS (optional; guided-diffusion's defaults: 1000 linear steps, no rescaling) gives
the noise schedule the classifier was trained on, which guidance checks against the diffusion
model's (sampling/classifier_guidance.py), and --rescale_timesteps: their sampler hands the
classifier t * 1000 / T when the sampling diffusion rescales (SpacedDiffusion wraps cond_fn as
it wraps the model), i.e. model.timestep_scale. Pass the diffusion model's DIFFUSION_FLAGS.
The other diffusion flags (learn_sigma, timestep_respacing, use_kl, ...) are accepted and have
no effect on a classifier.

Their create_classifier fixes what a classifier flag cannot change: channel_mult by image size
(64: 1,2,3,4; 128: 1,1,2,3,4; 256: 1,1,2,2,4,4; 512: 0.5,1,1,2,2,4,4), 64 channels per
attention head, 1000 classes, 3 input channels, GroupNorm(32, C) and the legacy attention
order (QKVAttentionLegacy) in its blocks; AttentionPool2d always reads its qkv in the new
order (QKVAttention). For classifiers built otherwise (the tests' tiny ones), flags that are
OURS, not theirs, override those: --classifier_channel_mult, --classifier_num_head_channels,
--num_classes and --num_groups (as openai.py's --num_groups).

Everything their EncoderUNetModel does differently from our defaults is a config field, as for
the U-Net (openai.py): [cos, sin] timestep features (flip_sin_to_cos, freq_shift=0), GroupNorm
eps 1e-5 (norm_eps), padded stride-2 convolutions (downsample_padding=1). The written run is a
normal run (config.json + a step-0 checkpoint whose params and EMA are the imported weights)
with model.arch='classifier' and diffusion.objective='noisy_classifier', usable as a diffusion
run's `sample.classifier_workdir` or fine-tuned with --mode=train. A missing / extra /
misshapen tensor, an unknown flag or a flag value ours cannot take is a ConversionError naming
it, raised before anything is written.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from diffusion_jax import objectives
from diffusion_jax.config import defaults
from diffusion_jax.interop import common
from diffusion_jax.interop import openai
from diffusion_jax.interop import torch_pickle
from diffusion_jax.interop.common import ConversionError
from diffusion_jax.nn import backbones
from diffusion_jax.nn import classifier as classifier_lib

PyTree = Any

# Classifier flags: name -> (type, default). Theirs: script_util.classifier_defaults() and
# classifier_sample.py's classifier_scale.
FLAGS: Dict[str, Tuple[type, Any]] = {
    'image_size': (int, 64),
    'classifier_use_fp16': (bool, False),        # fp16 torso at run time: weights are float32.
    'classifier_width': (int, 128),
    'classifier_depth': (int, 2),
    'classifier_attention_resolutions': (str, '32,16,8'),
    'classifier_use_scale_shift_norm': (bool, True),
    'classifier_resblock_updown': (bool, True),
    'classifier_pool': (str, 'attention'),
    'classifier_scale': (float, 1.0),            # -> sample.classifier_scale (no weights).
}
# Ours, not theirs: create_classifier's fixed choices, for classifiers built otherwise.
OUR_FLAGS: Dict[str, Tuple[type, Any]] = {
    'classifier_channel_mult': (str, ''),        # '' = create_classifier's by image_size.
    'classifier_num_head_channels': (int, 64),   # Their num_head_channels=64.
    'num_classes': (int, 1000),                  # Their out_channels=1000.
    'num_groups': (int, 32),                     # Their normalization(): GroupNorm(32, C).
}
# The diffusion flags their classifier scripts accept (guided-diffusion's defaults, openai.FLAGS);
# only the schedule and rescale_timesteps concern a classifier.
DIFFUSION_FLAGS = ('diffusion_steps', 'noise_schedule', 'rescale_timesteps', 'learn_sigma',
                   'timestep_respacing', 'use_kl', 'predict_xstart', 'rescale_learned_sigmas')
# create_classifier's channel_mult per image_size (the sizes it defines).
CHANNEL_MULT = {size: openai.CHANNEL_MULT[size] for size in (64, 128, 256, 512)}
IN_CHANNELS = 3
# Their modules of our head's (model.classifier.pool) top-level modules: EncoderUNetModel.out
# is Sequential(GroupNorm, SiLU, AttentionPool2d | AdaptiveAvgPool2d + 1x1 conv, ...) or the
# spatial MLP Sequential(Linear, ReLU | GroupNorm + SiLU, Linear).
HEAD_MODULES = {
    'attention': {'norm_out': 'out.0', 'pool': 'out.2'},
    'adaptive': {'norm_out': 'out.0', 'head': 'out.3'},
    'spatial': {'spatial_0': 'out.0', 'spatial_1': 'out.2'},
    'spatial_v2': {'spatial_0': 'out.0', 'spatial_norm': 'out.1', 'spatial_1': 'out.3'},
}
# Inside AttentionPool2d: its fused qkv_proj (conv1d [3C, C, 1], new order) and c_proj.
POOL_SUBMODULES = {'query': 'qkv_proj', 'key': 'qkv_proj', 'value': 'qkv_proj',
                   'c_proj': 'c_proj'}


# ------------------------------------------------------------------ flags

def _hint(name: str) -> str:
  if name in openai.FLAGS:
    return (' (it is a flag of the diffusion model\'s MODEL_FLAGS: convert that model with '
            '--from=openai)')
  return ''


def parse_flags(classifier_flags: str, diffusion_flags: str = '') -> Dict[str, Any]:
  """Every classifier flag (FLAGS, OUR_FLAGS) and diffusion flag (DIFFUSION_FLAGS) with its
  value, given or guided-diffusion's default. Both strings share one namespace, as in their
  scripts' argparse; an unknown flag or a malformed value is a ConversionError naming it."""
  kinds = {**FLAGS, **OUR_FLAGS,
           **{name: (openai.FLAGS[name][0], openai.FLAGS[name][2]) for name in DIFFUSION_FLAGS}}
  given = openai.split_flags((classifier_flags, diffusion_flags), kinds,
                             'a classifier or diffusion flag of guided-diffusion\'s classifier '
                             'scripts (or one of ours: ' + ', '.join(OUR_FLAGS) + ')', _hint)
  return {name: openai.flag_value(name, kind, given[name]) if name in given else default
          for name, (kind, default) in kinds.items()}


def _channel_mult(flags: Mapping[str, Any]) -> Tuple[float, ...]:
  text, size = flags['classifier_channel_mult'], flags['image_size']
  if text:
    try:
      mult = tuple(float(m) for m in text.split(','))
    except ValueError:
      raise ConversionError(f'flag --classifier_channel_mult={text!r} is not a list of '
                            'numbers.') from None
  elif size in CHANNEL_MULT:
    mult = CHANNEL_MULT[size]
  else:
    raise ConversionError(f'flag --image_size={size}: their create_classifier knows only '
                          f'{sorted(CHANNEL_MULT)}; give --classifier_channel_mult (ours) for a '
                          'classifier built otherwise.')
  width = flags['classifier_width']
  bad = [m for m in mult if not m > 0 or m * width != int(m * width)]
  if bad:
    raise ConversionError(f'flag --classifier_channel_mult / --image_size: multipliers {bad} of '
                          f'--classifier_width={width} do not give whole channel counts.')
  return tuple(int(m) if m == int(m) else float(m) for m in mult)


def config_from_flags(flags: Mapping[str, Any],
                      base: Optional[ml_collections.ConfigDict] = None
                      ) -> ml_collections.ConfigDict:
  """Our full config of the classifier of parsed `flags`: `base` (config/defaults.py when None)
  with data.resolution / channels, config.model (arch 'classifier', model.classifier.*),
  diffusion.objective 'noisy_classifier' on the diffusion.ddpm schedule of the flags, and
  sample.classifier_scale set from them."""
  config = ml_collections.ConfigDict((defaults.get_config() if base is None
                                      else base).to_dict())
  f = flags
  size, steps = int(f['image_size']), int(f['diffusion_steps'])
  if f['classifier_pool'] not in classifier_lib.POOLS:
    raise ConversionError(f'flag --classifier_pool={f["classifier_pool"]!r} is not one of '
                          f'{classifier_lib.POOLS}.')
  mult = _channel_mult(f)
  m, c = config.model, config.model.classifier
  m.arch = 'classifier'
  c.ch, c.ch_mult, c.num_res_blocks = int(f['classifier_width']), mult, int(f['classifier_depth'])
  c.attn_resolutions = openai.attention_sizes(
      'classifier_attention_resolutions', f['classifier_attention_resolutions'], size, len(mult))
  c.num_heads, c.num_head_channels = 1, int(f['classifier_num_head_channels'])
  c.pool = str(f['classifier_pool'])
  c.use_scale_shift_norm = bool(f['classifier_use_scale_shift_norm'])
  c.resblock_updown = bool(f['classifier_resblock_updown'])
  c.dropout = 0.0  # create_classifier's EncoderUNetModel default; no effect on the weights.
  c.num_groups = int(f['num_groups'])
  c.norm_eps, c.downsample_padding = 1e-5, 1
  m.num_classes, m.null_class, m.learn_sigma = int(f['num_classes']), False, False
  m.flip_sin_to_cos, m.freq_shift = True, 0
  m.timestep_scale = 1000.0 / steps if f['rescale_timesteps'] else 1.0
  config.data.resolution, config.data.channels = size, IN_CHANNELS

  if 'noisy_classifier' in objectives.OBJECTIVES:
    config.diffusion.objective = 'noisy_classifier'
  openai.set_schedule(config.diffusion.ddpm, steps, f['noise_schedule'])
  config.training.cond_drop_prob = 0.0  # The label is the target, not a condition.
  config.sample.classifier_scale = float(f['classifier_scale'])

  errors = backbones.check_model_config(m, size) + objectives.check_config(config)
  if errors:
    raise ConversionError('the flags give a config ours cannot run:\n  ' + '\n  '.join(errors))
  return config


# ------------------------------------------------------------------ tensors

def _prefix(name: str, config: ml_collections.ConfigDict) -> str:
  """Their prefix of our top-level classifier module `name`."""
  c = config.model.classifier
  head = HEAD_MODULES[c.pool]
  if name in head:
    return head[name]
  if name.startswith('down_'):
    return openai.down_key(name, c.num_res_blocks, c.resblock_updown)
  if name in openai.TOP_MODULES and name not in ('class_embed', 'norm_out', 'conv_out'):
    return openai.TOP_MODULES[name]
  raise ConversionError(f'our parameter {name!r} has no guided-diffusion classifier '
                        'counterpart.')


def classifier_key(path: Sequence[str], config: ml_collections.ConfigDict) -> str:
  """Their state-dict key of our parameter at `path` (('pool', 'query', 'kernel') ->
  'out.2.qkv_proj.weight')."""
  prefix = _prefix(path[0], config)
  if path[0] == 'pool':
    if tuple(path[1:]) == ('positional_embedding',):
      return f'{prefix}.positional_embedding'
    return common.torch_key(path, prefix, POOL_SUBMODULES, 'guided-diffusion classifier')
  return common.torch_key(path, prefix, openai.BLOCK_SUBMODULES, 'guided-diffusion classifier')


def classifier_shape(path: Sequence[str], shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """Their tensor shape of our parameter of `shape` at `path`."""
  if path[-1] == 'positional_embedding':  # Ours [HW+1, C], theirs [C, HW+1].
    return (shape[1], shape[0])
  if path[0] == 'pool' and path[-2] == 'c_proj' and path[-1] == 'kernel':  # conv1d [K, C, 1].
    return (shape[1], shape[0], 1)
  if path[0] == 'head' and path[-1] == 'kernel':  # The 1x1 conv [K, C, 1, 1].
    return (shape[1], shape[0], 1, 1)
  return openai.openai_shape(path, shape)


def from_classifier(path: Sequence[str], tensor: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """Their tensor in our layout `shape`: the pool's qkv in the new order, the blocks' in the
  legacy order (create_classifier), 1x1 convolutions as dense kernels."""
  if path[-1] == 'positional_embedding':
    return np.ascontiguousarray(tensor.T)
  if path[-1] == 'kernel' and ((path[0] == 'pool' and path[-2] == 'c_proj') or
                               path[0] == 'head'):
    return np.ascontiguousarray(tensor.reshape(shape[1], shape[0]).T)
  return openai.from_openai(path, tensor, shape, new_order=path[0] == 'pool')


def expected_shapes(config: ml_collections.ConfigDict) -> Dict[str, Tuple[int, ...]]:
  """{their key: their shape} of the checkpoint `config` converts from (nothing is computed)."""
  return {classifier_key(path, config): classifier_shape(path, leaf.shape)
          for path, leaf in common.leaf_paths(common.abstract_params(config))}


def params_from_state_dict(state_dict: Mapping[str, Any],
                           config: ml_collections.ConfigDict) -> PyTree:
  """Our parameter tree (numpy) from their state dict; every key must be present with its shape
  and a floating dtype and every one of theirs used, before any tensor is read, else
  ConversionError names the key."""
  return common.params_from_state_dict(
      state_dict, common.abstract_params(config), lambda path: classifier_key(path, config),
      classifier_shape, from_classifier,
      missing_hint='it is not the classifier these flags describe.',
      shape_hint=': check the classifier flags', extra_hint='; check the classifier flags')


# ------------------------------------------------------------------ files

def load(source: str, classifier_flags: str, diffusion_flags: str = '',
         base: Optional[ml_collections.ConfigDict] = None
         ) -> Tuple[ml_collections.ConfigDict, PyTree]:
  """(config, params) of a guided-diffusion classifier .pt and its flags; writes nothing."""
  config = config_from_flags(parse_flags(classifier_flags, diffusion_flags), base)
  state_dict = torch_pickle.open_state_dict(source)  # Checked, not read.
  return config, params_from_state_dict(state_dict, config)


def import_openai_classifier(source: str, workdir: str, classifier_flags: str,
                             diffusion_flags: str = '',
                             base: Optional[ml_collections.ConfigDict] = None
                             ) -> ml_collections.ConfigDict:
  """Converts a guided-diffusion classifier .pt into a run directory; returns its config.

  Everything is checked before the first write; an existing run in `workdir` is refused.
  """
  common.check_empty_workdir(workdir)
  config, params = load(source, classifier_flags, diffusion_flags, base)
  common.write_run(config, params, workdir)
  return config
