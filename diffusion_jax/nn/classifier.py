"""The noisy classifier of classifier guidance: the encoder half of the ADM U-Net with a pooling
head, time-conditioned, trained on x_t (Dhariwal & Nichol 2021, guided-diffusion's
`EncoderUNetModel`).

`NoisyClassifier(...)(x [B,H,W,C], t [B], y=None, train=bool)` returns logits [B, num_classes]
of p(y | x_t, t). `y` is accepted so that the model has every backbone's call, and ignored: the
classifier predicts it. The torso is the U-Net's encoder, its down path and middle block
(`unet.encode`, the same code and parameter names); the head (`model.classifier.pool`):
  attention   GroupNorm, SiLU, then one query (the mean token) attends over the H*W tokens plus
              itself with a learned position embedding (CLIP's attention pooling); `c_proj` maps
              its output to the logits. guided-diffusion's published classifiers use it.
  adaptive    GroupNorm, SiLU, the spatial mean, a zero-initialised linear head.
  spatial     the spatial mean of every block's output, concatenated, then
              Linear(2048) -> ReLU -> Linear; spatial_v2 has GroupNorm + SiLU instead of ReLU.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn import unet
from diffusion_jax.nn.layers import Backbone, GroupNorm32, backbone_fields, conditioning

POOLS = ('attention', 'adaptive', 'spatial', 'spatial_v2')
SPATIAL_WIDTH = 2048  # Hidden width of the spatial heads (guided-diffusion's).


class AttentionPool(nn.Module):
  """[B, H, W, C] -> [B, out_features]: the mean token attends over [mean, pixels] + a learned
  position embedding ([H*W + 1, C]); heads of `head_channels`; then the `c_proj` linear map."""
  head_channels: int
  out_features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.head_channels:
      raise ValueError(f'attention pooling: {c} channels are not divisible by '
                       f'model.classifier.num_head_channels={self.head_channels}.')
    heads = c // self.head_channels
    tokens = x.reshape(b, h * w, c).astype(jnp.float32)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    position = self.param('positional_embedding', nn.initializers.normal(c ** -0.5),
                          (h * w + 1, c), self.param_dtype)
    tokens = (tokens + position.astype(jnp.float32)).astype(self.dtype)
    dense = lambda name: nn.DenseGeneral((heads, self.head_channels), dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    # Only the first token's output is read, so only its query is computed.
    q = dense('query')(tokens[:, :1])
    out = jax.nn.dot_product_attention(q, dense('key')(tokens), dense('value')(tokens))
    out = out.reshape(b, c)
    return nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='c_proj')(out)


class NoisyClassifier(Backbone):
  """The classifier; its own fields mirror `config.model.classifier`, the shared ones
  (`Backbone`) those of `config.model` (num_classes = the number of logits)."""
  ch: int = 128
  ch_mult: Sequence[float] = (1, 2, 3, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (32, 16, 8)
  num_heads: int = 1
  num_head_channels: int = 64
  dropout: float = 0.0
  resblock_updown: bool = True
  use_scale_shift_norm: bool = True
  num_groups: int = 32
  norm_eps: float = 1e-5
  downsample_padding: int = 1
  pool: str = 'attention'
  conv_backend: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Logits [B, num_classes] (float32) of x [B,H,W,C] at noise level t [B]; y is ignored."""
    del y
    temb = conditioning(self, t, None, freq_dim=self.ch, width=4 * self.ch,
                        dense_names=('temb_dense0', 'temb_dense1'), class_embedding=False)
    h, outputs = unet.encode(self, x, temb, train, in_channels=int(self.ch_mult[0] * self.ch))

    dense = lambda features, name, **kw: nn.Dense(features, dtype=self.dtype,
                                                 param_dtype=self.param_dtype, name=name, **kw)
    if self.pool.startswith('spatial'):
      means = [o.astype(jnp.float32).mean(axis=(1, 2)) for o in outputs + [h]]
      h = dense(SPATIAL_WIDTH, 'spatial_0')(jnp.concatenate(means, axis=-1).astype(self.dtype))
      if self.pool == 'spatial':
        h = nn.relu(h)
      else:
        h = nn.silu(GroupNorm32(self.num_groups, self.dtype, self.param_dtype, self.norm_eps,
                                name='spatial_norm')(h))
      return dense(self.num_classes, 'spatial_1')(h).astype(jnp.float32)
    h = nn.silu(GroupNorm32(self.num_groups, self.dtype, self.param_dtype, self.norm_eps,
                            name='norm_out')(h))
    if self.pool == 'attention':
      out = AttentionPool(self.num_head_channels, self.num_classes, self.dtype,
                          self.param_dtype, name='pool')(h)
    else:  # adaptive
      out = dense(self.num_classes, 'head', kernel_init=nn.initializers.zeros)(
          h.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype))
    return out.astype(jnp.float32)


