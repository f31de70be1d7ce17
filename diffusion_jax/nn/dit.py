"""DiT: the Diffusion Transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers"), Flax linen, NHWC, with the U-Net's call signature.

`DiT(...)(x [B,H,W,C], t [B], y [B] | None, train=bool)` returns [B,H,W,C_out], C_out = C (2C with
`learn_sigma`), so it drops in wherever `models.UNet` is used (`model.arch = 'dit'`).

  x --patchify (p x p)--> tokens [B, N = HW/p^2, p^2 C] --Dense--> [B, N, D] + position embedding
  c = MLP(sinusoid(t)) + class_embed(y)                        (the conditioning vector, [B, D])
  N_blocks x adaLN-Zero block:
      (shift1, scale1, gate1, shift2, scale2, gate2) = Dense_6D(SiLU(c))  (zero-initialised)
      h = h + gate1 * Attention(LN(h) * (1 + scale1) + shift1)
      h = h + gate2 * MLP(LN(h) * (1 + scale2) + shift2)
  final: Dense_{p^2 C_out}(LN(h) * (1 + scale) + shift)   (modulation and linear zero-initialised)
  --unpatchify--> [B, H, W, C_out]

LayerNorms have no affine parameters (adaLN supplies scale and shift). Because every gate and the
final projection start at zero, a freshly initialised DiT outputs exactly zero and every block is
the identity: the paper's adaLN-Zero initialisation. Linear layers are computed in `dtype` (e.g.
bfloat16); the residual stream, the LayerNorm statistics, the modulation and the attention softmax
are float32, and the output is float32.

Parameter counts (trainable, 32x32x4 latents, 1000 classes + the null row, learn_sigma): see
`DIT_SIZES` and tests/test_dit.py; the reference implementation also stores the fixed sin-cos
table (N x D values) as a frozen parameter, which its logged counts include.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.nn.layers import Backbone, backbone_fields, conditioning

Dtype = Any

# The paper's model sizes (Table 1): hidden size D, depth (blocks), attention heads; MLP ratio 4
# for all. A model is named size/patch, e.g. DiT-XL/2 = DIT_SIZES['XL'] with patch size 2.
DIT_SIZES: Dict[str, Dict[str, int]] = {
    'S': dict(hidden_size=384, depth=12, num_heads=6),
    'B': dict(hidden_size=768, depth=12, num_heads=12),
    'L': dict(hidden_size=1024, depth=24, num_heads=16),
    'XL': dict(hidden_size=1152, depth=28, num_heads=16),
}
DIT_PATCH_SIZES = (2, 4, 8)
POS_EMBEDDINGS = ('sincos', 'learned')
# Sinusoidal features of t fed to the timestep MLP (the paper's 256).
TIME_FREQ_DIM = 256


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] tokens in row-major patch order.

  Token i*(W/p) + j holds the patch x[:, i*p:(i+1)*p, j*p:(j+1)*p, :] flattened as (row, col, c).
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
  b, n, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, h // p, w // p, p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, p, W/p, p, C]
  return x.reshape(b, h, w, c)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[len(positions), dim]: [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim/2)), k < dim/2."""
  omega = 1.0 / 10000.0**(np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.asarray(positions, np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """The fixed 2-D position embedding [grid_h * grid_w, dim] (float32), token order of `patchify`.

  Token (i, j) (row i, column j) gets [sincos_1d(dim/2, j), sincos_1d(dim/2, i)]: the first half
  of the channels encodes the column, the second half the row (the layout of the MAE / DiT
  reference tables). `dim` must be divisible by 4.
  """
  if dim % 4:
    raise ValueError(f'the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}.')
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  emb = np.concatenate([sincos_1d(dim // 2, cols.reshape(-1)),
                        sincos_1d(dim // 2, rows.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def _dense(features: int, module: nn.Module, name: str, zero: bool = False,
           std: Optional[float] = None) -> nn.Dense:
  """A Dense in the module's dtypes: xavier-uniform (the paper's ViT init), zeros, or N(0, std)."""
  if zero:
    init = nn.initializers.zeros
  elif std is not None:
    init = nn.initializers.normal(std)
  else:
    init = nn.initializers.xavier_uniform()
  return nn.Dense(features, dtype=module.dtype, param_dtype=module.param_dtype,
                  kernel_init=init, bias_init=nn.initializers.zeros, name=name)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters over the last axis, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x [B,N,D] * (1 + scale[:, None]) + shift[:, None] (float32)."""
  return x * (1.0 + scale[:, None, :].astype(jnp.float32)) + shift[:, None, :].astype(jnp.float32)


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block: gated self-attention and MLP, modulated by c."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, train: bool) -> jax.Array:
    """x [B, N, D] float32 (the residual stream), c [B, D] -> [B, N, D] float32."""
    d, heads = self.hidden_size, self.num_heads
    b, n, _ = x.shape
    mod = _dense(6 * d, self, 'adaLN_modulation', zero=True)(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod.astype(jnp.float32), 6, axis=-1)

    h = _modulate(_layer_norm(x, self.norm_eps), shift1, scale1).astype(self.dtype)
    qkv = _dense(3 * d, self, 'qkv')(h).reshape(b, n, 3, heads, d // heads)
    h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # fp32 softmax.
    h = _dense(d, self, 'attn_out')(h.reshape(b, n, d))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    x = x + gate1[:, None, :] * h.astype(jnp.float32)

    h = _modulate(_layer_norm(x, self.norm_eps), shift2, scale2).astype(self.dtype)
    h = _dense(int(d * self.mlp_ratio), self, 'mlp_in')(h)
    h = nn.gelu(h, approximate=True)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _dense(d, self, 'mlp_out')(h)
    return x + gate2[:, None, :] * h.astype(jnp.float32)


class DiT(Backbone):
  """The Diffusion Transformer; its own fields mirror `config.model.dit` (config/defaults.py),
  the shared ones (`Backbone`) those of `config.model`."""
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  patch_size: int = 2
  pos_embed: str = 'sincos'
  dropout: float = 0.0
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """x [B,H,W,C] at noise level t [B] (int or float); y [B] class ids (num_classes = null, with
    model.null_class; None = the null class). Returns [B,H,W,C_out] float32."""
    b, height, width, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    if height % p or width % p:
      raise ValueError(f'image size {height}x{width} is not divisible by model.dit.patch_size={p}.')
    gh, gw = height // p, width // p

    # Patch embedding: a linear map of each flattened p x p patch (= a p x p conv of stride p).
    h = _dense(d, self, 'patch_embed')(patchify(x.astype(self.dtype), p)).astype(jnp.float32)
    if self.pos_embed == 'sincos':
      h = h + jnp.asarray(sincos_2d(d, gh, gw))[None]
    elif self.pos_embed == 'learned':
      h = h + self.param('pos_embed', nn.initializers.normal(0.02), (1, gh * gw, d),
                         self.param_dtype).astype(jnp.float32)
    else:
      raise ValueError(f'model.dit.pos_embed={self.pos_embed!r} is unknown; use {POS_EMBEDDINGS}.')

    # Conditioning c = MLP(sinusoid(t * timestep_scale)) + class embedding (N(0, 0.02) inits).
    c = conditioning(self, t, y, freq_dim=TIME_FREQ_DIM, width=d,
                     dense_names=('t_embed_0', 't_embed_1'),
                     kernel_init=nn.initializers.normal(0.02),
                     embed_init=nn.initializers.normal(0.02))

    block_cls = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block_cls(d, self.num_heads, self.mlp_ratio, self.dropout, self.norm_eps, self.dtype,
                    self.param_dtype, name=f'block_{i}')(h, c, train)

    out_ch = self.out_channels * (2 if self.learn_sigma else 1)
    shift, scale = jnp.split(
        _dense(2 * d, self, 'final_modulation', zero=True)(nn.silu(c)).astype(jnp.float32), 2,
        axis=-1)
    h = _modulate(_layer_norm(h, self.norm_eps), shift, scale).astype(self.dtype)
    h = _dense(p * p * out_ch, self, 'final_linear', zero=True)(h)
    return unpatchify(h.astype(jnp.float32), p, height, width)


def create(model_config, channels: int) -> DiT:
  """The DiT of `config.model` (model.arch = 'dit', fields model.dit) for images with
  `channels` channels."""
  d = model_config.dit
  return DiT(
      hidden_size=d.hidden_size, depth=d.depth, num_heads=d.num_heads,
      mlp_ratio=float(d.mlp_ratio), patch_size=d.patch_size, pos_embed=d.pos_embed,
      dropout=d.dropout, norm_eps=d.norm_eps, **backbone_fields(model_config, channels))


def check_config(model_config, resolution: int) -> List[str]:
  """Problems with `config.model.dit` for images of `resolution` (empty = fine); each names the
  field and the fix."""
  errors = []
  d = model_config.dit
  p = d.patch_size
  if p < 1:
    errors.append(f'model.dit.patch_size={p} must be >= 1 (2, 4 or 8 in the paper).')
  elif resolution % p:
    ok = [q for q in (1, 2, 4, 8, 16, 32) if resolution % q == 0]
    errors.append(f'data.resolution={resolution} is not divisible by model.dit.patch_size={p}; '
                  f'use a patch size dividing it, e.g. one of {ok}.')
  if d.hidden_size < 1 or d.num_heads < 1:
    errors.append(f'model.dit.hidden_size={d.hidden_size} and model.dit.num_heads='
                  f'{d.num_heads} must be >= 1.')
  elif d.hidden_size % d.num_heads:
    errors.append(f'model.dit.hidden_size={d.hidden_size} is not divisible by '
                  f'model.dit.num_heads={d.num_heads}; use a head count that divides it '
                  f'(e.g. DiT-S: 384 / 6 heads).')
  if d.pos_embed not in POS_EMBEDDINGS:
    errors.append(f'model.dit.pos_embed={d.pos_embed!r} is unknown; use one of '
                  f'{POS_EMBEDDINGS}.')
  elif d.pos_embed == 'sincos' and d.hidden_size % 4:
    errors.append(f"model.dit.pos_embed='sincos' needs model.dit.hidden_size divisible by 4 "
                  f"(got {d.hidden_size}); change it or use 'learned'.")
  if d.depth < 1:
    errors.append(f'model.dit.depth={d.depth} must be >= 1 (transformer blocks).')
  if not d.mlp_ratio > 0:
    errors.append(f'model.dit.mlp_ratio={d.mlp_ratio} must be > 0 (4 in the paper).')
  elif int(d.hidden_size * d.mlp_ratio) < 1:
    errors.append(f'model.dit.hidden_size * model.dit.mlp_ratio = '
                  f'{d.hidden_size * d.mlp_ratio} gives an empty MLP.')
  if not 0.0 <= d.dropout < 1.0:
    errors.append(f'model.dit.dropout={d.dropout} must be in [0, 1).')
  if not d.norm_eps > 0:
    errors.append(f'model.dit.norm_eps={d.norm_eps} must be > 0 (1e-6 in the paper).')
  if not model_config.freq_shift < TIME_FREQ_DIM // 2:
    errors.append(f'model.freq_shift={model_config.freq_shift} must be < {TIME_FREQ_DIM // 2} '
                  '(half the DiT timestep frequencies).')
  if model_config.conv_backend != 'xla':
    errors.append(f'model.conv_backend={model_config.conv_backend} applies to the U-Net only '
                  f"(model.arch='dit'); use xla.")
  return errors


def num_tokens(resolution: int, patch_size: int) -> int:
  """Tokens of a square image: (resolution / patch)^2."""
  return (resolution // patch_size)**2


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
