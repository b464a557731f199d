"""Official PyTorch tokenizer state dict <-> our flax param tree.

Every official tensor has exactly one home in our tree. A `KeyMap` lists (official key, path in
our param tree, whether it is a Linear weight). Linear weights are (out, in) in PyTorch and
(in, out) flax kernels, so they are transposed; every other tensor keeps its shape.

The SigLIP2 towers are mapped by `siglip_transformer_key_map` / `siglip_embeddings_key_map`, which
the SigLIP2 feature-model loader reuses through `siglip_transformer_params_from_state_dict` and
`siglip_embeddings_params_from_state_dict` (HF checkpoints use the prefix "vision_model.").
"""
import re
from typing import Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

# (official key, path of the leaf in our param tree, is a Linear weight to transpose)
KeyMap = List[Tuple[str, Tuple[str, ...], bool]]

# The official quantiser keeps a 65536-slot ring buffer of recent code indices (training-time
# bookkeeping only). We keep no such state; export writes zeros of the official shape.
CODEBOOK_USED_KEY = "quantize.codebook_used"
CODEBOOK_USED_SHAPE = (65536,)


def _linear(official, path):
  return [(f"{official}.weight", path + ("kernel",), True), (f"{official}.bias", path + ("bias",), False)]


def _layer_norm(official, path):
  return [(f"{official}.weight", path + ("scale",), False), (f"{official}.bias", path + ("bias",), False)]


def siglip_transformer_key_map(prefix: str, depth: int, path: Tuple[str, ...] = ()) -> KeyMap:
  """Keys `{prefix}encoder.layers.{i}.*` and `{prefix}post_layernorm.*` -> SiglipTransformer."""
  entries = []
  for i in range(depth):
    official = f"{prefix}encoder.layers.{i}"
    layer = path + (f"layers_{i}",)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      entries += _linear(f"{official}.self_attn.{proj}", layer + ("self_attn", proj))
    entries += _layer_norm(f"{official}.layer_norm1", layer + ("layer_norm1",))
    entries += _layer_norm(f"{official}.layer_norm2", layer + ("layer_norm2",))
    entries += _linear(f"{official}.mlp.fc1", layer + ("mlp", "fc1"))
    entries += _linear(f"{official}.mlp.fc2", layer + ("mlp", "fc2"))
  entries += _layer_norm(f"{prefix}post_layernorm", path + ("post_layernorm",))
  return entries


def siglip_embeddings_key_map(prefix: str, path: Tuple[str, ...] = (),
                              with_patch_embedding: bool = True) -> KeyMap:
  """Keys `{prefix}embeddings.*` -> SiglipPatchEmbeddings (or a bare PositionTable when
  `with_patch_embedding` is False and `path` points at it)."""
  entries = []
  if with_patch_embedding:
    entries += _linear(f"{prefix}embeddings.patch_embedding", path + ("patch_embedding",))
    entries.append((f"{prefix}embeddings.position_embedding.weight",
                    path + ("position_embedding", "embedding"), False))
  else:
    entries.append((f"{prefix}embeddings.position_embedding.weight", path + ("embedding",), False))
  return entries