def check_config(model_config, resolution: int) -> List[str]:
  """Problems with `config.model.classifier` (and the config.model fields a classifier reads)
  for images of `resolution` (empty list = fine)."""
  errors: List[str] = []
  c = model_config.classifier
  if c.pool not in POOLS:
    errors.append(f'model.classifier.pool={c.pool!r} is unknown; use one of {POOLS}.')
  if model_config.num_classes < 2:
    errors.append(f'model.num_classes={model_config.num_classes} is the classifier\'s number of '
                  'classes and must be >= 2.')
  if model_config.learn_sigma:
    errors.append('model.learn_sigma=True has no meaning for a classifier (model.arch='
                  "'classifier'); set it False.")
  levels = len(c.ch_mult)
  if levels < 1:
    errors.append('model.classifier.ch_mult must have at least one level, e.g. (1, 2, 3, 4).')
  elif resolution % 2**(levels - 1):
    errors.append(f'data.resolution={resolution} cannot be halved {levels - 1} times as '
                  f'model.classifier.ch_mult={tuple(c.ch_mult)} needs; use fewer levels.')
  else:
    sizes = [resolution // 2**i for i in range(levels)]
    unused = [r for r in c.attn_resolutions if r not in sizes]
    if unused:
      errors.append(f'model.classifier.attn_resolutions={tuple(c.attn_resolutions)} has '
                    f'{unused}, which no level reaches; the feature map sizes are {sizes}.')
  widths = sorted({int(m * c.ch) for m in c.ch_mult})
  bad_groups = [w for w in widths if w % c.num_groups]
  if bad_groups:
    errors.append(f'model.classifier channel counts {bad_groups} (ch * ch_mult) are not '
                  f'divisible by model.classifier.num_groups={c.num_groups}.')
  heads_needed = c.pool == 'attention' or c.attn_resolutions
  if c.num_head_channels > 0:
    bad = [w for w in widths if w % c.num_head_channels]
    if bad and heads_needed:
      errors.append(f'model.classifier.num_head_channels={c.num_head_channels} does not divide '
                    f'the channel counts {bad}.')
  elif c.pool == 'attention':
    errors.append("model.classifier.pool='attention' needs model.classifier.num_head_channels "
                  '> 0 (64 in guided-diffusion).')
  elif c.num_heads < 1:
    errors.append('model.classifier.num_heads must be >= 1 (or set num_head_channels > 0).')
  if not 0.0 <= c.dropout < 1.0:
    errors.append(f'model.classifier.dropout={c.dropout} must be in [0, 1).')
  if c.downsample_padding not in (0, 1):
    errors.append(f'model.classifier.downsample_padding={c.downsample_padding} must be 0 or 1.')
  if not c.norm_eps > 0:
    errors.append(f'model.classifier.norm_eps={c.norm_eps} must be > 0.')
  if not model_config.freq_shift < c.ch // 2:
    errors.append(f'model.freq_shift={model_config.freq_shift} must be < model.classifier.ch / '
                  f'2 = {c.ch // 2}.')
  return errors


def create(model_config, channels: int) -> NoisyClassifier:
  """The classifier of `config.model` (model.arch = 'classifier', fields model.classifier) for
  images with `channels` channels."""
  c = model_config.classifier
  return NoisyClassifier(
      ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
      attn_resolutions=tuple(c.attn_resolutions), num_heads=c.num_heads,
      num_head_channels=c.num_head_channels, dropout=c.dropout,
      resblock_updown=c.resblock_updown, use_scale_shift_norm=c.use_scale_shift_norm,
      num_groups=c.num_groups, norm_eps=c.norm_eps, downsample_padding=c.downsample_padding,
      pool=c.pool, conv_backend=model_config.conv_backend,
      **backbone_fields(model_config, channels))
