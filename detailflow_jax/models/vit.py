"""SigLIP2-style ViT building blocks shared by the tokenizer towers and the SigLIP2 feature model.

Submodule names mirror the Hugging Face / official PyTorch names (`layers_{i}/self_attn/q_proj`,
`layer_norm1`, `mlp/fc1`, `post_layernorm`, `patch_embedding`, `position_embedding`) so that
mapping an official state dict onto our param tree is a mechanical rename plus a transpose of the
Linear weights.

Images are NHWC. Boolean masks use True = may attend.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.models import linear
from detailflow_jax.models.partitioning import BLE, BLF, BLHD, constrain

Dtype = Any
Precision = Any


# PyTorch's nn.Linear default init: U(+-1/sqrt(fan_in)) for weight and bias. Used for the
# official modules that are plain nn.Linear (not re-initialised by Hugging Face's _init_weights).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def logical(init, names):
  """An initialiser that declares the logical axes of its param (train/sharding.py maps them)."""
  return nn.with_logical_partitioning(init, names)


def _check_positive(name, value):
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resize_position_table(table, grid_h, grid_w):
  """Resizes a square learned 2D position table to a (grid_h, grid_w) patch grid.

  Args:
    table: (G*G, D) array, row-major view of a (G, G, D) grid.
    grid_h, grid_w: static ints, the target patch grid.

  Returns:
    (grid_h*grid_w, D), row-major. Bilinear with half-pixel centres (align_corners=False); when
    shrinking, the triangle filter is widened by the scale factor (antialiasing), as PyTorch's
    `F.interpolate(mode='bilinear', antialias=True)` which SigLIP2-NaFlex uses. Same size is the
    identity.
  """
  _check_positive("grid_h", grid_h)
  _check_positive("grid_w", grid_w)
  table = jnp.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"table must be (G*G, D), got shape {table.shape}")
  side = int(round(np.sqrt(table.shape[0])))
  if side * side != table.shape[0]:
    raise ValueError(f"table has {table.shape[0]} rows, which is not a square grid G*G")
  grid = table.reshape(side, side, table.shape[1])
  if (grid_h, grid_w) != (side, side):
    # jax.image.resize's triangle kernel renormalises the weights that fall inside the image,
    # which is what PyTorch's antialiased path does too (and, when enlarging, equals clamping
    # the source coordinate at the border). Interpolate in float32 like the reference.
    grid = jax.image.resize(grid.astype(jnp.float32), (grid_h, grid_w, grid.shape[-1]),
                            method="linear", antialias=True).astype(table.dtype)
  return grid.reshape(grid_h * grid_w, table.shape[1])


def patchify(images, patch_size):
  """NHWC images -> (B, (H/p)*(W/p), p*p*C) patch vectors.

  Patches are in row-major order; inside a patch the vector is ordered (row-in-patch,
  column-in-patch, channel), channel fastest, as the official `convert_image_to_patches`.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4 dims), got shape {images.shape}")
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {h}x{w} must be a multiple of patch_size={patch_size}")
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches, grid_h, grid_w, patch_size, channels=3):
  """Inverse of `patchify`: (B, grid_h*grid_w, p*p*C) -> NHWC (B, grid_h*p, grid_w*p, C)."""
  b, n, d = patches.shape
  if n != grid_h * grid_w or d != patch_size * patch_size * channels:
    raise ValueError(f"patches of shape {patches.shape} do not fit a {grid_h}x{grid_w} grid of "
                     f"{patch_size}x{patch_size}x{channels} patches")
  x = patches.reshape(b, grid_h, grid_w, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * patch_size, grid_w * patch_size, channels)


class PositionTable(nn.Module):
  """A learned (G*G, D) 2D position table, resized to the patch grid it is asked for.

  The param is called `embedding` like nn.Embed's (official: `position_embedding.weight`).
  """
  grid: int
  width: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid_h, grid_w):
    table = self.param("embedding", logical(nn.initializers.normal(stddev=1.0 / np.sqrt(self.width)),
                                            ("position", "embed")),
                       (self.grid * self.grid, self.width), self.param_dtype)
    return resize_position_table(table, grid_h, grid_w)


