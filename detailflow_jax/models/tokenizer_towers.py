"""The tokenizer's two SigLIP2 towers: the latent-query encoder and the mask-token decoder.

They mirror the official SiglipEncoder / SiglipDecoder (param names included) and know nothing of
quantisation; `tokenizer.py` wires them to the quantiser.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from detailflow_jax import detail
from detailflow_jax.models import vit

# SigLIP2-so400m's patch size: the official encoder keeps Hugging Face's patch Linear (and its
# init) at this size and swaps in a fresh PyTorch Linear at any other.
SIGLIP2_PATCH_SIZE = 16
# Learned token tables (1, tokens, width): the width is FSDP-sharded like every embedding.
LATENT_AXES = (None, "latents", "embed")


def _static_int(x):
  """x as a Python int if it is a static (non-traced) integer, else None."""
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return int(x)
  return None


def _trunc_normal_002(key, shape, dtype=jnp.float32):
  # timm trunc_normal_(std=.02) truncates at +-2 absolute, i.e. +-100 std: a plain normal.
  return nn.initializers.normal(0.02)(key, shape, dtype)


class LatentEncoder(nn.Module):
  """Patch tokens + M learned latent queries through a SigLIP2 tower with the group-causal mask
  (`latent_mask`: detail.encoder_attention_mask; "bidirectional" is the study's ablation).

  __call__(images NHWC, num_latents=None, latent_inputs=None) -> (patch_hidden (B, P, D),
  latent_hidden (B, M, D)), both after post_layernorm. `latent_inputs` (B, M, D) replaces the
  learned `latent_tokens` (the self-correction pass); the latent position embedding is added to
  either.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  pos_grid: int
  num_latents: int
  group_size: int
  causal_num: int
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  precision: Any = None
  latent_mask: str = "group_causal"

  def setup(self):
    self.embeddings = vit.SiglipPatchEmbeddings(
        self.width, self.patch_size, self.pos_grid, self.dtype, self.precision,
        torch_default_init=self.patch_size != SIGLIP2_PATCH_SIZE)
    self.transformer = vit.SiglipTransformer(self.width, self.depth, self.num_heads, self.mlp_dim,
                                             self.layer_norm_eps, self.dtype, self.precision)
    shape = (1, self.num_latents, self.width)
    self.latent_tokens = self.param("latent_tokens", vit.logical(nn.initializers.normal(0.02),
                                                                 LATENT_AXES), shape)
    self.refined_tokens = self.param("refined_tokens", vit.logical(nn.initializers.normal(0.02),
                                                                   LATENT_AXES), shape)
    self.latent_pos_embed = self.param("latent_pos_embed",
                                       vit.logical(_trunc_normal_002, LATENT_AXES), shape)

  def check_num_latents(self, num_latents):
    m = self.num_latents if num_latents is None else _static_int(num_latents)
    if m is None or not self.causal_num <= m <= self.num_latents or m % self.group_size:
      raise ValueError(
          f"num_latents={num_latents!r} must be a static int in [causal_num={self.causal_num}, "
          f"num_tokens={self.num_latents}] and a multiple of group_size={self.group_size}")
    return m

  def __call__(self, images, num_latents: Optional[int] = None, latent_inputs=None):
    m = self.check_num_latents(num_latents)
    tokens, _ = self.embeddings(images)
    batch, num_patches = tokens.shape[:2]
    if latent_inputs is None:
      latents = jnp.broadcast_to(self.latent_tokens[:, :m], (batch, m, self.width))
    else:
      if latent_inputs.shape != (batch, m, self.width):
        raise ValueError(f"latent_inputs must be {(batch, m, self.width)}, got {latent_inputs.shape}")
      latents = latent_inputs
    latents = latents + self.latent_pos_embed[:, :m]
    x = jnp.concatenate([tokens, latents.astype(tokens.dtype)], axis=1)
    mask = detail.encoder_attention_mask(num_patches, m, self.group_size, self.causal_num,
                                         self.latent_mask)
    out = self.transformer(x, mask)
    return out[:, :num_patches], out[:, num_patches:]


class LatentDecoder(nn.Module):
  """Mask tokens on an (S/p)^2 grid + the first n latents, bidirectional SigLIP2 tower, to pixels.

  __call__(latents (B, n, D) (already post_quant_conv'ed), output_size, num_valid=None) -> NHWC
  (B, S, S, 3), not clamped. `num_valid` (traced int32 scalar): only latents < num_valid may be
  attended to, the masked equivalent of passing latents[:, :num_valid].
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  pos_grid: int
  num_latents: int
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    self.position_embedding = vit.PositionTable(self.pos_grid, self.width)
    self.transformer = vit.SiglipTransformer(self.width, self.depth, self.num_heads, self.mlp_dim,
                                             self.layer_norm_eps, self.dtype, self.precision)
    self.mask_token = self.param("mask_token", vit.logical(nn.initializers.normal(0.02),
                                                           LATENT_AXES), (1, 1, self.width))
    self.latent_pos_embed = self.param("latent_pos_embed",
                                       vit.logical(_trunc_normal_002, LATENT_AXES),
                                       (1, self.num_latents, self.width))
    out_dim = self.patch_size * self.patch_size * 3
    self.to_pixel = nn.Dense(
        out_dim, dtype=self.dtype, precision=self.precision,
        kernel_init=vit.logical(vit.torch_linear_kernel_init, ("embed", "patch")),
        bias_init=vit.logical(vit.torch_linear_bias_init(self.width), ("patch",)))

  def __call__(self, latents, output_size: int, num_valid=None):
    size = _static_int(output_size)
    if size is None or size < self.patch_size or size % self.patch_size:
      raise ValueError(f"output_size={output_size!r} must be a static positive multiple of the "
                       f"decoder patch size {self.patch_size}")
    batch, n, _ = latents.shape
    if not 1 <= n <= self.num_latents:
      raise ValueError(f"decoder got {n} latents, it takes 1..{self.num_latents}")
    grid = size // self.patch_size
    pos = self.position_embedding(grid, grid)
    patches = jnp.broadcast_to(self.mask_token + pos[None], (batch, grid * grid, self.width))
    latents = latents + self.latent_pos_embed[:, :n]
    x = jnp.concatenate([patches.astype(self.dtype), latents.astype(self.dtype)], axis=1)
    mask = None
    if num_valid is not None:
      # Keys of latents at or after num_valid are blocked for every query. The patch outputs then
      # equal those of the sliced sequence; rows of blocked latents are computed but unused.
      keys = jnp.arange(x.shape[1]) < grid * grid + jnp.asarray(num_valid, jnp.int32)
      mask = jnp.broadcast_to(keys[None, :], (x.shape[1], x.shape[1]))
    out = self.transformer(x, mask)
    pixels = self.to_pixel(out[:, :grid * grid])
    return vit.unpatchify(pixels, grid, grid, self.patch_size)
