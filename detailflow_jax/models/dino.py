"""Frozen DINO ViT-S/16 feature taps (the backbone of the reference's DINO discriminator).

The reference (VAR's discriminator) runs the self-supervised DINO ViT-S/16 (`dino_deitsmall16`)
without its final norm and reads "readout" features at the patch embedding and after blocks
2, 5, 8 and 11: every patch token plus the class token, (B, L, C). The k part of every qkv bias is
zeroed at load time (softmax ignores a constant key bias, so this changes nothing but rounding),
and the MLPs use the tanh GELU as in the reference.

Weights: a timm / torch-hub state dict (`.pth` as released by DINO, `.safetensors` or `.npz`),
key names as in timm's VisionTransformer:
  cls_token (1,1,C), pos_embed (1,1+G*G,C), patch_embed.proj.weight (C,3,P,P), .bias (C,),
  blocks.{i}.norm1.{weight,bias}, blocks.{i}.attn.qkv.{weight (3C,C), bias (3C,)},
  blocks.{i}.attn.proj.{weight,bias}, blocks.{i}.norm2.{weight,bias},
  blocks.{i}.mlp.fc1.{weight,bias}, blocks.{i}.mlp.fc2.{weight,bias}.
`norm.*` and `head.*` are ignored; a leading "module." / "backbone." is stripped.
Embedding width, depth, patch size and position grid are read from the shapes; the number of
heads is not stored in the weights (ViT-S: 6, i.e. 64 per head, the default).
"""
import re
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.models import weight_files

DEFAULT_TAP_DEPTHS = (2, 5, 8, 11)
DINO_HEAD_DIM = 64
_IGNORED_PREFIXES = ("norm.", "head.", "fc_norm.")
_STRIPPED_PREFIXES = ("module.", "backbone.")


class DinoBlock(nn.Module):
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    b, l, c = x.shape
    head_dim = c // self.num_heads
    y = nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, name="norm1")(x)
    qkv = nn.Dense(3 * c, name="attn_qkv")(y).reshape(b, l, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, c)
    x = x + nn.Dense(c, name="attn_proj")(attn)
    y = nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, name="norm2")(x)
    y = nn.Dense(int(round(c * self.mlp_ratio)), name="mlp_fc1")(y)
    y = nn.Dense(c, name="mlp_fc2")(jax.nn.gelu(y, approximate=True))
    return x + y


class DinoViT(nn.Module):
  """DINO ViT on (B, grid*patch, grid*patch, 3) ImageNet-normalised images.

  Returns [embedding readout, readout after each tap block], each (B, grid*grid, C): patch
  tokens plus the class token.
  """
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  grid: int = 14
  tap_depths: Sequence[int] = DEFAULT_TAP_DEPTHS
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    side = self.grid * self.patch_size
    if x.shape[1:] != (side, side, 3):
      raise ValueError(f"DINO input must be (B, {side}, {side}, 3), got {x.shape}")
    taps = set(d for d in self.tap_depths if d < self.depth)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, 1 + self.grid * self.grid, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1) + pos
    readouts = [x[:, 1:] + x[:, :1]]
    for i in range(max(self.depth, 1 + max(taps, default=-1))):
      x = DinoBlock(self.width, self.num_heads, norm_eps=self.norm_eps, name=f"blocks_{i}")(x)
      if i in taps:
        readouts.append(x[:, 1:] + x[:, :1])
    return readouts


def _clean_keys(state_dict):
  out = {}
  for key, value in state_dict.items():
    for prefix in _STRIPPED_PREFIXES:
      if key.startswith(prefix):
        key = key[len(prefix):]
    out[key] = np.asarray(value)
  return out


def _linear(sd, key):
  return {"kernel": sd[f"{key}.weight"].T, "bias": sd[f"{key}.bias"]}


def _ln(sd, key):
  return {"scale": sd[f"{key}.weight"], "bias": sd[f"{key}.bias"]}


def dino_params_from_state_dict(state_dict: Dict[str, np.ndarray],
                                num_heads: int = None) -> Tuple[Dict[str, Any], Dict[str, int]]:
  """timm-layout DINO state dict -> (DinoViT params, architecture kwargs for DinoViT).

  The k third of every qkv bias is zeroed, as the reference does. Raises ValueError naming the
  tensor on a missing key, an unexpected key or an inconsistent shape.
  """
  sd = _clean_keys(state_dict)
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
    if key not in sd:
      raise ValueError(f"DINO state dict is missing {key!r} (expected timm ViT key names)")
  width = sd["cls_token"].shape[-1]
  proj = sd["patch_embed.proj.weight"]
  if proj.ndim != 4 or proj.shape[:2] != (width, 3) or proj.shape[2] != proj.shape[3]:
    raise ValueError(f"patch_embed.proj.weight has shape {proj.shape}, expected ({width}, 3, P, P)")
  patch = proj.shape[2]
  num_pos = sd["pos_embed"].shape[1] - 1
  grid = int(round(np.sqrt(num_pos)))
  if grid * grid != num_pos or sd["pos_embed"].shape != (1, num_pos + 1, width):
    raise ValueError(f"pos_embed has shape {sd['pos_embed'].shape}, expected (1, 1+G*G, {width})")
  depth = 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m),
                  default=-1)
  if depth == 0:
    raise ValueError("DINO state dict has no 'blocks.<i>.*' tensors")
  num_heads = num_heads or max(1, width // DINO_HEAD_DIM)
  if width % num_heads:
    raise ValueError(f"DINO width {width} is not divisible by num_heads={num_heads}")

  used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
  params = {
      "cls_token": sd["cls_token"].reshape(1, 1, width),
      "pos_embed": sd["pos_embed"],
      "patch_embed": {"kernel": proj.transpose(2, 3, 1, 0), "bias": sd["patch_embed.proj.bias"]},
  }
  for i in range(depth):
    p = f"blocks.{i}"
    names = [f"{p}.{n}.{w}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                       "mlp.fc2") for w in ("weight", "bias")]
    missing = [n for n in names if n not in sd]
    if missing:
      raise ValueError(f"DINO state dict is missing {', '.join(missing)}")
    used.update(names)
    qkv = _linear(sd, f"{p}.attn.qkv")
    if qkv["kernel"].shape != (width, 3 * width):
      raise ValueError(f"{p}.attn.qkv.weight has shape {qkv['kernel'].T.shape}, expected "
                       f"({3 * width}, {width})")
    bias = qkv["bias"].copy()
    bias[width:2 * width] = 0.0   # zero the key bias, as the reference
    qkv["bias"] = bias
    params[f"blocks_{i}"] = {
        "norm1": _ln(sd, f"{p}.norm1"), "attn_qkv": qkv,
        "attn_proj": _linear(sd, f"{p}.attn.proj"), "norm2": _ln(sd, f"{p}.norm2"),
        "mlp_fc1": _linear(sd, f"{p}.mlp.fc1"), "mlp_fc2": _linear(sd, f"{p}.mlp.fc2"),
    }
  extra = sorted(k for k in sd if k not in used and not k.startswith(_IGNORED_PREFIXES))
  if extra:
    raise ValueError(f"DINO state dict has unexpected tensors: {', '.join(extra[:10])}")
  arch = dict(width=width, depth=depth, num_heads=num_heads, patch_size=patch, grid=grid)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
  return params, arch


def load_dino(path: str, config_key: str = "loss.dino_weights", num_heads: int = None):
  """Reads a DINO weight file -> (params, arch kwargs); a missing file names `config_key`."""
  state_dict = weight_files.read_weight_file(path, config_key)
  return dino_params_from_state_dict(state_dict, num_heads=num_heads)