class SiglipPatchEmbeddings(nn.Module):
  """Linear patch embedding plus the resized learned 2D position table.

  Returns ((B, P, width) tokens, (grid_h, grid_w)).
  """
  width: int
  patch_size: int
  pos_grid: int
  dtype: Dtype = jnp.float32
  precision: Precision = None
  # Hugging Face re-initialises its own patch Linear (lecun normal, zero bias); the tokenizer
  # replaces it by a fresh PyTorch Linear when its patch size differs from SigLIP2's 16.
  torch_default_init: bool = False

  @nn.compact
  def __call__(self, images):
    patches = patchify(images, self.patch_size)
    grid_h = images.shape[1] // self.patch_size
    grid_w = images.shape[2] // self.patch_size
    if self.torch_default_init:
      inits = dict(kernel_init=torch_linear_kernel_init,
                   bias_init=torch_linear_bias_init(patches.shape[-1]))
    else:
      inits = dict(kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros)
    inits = dict(kernel_init=logical(inits["kernel_init"], ("patch", "embed")),
                 bias_init=logical(inits["bias_init"], ("bias",)))
    tokens = nn.Dense(self.width, dtype=self.dtype, precision=self.precision,
                      name="patch_embedding", **inits)(patches)
    pos = PositionTable(self.pos_grid, self.width, name="position_embedding")(grid_h, grid_w)
    return tokens + pos.astype(tokens.dtype)[None], (grid_h, grid_w)


def _as_4d_mask(mask):
  """(Lq, Lk) or (B, Lq, Lk) or (B, H, Lq, Lk) bool -> broadcastable to (B, H, Lq, Lk)."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
  if mask.ndim == 2:
    return mask[None, None]
  if mask.ndim == 3:
    return mask[:, None]
  if mask.ndim == 4:
    return mask
  raise ValueError(f"mask must have 2, 3 or 4 dims (…, Lq, Lk), got shape {mask.shape}")


class SiglipAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections; softmax in float32."""
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x, mask=None):
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
    head_dim = self.width // self.num_heads
    # Megatron: q/k/v column-parallel (output = heads, head-major), out_proj row-parallel.
    dense = lambda name, names, bias: nn.Dense(
        self.width, dtype=self.dtype, precision=self.precision, name=name,
        dot_general=linear.dense_dot_general,
        kernel_init=logical(nn.initializers.xavier_uniform(), names),
        bias_init=logical(nn.initializers.zeros, (bias,)))
    b, l, _ = x.shape
    split = lambda t: constrain(t.reshape(b, l, self.num_heads, head_dim), BLHD)
    q = split(dense("q_proj", ("embed", "heads"), "heads")(x))
    k = split(dense("k_proj", ("embed", "heads"), "heads")(x))
    v = split(dense("v_proj", ("embed", "heads"), "heads")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    scores = scores.astype(jnp.float32) * (head_dim ** -0.5)
    if mask is not None:
      # The reference adds float32-min to blocked scores; every row keeps at least one key, so
      # this gives the same softmax.
      scores = jnp.where(_as_4d_mask(mask), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = constrain(jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision), BLHD)
    return constrain(dense("out_proj", ("heads", "embed"), "bias")(out.reshape(b, l, self.width)),
                     BLE)


class SiglipMLP(nn.Module):
  width: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, precision=self.precision,
                 dot_general=linear.dense_dot_general,
                 kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=logical(nn.initializers.normal(1e-6), ("mlp",)), name="fc1")(x)
    x = constrain(jax.nn.gelu(constrain(x, BLF), approximate=True), BLF)  # gelu_pytorch_tanh
    return constrain(nn.Dense(self.width, dtype=self.dtype, precision=self.precision,
                              dot_general=linear.dense_dot_general,
                              kernel_init=logical(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                              bias_init=logical(nn.initializers.normal(1e-6), ("bias",)),
                              name="fc2")(x), BLE)


def _layer_norm(eps, dtype, name):
  # Two-pass variance like PyTorch (flax's default fast variance E[x^2]-E[x]^2 loses digits).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name,
                      scale_init=logical(nn.initializers.ones, ("norm",)),
                      bias_init=logical(nn.initializers.zeros, ("norm",)))


class SiglipEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(x))."""
  width: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x, mask=None):
    x = constrain(x, BLE)
    y = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = constrain(x + SiglipAttention(self.width, self.num_heads, self.dtype, self.precision,
                                      name="self_attn")(y, mask), BLE)
    y = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
    return constrain(
        x + SiglipMLP(self.width, self.mlp_dim, self.dtype, self.precision, name="mlp")(y), BLE)


class SiglipTransformer(nn.Module):
  """`depth` SigLIP2 encoder layers then `post_layernorm` on every token.

  __call__(x (B, L, width), mask=None) where mask is boolean (Lq, Lk), (B, Lq, Lk) or
  (B, H, Lq, Lk), True = may attend; None = full bidirectional attention.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x, mask=None):
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"x must be (B, L, {self.width}), got shape {x.shape}")
    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = SiglipEncoderLayer(self.width, self.num_heads, self.mlp_dim, self.layer_norm_eps,
                             self.dtype, self.precision, name=f"layers_{i}")(x, mask)
    return _layer_norm(self.layer_norm_eps, self.dtype, "post_layernorm")(x)
