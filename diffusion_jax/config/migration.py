"""Configs saved by earlier versions, read in today's layout.

Until 2026-12 the backbone and objective fields were flat (`model.ch`, `model.dit_depth`,
`diffusion.num_timesteps`, `diffusion.edm_sigma_data`, `diffusion.flow_time_dist`, ...). They
are now the sections of their component (`model.unet.ch`, `model.dit.depth`,
`diffusion.ddpm.num_timesteps`, `diffusion.edm.sigma_data`,
`diffusion.flow_matching.time_dist`). `migrate` moves every old field to its place, so a run
directory written before (config.json, the checkpoints' config items) loads, samples and
resumes as it was trained. It is applied to every config read from disk (run_config.py).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

_UNET = ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'num_heads', 'num_head_channels',
         'resblock_updown', 'use_scale_shift_norm', 'num_groups', 'downsample_padding')
_DIT = ('hidden_size', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'pos_embed')
_DDPM = ('num_timesteps', 'beta_schedule', 'beta_start', 'beta_end', 'prediction_type',
         'loss_weighting', 'min_snr_gamma', 'vlb_weight')
_EDM = ('sigma_data', 'p_mean', 'p_std', 'sigma_min', 'sigma_max')
_FLOW = ('time_dist', 'logit_mean', 'logit_std', 'time_shift', 'prediction', 'x0_min_t',
         'time_scale')

# Old dotted field -> the fields it became. The U-Net and the DiT both read the old shared
# dropout and norm_eps, so each keeps the value the run was trained with.
RENAMED: Dict[str, Tuple[str, ...]] = {
    **{f'model.{name}': (f'model.unet.{name}',) for name in _UNET},
    **{f'model.dit_{name}': (f'model.dit.{name}',) for name in _DIT},
    'model.dropout': ('model.unet.dropout', 'model.dit.dropout'),
    'model.norm_eps': ('model.unet.norm_eps', 'model.dit.norm_eps'),
    **{f'diffusion.{name}': (f'diffusion.ddpm.{name}',) for name in _DDPM},
    **{f'diffusion.edm_{name}': (f'diffusion.edm.{name}',) for name in _EDM},
    **{f'diffusion.flow_{name}': (f'diffusion.flow_matching.{name}',) for name in _FLOW},
}


def migrate(tree: Dict[str, Any]) -> Dict[str, Any]:
  """A copy of the config dict `tree` with every `RENAMED` field moved to its new place(s).

  A config already in today's layout comes back unchanged. A new field that `tree` sets
  already is not overwritten by an old one.
  """
  out = copy.deepcopy(tree)
  for old, news in RENAMED.items():
    section, name = old.split('.')
    fields = out.get(section)
    if not isinstance(fields, dict) or name not in fields or isinstance(fields[name], dict):
      continue
    value = fields.pop(name)
    for new in news:
      _, subsection, leaf = new.split('.')
      target = fields.setdefault(subsection, {})
      target.setdefault(leaf, copy.deepcopy(value))
  return out
