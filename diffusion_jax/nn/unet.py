"""The network: a U-Net (Flax linen, NHWC) of the DDPM / improved-DDPM / ADM family.

`UNet(...)(x [B,H,W,C], t [B], y [B] | None, train=bool)` returns [B,H,W,C] (or [B,H,W,2C] with
`learn_sigma`). With the `cifar10_ddpm` config it is layer for layer the network of Ho et al. 2020
(35,746,307 parameters, like diffusers' `google/ddpm-cifar10-32`). GroupNorm, softmax and the output
are computed in float32 whatever `dtype` the convolutions use.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn.layers import Backbone, GroupNorm32, backbone_fields, conditioning

Dtype = Any
# model.conv_backend: XLA's convolutions, oneDNN's (CPU), or oneDNN's with Winograd's algorithm
# for the large 3x3 ones (CPU; diffusion_jax/contrib/onednn).
CONV_BACKENDS = ('xla', 'onednn', 'onednn_winograd')
ONEDNN_BACKENDS = ('onednn', 'onednn_winograd')


def _conv(features: int, module: nn.Module, kernel: int = 3, stride: int = 1,
          zero_init: bool = False, name: Optional[str] = None, padding: Any = 'SAME') -> nn.Conv:
  """A conv of `module`'s dtypes, computed by XLA or (`conv_backend='onednn[_winograd]'`, CPU)
  oneDNN."""
  conv_fn = None
  if module.conv_backend in ONEDNN_BACKENDS:
    from diffusion_jax.contrib.onednn import conv as onednn_conv  # pylint: disable=g-import-not-at-top
    conv_fn = functools.partial(onednn_conv.conv_general_dilated,
                                winograd=module.conv_backend == 'onednn_winograd')
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=module.dtype, param_dtype=module.param_dtype, name=name,
                 kernel_init=nn.initializers.zeros if zero_init else nn.initializers.lecun_normal(),
                 conv_general_dilated=conv_fn)


def _resample(x: jax.Array, mode: Optional[str]) -> jax.Array:
  """Nearest-neighbour 2x upsampling or 2x2 average-pool downsampling (no parameters)."""
  if mode == 'up':
    # Each pixel repeated into a 2x2 block by a broadcast, which equals jax.image.resize's
    # 'nearest' exactly but whose gradient is a sum over the block, not resize's scatter-add.
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
        b, 2 * h, 2 * w, c)
  if mode == 'down':
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  return x


class ResBlock(nn.Module):
  """GN -> SiLU -> conv -> (+temb or AdaGN) -> GN -> SiLU -> dropout -> conv, plus a skip path.

  `resample` ('up' | 'down' | None) makes it a BigGAN-style up/downsampling block.
  """
  out_ch: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resample: Optional[str] = None
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  conv_backend: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: GroupNorm32(self.num_groups, self.dtype, self.param_dtype, self.norm_eps,
                                    name=name)
    h = nn.silu(norm('norm1')(x))
    h = _resample(h, self.resample)
    x = _resample(x, self.resample)
    h = _conv(self.out_ch, self, name='conv1')(h)
    emb_out = nn.Dense(2 * self.out_ch if self.use_scale_shift_norm else self.out_ch,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name='temb_proj')(nn.silu(temb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = norm('norm2')(h) * (1 + scale) + shift
    else:
      h = norm('norm2')(h + emb_out)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, self, zero_init=True, name='conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, self, kernel=1, name='skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, with a residual connection."""
  num_heads: int = 1
  num_head_channels: int = -1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    heads = c // self.num_head_channels if self.num_head_channels > 0 else self.num_heads
    if c % heads:
      raise ValueError(f'attention channels {c} are not divisible by {heads} heads; '
                       'change model.unet.num_heads / model.unet.num_head_channels.')
    h = GroupNorm32(self.num_groups, self.dtype, self.param_dtype, self.norm_eps, name='norm')(x)
    h = h.reshape(b, height * width, c)
    dense = lambda name: nn.DenseGeneral((heads, c // heads), dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    q, k, v = dense('query')(h), dense('key')(h), dense('value')(h)
    h = jax.nn.dot_product_attention(q, k, v)  # [B, HW, heads, c/heads]; softmax in float32.
    h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.zeros, name='proj_out')(h)
    return x + h.reshape(b, height, width, c)


def block_builders(module: nn.Module) -> Tuple[Callable[..., nn.Module],
                                               Callable[[str], nn.Module]]:
  """(res_block(out_ch, name, resample=None), attention(name)): the ResBlock and AttentionBlock
  constructors of `module`'s fields (width-independent: dropout, scale-shift, heads, GroupNorm,
  dtypes, conv backend, remat), called inside its compact `__call__`."""
  block_cls = nn.remat(ResBlock, static_argnums=(3,)) if module.remat else ResBlock
  attn_cls = nn.remat(AttentionBlock) if module.remat else AttentionBlock
  common = dict(num_groups=module.num_groups, dtype=module.dtype,
                param_dtype=module.param_dtype, norm_eps=module.norm_eps)
  res_block = lambda out_ch, name, resample=None: block_cls(
      out_ch, module.dropout, module.use_scale_shift_norm, resample, name=name,
      conv_backend=module.conv_backend, **common)
  attention = lambda name: attn_cls(module.num_heads, module.num_head_channels, name=name,
                                    **common)
  return res_block, attention


def encode(module: nn.Module, x: jax.Array, temb: jax.Array, train: bool,
           in_channels: int) -> Tuple[jax.Array, List[jax.Array]]:
  """The encoder of the ADM family, shared by the U-Net and the noisy classifier: conv_in
  (`in_channels` wide), per level num_res_blocks ResBlocks of ch * mult channels (attention at
  the sizes in attn_resolutions) and a downsampling (BigGAN ResBlock or stride-2 conv) between
  levels, then the middle block (ResBlock, attention, ResBlock).

  Returns the middle block's output and every output before it (conv_in, each block, each
  downsampling): the U-Net's skip connections. Called inside `module`'s compact `__call__`,
  whose fields (ch, ch_mult, num_res_blocks, attn_resolutions, resblock_updown,
  downsample_padding, ...) it reads; the parameter names are the U-Net's.
  """
  res_block, attention = block_builders(module)
  h = _conv(in_channels, module, name='conv_in')(x.astype(module.dtype))
  outputs = [h]
  num_levels = len(module.ch_mult)
  for level, mult in enumerate(module.ch_mult):
    for i in range(module.num_res_blocks):
      h = res_block(int(mult * module.ch), f'down_{level}_res_{i}')(h, temb, train)
      if h.shape[1] in module.attn_resolutions:
        h = attention(f'down_{level}_attn_{i}')(h)
      outputs.append(h)
    if level != num_levels - 1:
      if module.resblock_updown:
        h = res_block(h.shape[-1], f'down_{level}_downsample', 'down')(h, temb, train)
      else:
        padding = ((1, 1), (1, 1)) if module.downsample_padding else 'SAME'
        h = _conv(h.shape[-1], module, stride=2, name=f'down_{level}_downsample',
                  padding=padding)(h)
      outputs.append(h)
  h = res_block(h.shape[-1], 'mid_res_0')(h, temb, train)
  h = attention('mid_attn')(h)
  h = res_block(h.shape[-1], 'mid_res_1')(h, temb, train)
  return h, outputs


class UNet(Backbone):
  """The denoising U-Net; its own fields mirror `config.model.unet` (config/defaults.py), the
  shared ones (`Backbone`) those of `config.model`."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  num_head_channels: int = -1
  dropout: float = 0.1
  resblock_updown: bool = False
  use_scale_shift_norm: bool = False
  num_groups: int = 32
  norm_eps: float = 1e-6
  downsample_padding: int = 0
  conv_backend: str = 'xla'            # One of CONV_BACKENDS (onednn*: CPU only).

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """x [B,H,W,C] in [-1,1] at noise level t [B] (int or float); y [B] class ids (num_classes =
    null, with model.null_class). The network embeds t * timestep_scale."""
    res_block, attention = block_builders(self)
    temb = conditioning(self, t, y, freq_dim=self.ch, width=4 * self.ch,
                        dense_names=('temb_dense0', 'temb_dense1'))
    h, skips = encode(self, x, temb, train, in_channels=self.ch)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(self.ch * mult, f'up_{level}_res_{i}')(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention(f'up_{level}_attn_{i}')(h)
      if level != 0:
        if self.resblock_updown:
          h = res_block(h.shape[-1], f'up_{level}_upsample', 'up')(h, temb, train)
        else:
          h = _conv(h.shape[-1], self, name=f'up_{level}_upsample')(_resample(h, 'up'))
    assert not skips

    h = nn.silu(GroupNorm32(self.num_groups, self.dtype, self.param_dtype, self.norm_eps,
                            name='norm_out')(h))
    out_ch = self.out_channels * (2 if self.learn_sigma else 1)
    out = _conv(out_ch, self, zero_init=True, name='conv_out')(h)
    return out.astype(jnp.float32)


def check_config(model_config, resolution: int) -> List[str]:
  """Problems with `config.model.unet` for images of `resolution` (empty list = fine). Every
  level of ch_mult after the first halves the feature map."""
  errors: List[str] = []
  u = model_config.unet
  levels = len(u.ch_mult)
  if levels < 1:
    errors.append('model.unet.ch_mult must have at least one level, e.g. (1, 2, 2, 2).')
  elif resolution % 2**(levels - 1):
    errors.append(
        f'data.resolution={resolution} cannot be halved {levels - 1} times as '
        f'model.unet.ch_mult={tuple(u.ch_mult)} needs; use a resolution divisible by '
        f'{2**(levels - 1)} or fewer levels.')
  else:
    sizes = [resolution // 2**i for i in range(levels)]
    unused = [r for r in u.attn_resolutions if r not in sizes]
    if unused:
      errors.append(f'model.unet.attn_resolutions={tuple(u.attn_resolutions)} has {unused}, '
                    f'which no level reaches; the feature map sizes are {sizes}.')
  for mult in u.ch_mult:
    if (u.ch * mult) % u.num_groups:
      errors.append(f'model.unet.ch * ch_mult = {u.ch * mult} channels are not divisible by '
                    f'model.unet.num_groups={u.num_groups}.')
      break
  if u.num_head_channels > 0:
    # Only the attention levels and the middle block split channels into heads.
    attended = {u.ch * u.ch_mult[-1]} | {
        u.ch * m for i, m in enumerate(u.ch_mult)
        if resolution and resolution // 2**i in u.attn_resolutions}
    bad = sorted(c for c in attended if c % u.num_head_channels)
    if bad:
      errors.append(f'model.unet.num_head_channels={u.num_head_channels} does not divide the '
                    f'channel counts {bad} of the attention blocks.')
  elif u.num_heads < 1:
    errors.append('model.unet.num_heads must be >= 1 (or set model.unet.num_head_channels > 0).')
  if u.downsample_padding not in (0, 1):
    errors.append(f'model.unet.downsample_padding={u.downsample_padding} must be 0 (pad '
                  'bottom/right, as TF SAME) or 1 (one pixel on every side, as openai).')
  if not 0.0 <= u.dropout < 1.0:
    errors.append(f'model.unet.dropout={u.dropout} must be in [0, 1).')
  if not u.norm_eps > 0:
    errors.append(f'model.unet.norm_eps={u.norm_eps} must be > 0 (1e-6 ours, 1e-5 openai).')
  if not model_config.freq_shift < u.ch // 2:
    errors.append(f'model.freq_shift={model_config.freq_shift} must be < model.unet.ch / 2 = '
                  f'{u.ch // 2} (1 ours, 0 openai).')
  if model_config.conv_backend not in CONV_BACKENDS:
    errors.append(f'model.conv_backend={model_config.conv_backend!r} is unknown; use one of '
                  f'{CONV_BACKENDS}.')
  elif model_config.conv_backend in ONEDNN_BACKENDS:
    # The optional oneDNN extra: imported only when a config asks for it.
    from diffusion_jax.contrib.onednn import conv as onednn_conv  # pylint: disable=g-import-not-at-top
    reason = onednn_conv.unavailable_reason()
    if reason:
      errors.append(reason)
  return errors


def create(model_config, channels: int) -> UNet:
  """The U-Net of `config.model` (model.arch = 'unet', fields model.unet) for images with
  `channels` channels."""
  if model_config.conv_backend in ONEDNN_BACKENDS and jax.default_backend() != 'cpu':
    raise ValueError(f'model.conv_backend={model_config.conv_backend} runs on the CPU only, and '
                     f'JAX runs on {jax.default_backend()}; use model.conv_backend=xla.')
  u = model_config.unet
  return UNet(
      ch=u.ch, ch_mult=tuple(u.ch_mult), num_res_blocks=u.num_res_blocks,
      attn_resolutions=tuple(u.attn_resolutions), num_heads=u.num_heads,
      num_head_channels=u.num_head_channels, dropout=u.dropout,
      resblock_updown=u.resblock_updown, use_scale_shift_norm=u.use_scale_shift_norm,
      num_groups=u.num_groups, norm_eps=u.norm_eps, downsample_padding=u.downsample_padding,
      conv_backend=model_config.conv_backend, **backbone_fields(model_config, channels))
