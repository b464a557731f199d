"""Frozen SigLIP2 so400m vision tower: alignment targets and the tokenizer encoder's init.

Architecture (google/siglip2-so400m-patch16-naflex): Linear patch embedding of 16x16x3 patches,
a learned 16x16 position table resized to the input's patch grid (bilinear, antialiased), 27
pre-LN layers of width 1152, 16 heads, MLP 4304 (tanh GELU), then post_layernorm. The MAP
head is not used. Built from models/vit.py, so the param tree is
  {'embeddings': {'patch_embedding': {kernel, bias}, 'position_embedding': {'embedding'}},
   'transformer': {'layers_{i}': ..., 'post_layernorm': ...}}
which is also the layout of the tokenizer encoder's 'embeddings' / 'transformer' subtrees.

Alignment target quirk kept from the reference: its feature call runs the Hugging Face vision
model, whose output is already post-LayerNormed, and then applies `post_layernorm` once more.
`siglip2_features(..., repeat_post_layernorm=True)` reproduces that (set False for plain
features).

Weight files (config key loss.siglip_weights):
  * Hugging Face safetensors (one file, or a directory of shards): keys
    `vision_model.embeddings.patch_embedding.{weight (1152, 768), bias}`,
    `vision_model.embeddings.position_embedding.weight (256, 1152)`,
    `vision_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj,layer_norm1,layer_norm2,
    mlp.fc1,mlp.fc2}.{weight,bias}`, `vision_model.post_layernorm.{weight,bias}`; other keys (text
    tower, MAP head) are skipped. A Conv2d patch embedding (D, 3, P, P) of non-NaFlex SigLIP
    checkpoints is flattened in the (row, column, channel) patch order.
  * big_vision .npz (optionally prefixed "params/"): `img/embedding/{kernel,bias}`,
    `img/pos_embedding`, `img/Transformer/encoderblock_{i}/LayerNorm_0|1/{scale,bias}`,
    `.../MultiHeadDotProductAttention_0/{query,key,value}/{kernel (D,H,hd), bias (H,hd)}`,
    `.../MultiHeadDotProductAttention_0/out/{kernel (H,hd,D), bias}`,
    `.../MlpBlock_0/Dense_0|1/{kernel,bias}`, `img/Transformer/encoder_norm/{scale,bias}`; a
    scanned `encoderblock/...` with a leading layer axis is split. Mapping: LayerNorm_0 ->
    layer_norm1, LayerNorm_1 -> layer_norm2, query/key/value/out -> q/k/v/out_proj (heads
    flattened), Dense_0/1 -> fc1/fc2, encoder_norm -> post_layernorm, embedding ->
    patch_embedding, pos_embedding -> position_embedding.
"""
import dataclasses
import glob
import os
import re
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.interop import tokenizer_state_dict as sd_lib
from detailflow_jax.models import tokenizer as tokenizer_lib
from detailflow_jax.models import vit
from detailflow_jax.models import weight_files

CONFIG_KEY = "loss.siglip_weights"
HF_PREFIX = "vision_model."
SO400M = dict(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=16, pos_grid=16,
              layer_norm_eps=1e-6)


class Siglip2VisionTower(nn.Module):
  """NHWC images in [-1, 1] (sides multiple of patch_size) -> (B, P, width) post-LN tokens."""
  width: int = SO400M["width"]
  depth: int = SO400M["depth"]
  num_heads: int = SO400M["num_heads"]
  mlp_dim: int = SO400M["mlp_dim"]
  patch_size: int = SO400M["patch_size"]
  pos_grid: int = SO400M["pos_grid"]
  layer_norm_eps: float = SO400M["layer_norm_eps"]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    tokens, _ = vit.SiglipPatchEmbeddings(self.width, self.patch_size, self.pos_grid,
                                          dtype=self.dtype, name="embeddings")(images)
    return vit.SiglipTransformer(self.width, self.depth, self.num_heads, self.mlp_dim,
                                 self.layer_norm_eps, self.dtype, name="transformer")(tokens)