def tokenizer_key_map(config) -> KeyMap:
  """All official keys of the tokenizer (VQModel) except the `quantize.codebook_used` buffer."""
  enc, dec = config.encoder, config.decoder
  entries = [
      ("encoder.latent_pos_embed", ("encoder", "latent_pos_embed"), False),
      ("encoder.latent_tokens", ("encoder", "latent_tokens"), False),
      ("encoder.refined_tokens", ("encoder", "refined_tokens"), False),
  ]
  entries += siglip_embeddings_key_map("encoder.visual_model.", ("encoder", "embeddings"))
  entries += siglip_transformer_key_map("encoder.visual_model.", enc.depth, ("encoder", "transformer"))
  entries += [
      ("decoder.latent_pos_embed", ("decoder", "latent_pos_embed"), False),
      ("decoder.mask_token", ("decoder", "mask_token"), False),
  ]
  entries += siglip_embeddings_key_map("decoder.visual_model.", ("decoder", "position_embedding"),
                                       with_patch_embedding=False)
  entries += siglip_transformer_key_map("decoder.visual_model.", dec.depth, ("decoder", "transformer"))
  entries += _linear("decoder.to_pixel.model", ("decoder", "to_pixel"))
  entries += _linear("quant_conv", ("quant_conv",))
  entries += _linear("post_quant_conv", ("post_quant_conv",))
  entries += _linear("refine_conv", ("refine_conv",))
  entries.append(("quantize.embedding.weight", ("quantize", "codebook"), False))
  return entries


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _set(tree, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], key_map: KeyMap,
                           expected: Optional[dict] = None, ignore_extra: bool = False,
                           ignore_keys=()) -> dict:
  """Builds a param tree from `state_dict` following `key_map`.

  `expected` (a param tree of arrays or ShapeDtypeStructs, e.g. from jax.eval_shape(init)) is
  used to check every shape. Missing keys always raise; keys not in the map raise unless
  `ignore_extra` (for checkpoints holding more than one model) or listed in `ignore_keys`.
  """
  wanted = {k for k, _, _ in key_map}
  missing = sorted(wanted - set(state_dict))
  if missing:
    raise ValueError(f"state dict is missing {len(missing)} tensor(s): {', '.join(missing[:10])}"
                     + (" ..." if len(missing) > 10 else ""))
  if not ignore_extra:
    extra = sorted(set(state_dict) - wanted - set(ignore_keys))
    if extra:
      raise ValueError(f"state dict has {len(extra)} unexpected tensor(s) that this model has no "
                       f"place for: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
  params = {}
  for key, path, transpose in key_map:
    value = np.asarray(state_dict[key])
    if transpose:
      if value.ndim != 2:
        raise ValueError(f"tensor {key} should be a 2D Linear weight, got shape {value.shape}")
      value = value.T
    if expected is not None:
      want = tuple(_get(expected, path).shape)
      have = value.shape[::-1] if transpose else value.shape
      if value.shape != want:
        want_official = want[::-1] if transpose else want
        raise ValueError(f"tensor {key} has shape {have}, this model expects {want_official}")
    _set(params, path, value)
  return params


def state_dict_from_params(params, key_map: KeyMap) -> Dict[str, np.ndarray]:
  """The inverse of `params_from_state_dict`: official names, PyTorch layouts, numpy arrays."""
  out = {}
  for key, path, transpose in key_map:
    try:
      value = np.asarray(jax.device_get(_get(params, path)))
    except KeyError as e:
      raise ValueError(f"param tree has no leaf {'/'.join(path)} for tensor {key}") from e
    out[key] = np.ascontiguousarray(value.T) if transpose else value
  return out


def _infer_depth(state_dict, prefix):
  pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  layers = {int(m.group(1)) for k in state_dict for m in [pattern.match(k)] if m}
  if not layers:
    raise ValueError(f"state dict has no keys '{prefix}encoder.layers.<i>.*'")
  return max(layers) + 1


def siglip_transformer_params_from_state_dict(state_dict, prefix: str, depth: Optional[int] = None):
  """SiglipTransformer params from `{prefix}encoder.layers.*` + `{prefix}post_layernorm.*`.

  Other keys are ignored (a SigLIP2 checkpoint also holds the text tower / head). `depth` defaults
  to the number of layers found; a smaller depth keeps the first layers (as the tokenizer encoder
  does with SigLIP2 so400m).
  """
  depth = _infer_depth(state_dict, prefix) if depth is None else depth
  return params_from_state_dict(state_dict, siglip_transformer_key_map(prefix, depth),
                                ignore_extra=True)


def siglip_embeddings_params_from_state_dict(state_dict, prefix: str):
  """SiglipPatchEmbeddings params from `{prefix}embeddings.{patch,position}_embedding.*`."""
  return params_from_state_dict(state_dict, siglip_embeddings_key_map(prefix), ignore_extra=True)


def _expected_tokenizer_shapes(config):
  from detailflow_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.param_shapes(config)


def tokenizer_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config) -> dict:
  """Official VQModel state dict -> DetailFlowTokenizer params ({'params': ...} not included).

  `config` is the `tokenizer` ConfigDict. Raises ValueError naming the tensor on a missing key, an
  unknown key or a shape mismatch. `quantize.codebook_used` (a training buffer) is ignored.
  """
  expected = _expected_tokenizer_shapes(config)
  return params_from_state_dict(state_dict, tokenizer_key_map(config), expected=expected,
                                ignore_keys=(CODEBOOK_USED_KEY,))


def tokenizer_state_dict_from_params(params, config) -> Dict[str, np.ndarray]:
  """DetailFlowTokenizer params -> official VQModel state dict (numpy, float32 as stored)."""
  if "params" in params and "encoder" not in params:
    params = params["params"]
  out = state_dict_from_params(params, tokenizer_key_map(config))
  out[CODEBOOK_USED_KEY] = np.zeros(CODEBOOK_USED_SHAPE, np.float32)
  return out