def tower_from_params(params, num_heads=SO400M["num_heads"], layer_norm_eps=1e-6,
                      dtype=jnp.float32) -> Siglip2VisionTower:
  """The tower whose shapes fit `params` (heads are not stored in weights: pass them)."""
  params = params.get("params", params)
  kernel = params["embeddings"]["patch_embedding"]["kernel"]
  patch = int(round(np.sqrt(kernel.shape[0] // 3)))
  grid = int(round(np.sqrt(params["embeddings"]["position_embedding"]["embedding"].shape[0])))
  layers = [k for k in params["transformer"] if k.startswith("layers_")]
  mlp_dim = params["transformer"]["layers_0"]["mlp"]["fc1"]["kernel"].shape[1]
  return Siglip2VisionTower(width=kernel.shape[1], depth=len(layers), num_heads=num_heads,
                            mlp_dim=mlp_dim, patch_size=patch, pos_grid=grid,
                            layer_norm_eps=layer_norm_eps, dtype=dtype)


def _layer_norm(x, ln, eps):
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * ln["scale"] + ln["bias"]


def siglip2_features(params, images, num_heads=SO400M["num_heads"], layer_norm_eps=1e-6,
                     repeat_post_layernorm=True, dtype=jnp.float32):
  """(B, P, width) token features of NHWC [-1, 1] images; frozen (gradients stopped).

  repeat_post_layernorm=True applies post_layernorm a second time, as the reference's alignment
  target does (see the module docstring). Jit-friendly (shapes come from `params` and images).
  """
  params = jax.lax.stop_gradient(params.get("params", params))
  tower = tower_from_params(params, num_heads, layer_norm_eps, dtype)
  feats = tower.apply({"params": params}, images.astype(dtype))
  if repeat_post_layernorm:
    feats = _layer_norm(feats, params["transformer"]["post_layernorm"], layer_norm_eps)
  return feats.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Siglip2FeatureModel:
  """A loaded frozen tower: `features(params, images)` -> (B, P, width) alignment features.

  `params` is passed back in explicitly so a jitted step can take it as an argument (captured
  as a constant, XLA would fold the weights into every compiled program).
  """
  params: Any
  width: int
  num_heads: int = SO400M["num_heads"]
  layer_norm_eps: float = SO400M["layer_norm_eps"]
  repeat_post_layernorm: bool = True

  def features(self, params, images):
    return siglip2_features(params, images, self.num_heads, self.layer_norm_eps,
                            self.repeat_post_layernorm)


# ----------------------------------------------------------------------------- weight loading


def _big_vision_to_hf(bv: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """big_vision `img/...` arrays -> Hugging Face vision key names and PyTorch layouts."""
  bv = {re.sub(r"^params/", "", k): v for k, v in bv.items()}
  # Scanned layers: one array per parameter with a leading layer axis.
  for key in [k for k in bv if "/encoderblock/" in k]:
    stacked = bv.pop(key)
    for i, layer in enumerate(stacked):
      bv[key.replace("/encoderblock/", f"/encoderblock_{i}/")] = layer
  hf = {}
  kernel = bv["img/embedding/kernel"]
  width = kernel.shape[-1]
  hf["embeddings.patch_embedding.weight"] = kernel.reshape(-1, width).T   # conv (p,p,3,D) too
  hf["embeddings.patch_embedding.bias"] = bv["img/embedding/bias"]
  hf["embeddings.position_embedding.weight"] = bv["img/pos_embedding"].reshape(-1, width)
  names = {"LayerNorm_0": "layer_norm1", "LayerNorm_1": "layer_norm2",
           "MlpBlock_0/Dense_0": "mlp.fc1", "MlpBlock_0/Dense_1": "mlp.fc2"}
  attn = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
  pattern = re.compile(r"img/Transformer/encoderblock_(\d+)/(.+)/(scale|bias|kernel)$")
  for key, value in bv.items():
    m = pattern.match(key)
    if not m:
      continue
    i, module, leaf = m.group(1), m.group(2), m.group(3)
    base = f"encoder.layers.{i}."
    if module in names:
      name = base + names[module]
      if leaf == "kernel":
        hf[name + ".weight"] = value.T
      else:
        hf[name + (".weight" if leaf == "scale" else ".bias")] = value
    elif module.startswith("MultiHeadDotProductAttention_0/"):
      name = base + "self_attn." + attn[module.split("/")[1]]
      if leaf == "kernel":   # (D, H, hd) or (H, hd, D): flatten heads, then (out, in)
        hf[name + ".weight"] = value.reshape(-1, width).T if module.endswith("out") else \
            value.reshape(width, -1).T
      else:
        hf[name + ".bias"] = value.reshape(-1)
  hf["post_layernorm.weight"] = bv["img/Transformer/encoder_norm/scale"]
  hf["post_layernorm.bias"] = bv["img/Transformer/encoder_norm/bias"]
  return {HF_PREFIX + k: np.asarray(v) for k, v in hf.items()}


def _wanted_layer(name, num_layers):
  m = re.search(r"(?:encoder\.layers\.|encoderblock_)(\d+)[./]", name)
  return m is None or num_layers is None or int(m.group(1)) < num_layers


def read_siglip2_vision_state_dict(path: str, num_layers: Optional[int] = None,
                                   config_key: str = CONFIG_KEY) -> Dict[str, np.ndarray]:
  """Hugging Face-named vision tensors (`vision_model.*`, PyTorch layouts) from a safetensors
  file / shard directory or a big_vision npz; only the first `num_layers` layers are read."""
  if path and os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"no .safetensors files in directory {path!r} (config key "
                              f"{config_key})")
  else:
    files = [weight_files.check_weight_file(path, config_key)]
  if files[0].lower().endswith(".npz"):
    keep = lambda k: ("img/" in k and "MAPHead" not in k and _wanted_layer(k, num_layers))
    state = _big_vision_to_hf(weight_files.read_weight_file(files[0], config_key, keep))
  else:
    keep = lambda k: (k.startswith(HF_PREFIX) and ".head." not in k
                      and _wanted_layer(k, num_layers))
    state = {}
    for f in files:
      state.update(weight_files.read_weight_file(f, config_key, keep))
  patch_key = HF_PREFIX + "embeddings.patch_embedding.weight"
  if patch_key not in state:
    raise ValueError(f"{path!r} holds no SigLIP2 vision tower ({patch_key} not found)")
  if state[patch_key].ndim == 4:   # Conv2d (D, C, P, P) -> Linear over (row, col, channel)
    w = state[patch_key]
    state[patch_key] = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def load_siglip2_params(path: str, num_layers: Optional[int] = None,
                        config_key: str = CONFIG_KEY):
  """Params of a SigLIP2 vision tower (first `num_layers` layers, all by default, plus
  post_layernorm) in the `Siglip2VisionTower` layout; see the module docstring for formats."""
  sd = read_siglip2_vision_state_dict(path, num_layers, config_key)
  params = {
      "embeddings": sd_lib.siglip_embeddings_params_from_state_dict(sd, HF_PREFIX),
      "transformer": sd_lib.siglip_transformer_params_from_state_dict(sd, HF_PREFIX, num_layers),
  }
  return jax.tree_util.tree_map(np.asarray, params)


def siglip2_encoder_init(path: str, tokenizer_config, config_key: str = CONFIG_KEY):
  """The tokenizer encoder's SigLIP2 init: {'embeddings': ..., 'transformer': ...} subtrees
  (first `tokenizer_config.encoder.depth` layers, patch embedding, position table,
  post_layernorm) in the tokenizer encoder's param layout, to merge into params['encoder'].

  As the reference, when the encoder patch size differs from the file's, the patch embedding is
  left out (it stays freshly initialised). Shapes are checked against the config.
  """
  enc = tokenizer_config.encoder
  params = load_siglip2_params(path, enc.depth, config_key)
  kernel = params["embeddings"]["patch_embedding"]["kernel"]
  width = kernel.shape[1]
  file_patch = int(round(np.sqrt(kernel.shape[0] // 3)))
  grid = int(round(np.sqrt(params["embeddings"]["position_embedding"]["embedding"].shape[0])))
  depth = len([k for k in params["transformer"] if k.startswith("layers_")])
  mlp_dim = params["transformer"]["layers_0"]["mlp"]["fc1"]["kernel"].shape[1]
  have = dict(width=width, depth=depth, mlp_dim=mlp_dim, pos_grid=grid)
  want = dict(width=enc.width, depth=enc.depth, mlp_dim=enc.mlp_dim, pos_grid=enc.pos_grid)
  if have != want:
    raise ValueError(f"SigLIP2 weights in {path!r} ({config_key}) have {have}, the tokenizer "
                     f"encoder config wants {want}")
  if enc.patch_size != file_patch:
    del params["embeddings"]["patch_embedding"]
  return params


def siglip2_encoder_state_dict(path: str, depth: int = 12, config_key: str = CONFIG_KEY):
  """The same init as official tokenizer keys `encoder.visual_model.*` (PyTorch layouts)."""
  sd = read_siglip2_vision_state_dict(path, depth, config_key)
  return {"encoder.visual_model." + k[len(HF_PREFIX):]: v for k, v in sd.items()}


def load_feature_model(path: str, config_key: str = CONFIG_KEY,
                       num_heads: int = SO400M["num_heads"],
                       repeat_post_layernorm: bool = True) -> Siglip2FeatureModel:
  """The full tower from `path` (all layers) as a `Siglip2FeatureModel` (params as jnp arrays)."""
  params = jax.tree_util.tree_map(jnp.asarray, load_siglip2_params(path, None, config_key))
  width = params["embeddings"]["patch_embedding"]["kernel"].shape[1]
  return Siglip2FeatureModel(params=params, width=width, num_heads=num_heads,
                             repeat_post_layernorm=repeat_post_layernorm)


def tokenizer_params_with_siglip_encoder(path: str, tokenizer_config, rng,
                                         config_key: str = CONFIG_KEY):
  """Fresh tokenizer params (models/tokenizer.init_params) whose encoder patch embedding,
  position table, first `encoder.depth` layers and post_layernorm come from SigLIP2, as the
  official `enc_pretrained` encoder. Latent queries, decoder and quantiser stay fresh."""
  params = jax.device_get(tokenizer_lib.init_params(tokenizer_config, rng))
  params = jax.tree_util.tree_map(np.asarray, params)
  pretrained = siglip2_encoder_init(path, tokenizer_config, config_key)
  encoder = dict(params["encoder"])
  for part in ("embeddings", "transformer"):
    merged = dict(encoder[part])
    merged.update(pretrained[part])
    _check_same_shapes(encoder[part], merged, f"encoder/{part}")
    encoder[part] = merged
  return {**params, "encoder": encoder}


def _check_same_shapes(fresh, merged, where):
  fresh_shapes = jax.tree_util.tree_map(np.shape, fresh)
  merged_shapes = jax.tree_util.tree_map(np.shape, merged)
  if fresh_shapes != merged_shapes:
    raise ValueError(f"SigLIP2 weights do not fit the tokenizer's {where} params: "
                     f"{merged_shapes} vs {fresh_shapes}")
