"""Official PyTorch GPT state dict <-> our GPT parameter tree.

Every official tensor has exactly one home in our tree. Linear weights are (out, in) in torch
and (in, out) kernels here, so they are transposed; `wqkv` stays fused ([q | k | v] along the
output axis) in both. Class, code and special-token tables are used as they are.
"""
import re

import numpy as np

from detailflow_jax.models.gpt_config import GPTConfig, ffn_hidden_size

# Wrapper prefixes added by DDP / torch.compile; stripped on import.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Official key -> (our param path, transpose?) for the parts outside the layers.
_TOP_LEVEL = {
    "cls_embedding.embedding_table.weight": (("cls_embedding", "embedding"), False),
    "tok_embeddings.weight": (("tok_embeddings", "embedding"), False),
    "spe_tok_embeddings.special_embeddings.weight": (("spe_tok_embeddings", "embedding"), False),
    "norm.weight": (("norm", "scale"), False),
    "output.weight": (("output", "kernel"), True),
}
# Per-layer official suffix -> (path under layers_{i}, transpose?).
_PER_LAYER = {
    "attention.wqkv.weight": (("attention", "wqkv", "kernel"), True),
    "attention.wo.weight": (("attention", "wo", "kernel"), True),
    "feed_forward.w1.weight": (("feed_forward", "w1", "kernel"), True),
    "feed_forward.w3.weight": (("feed_forward", "w3", "kernel"), True),
    "feed_forward.w2.weight": (("feed_forward", "w2", "kernel"), True),
    "attention_norm.weight": (("attention_norm", "scale"), False),
    "ffn_norm.weight": (("ffn_norm", "scale"), False),
}


def _key_map(config):
  """Official key -> (our path, transpose?, official shape) for a model of this config."""
  c = config
  shapes = {
      "cls_embedding.embedding_table.weight": (c.num_class_rows, c.dim),
      "tok_embeddings.weight": (c.vocab_size, c.dim),
      "spe_tok_embeddings.special_embeddings.weight": (c.group_size - 1, c.dim),
      "norm.weight": (c.dim,),
      "output.weight": (c.vocab_size, c.dim),
  }
  layer_shapes = {
      "attention.wqkv.weight": (3 * c.dim, c.dim),
      "attention.wo.weight": (c.dim, c.dim),
      "feed_forward.w1.weight": (c.ffn_hidden, c.dim),
      "feed_forward.w3.weight": (c.ffn_hidden, c.dim),
      "feed_forward.w2.weight": (c.dim, c.ffn_hidden),
      "attention_norm.weight": (c.dim,),
      "ffn_norm.weight": (c.dim,),
  }
  mapping = {k: (path, t, shapes[k]) for k, (path, t) in _TOP_LEVEL.items()}
  for i in range(c.num_layers):
    for suffix, (path, t) in _PER_LAYER.items():
      mapping[f"layers.{i}.{suffix}"] = ((f"layers_{i}",) + path, t, layer_shapes[suffix])
  return mapping


def _strip_wrappers(key):
  changed = True
  while changed:
    changed = False
    for prefix in _WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


def gpt_params_from_state_dict(state_dict, config):
  """Official GPT state dict (name -> array, e.g. numpy) -> our params (nested dict, float32).

  Raises ValueError naming every unknown key, missing key and mis-shaped tensor."""
  if not isinstance(config, GPTConfig):
    config = GPTConfig.from_dict(config)
  mapping = _key_map(config)
  given = {_strip_wrappers(k): v for k, v in state_dict.items()}
  problems = []
  unknown = sorted(set(given) - set(mapping))
  if unknown:
    problems.append(f"unknown tensors {unknown}")
  missing = sorted(set(mapping) - set(given))
  if missing:
    problems.append(f"missing tensors {missing}")
  params = {}
  for key, (path, transpose, shape) in mapping.items():
    if key not in given:
      continue
    array = np.asarray(given[key], dtype=np.float32)
    if array.shape != shape:
      problems.append(f"tensor {key} has shape {array.shape}, expected {shape} for this config")
      continue
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(array.T) if transpose else array
  if problems:
    raise ValueError("GPT state dict does not match the config: " + "; ".join(problems))
  return params


def gpt_state_dict_from_params(params, config):
  """Our params -> official state dict (name -> float32 numpy array, torch layout)."""
  if not isinstance(config, GPTConfig):
    config = GPTConfig.from_dict(config)
  state_dict = {}
  for key, (path, transpose, shape) in _key_map(config).items():
    node = params
    try:
      for name in path:
        node = node[name]
    except (KeyError, TypeError) as e:
      raise ValueError(f"params have no entry {'/'.join(path)} (official {key})") from e
    array = np.asarray(node, dtype=np.float32)
    array = array.T if transpose else array
    if array.shape != shape:
      raise ValueError(f"param {'/'.join(path)} gives {key} of shape {array.shape}, expected {shape}")
    state_dict[key] = np.ascontiguousarray(array)
  return state_dict


def infer_gpt_config(state_dict):
  """GPTConfig fields readable from tensor shapes: vocab_size, dim, num_layers, num_classes,
  group_size and (when it differs from the default rounding) ffn_dim.

  Not in the shapes, so not returned: num_heads, block_size, causal_num (take them from the
  official config.json via `gpt_config_from_official_args`). num_classes assumes the table has
  the null-class row (any model trained with label dropout)."""
  sd = {_strip_wrappers(k): np.shape(v) for k, v in state_dict.items()}
  for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight",
              "spe_tok_embeddings.special_embeddings.weight", "layers.0.feed_forward.w1.weight"):
    if key not in sd:
      raise ValueError(f"state dict has no {key}; cannot infer the GPT config")
  vocab_size, dim = sd["tok_embeddings.weight"]
  layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
  inferred = dict(
      vocab_size=int(vocab_size),
      dim=int(dim),
      num_layers=max(layer_ids) + 1,
      num_classes=int(sd["cls_embedding.embedding_table.weight"][0]) - 1,
      group_size=int(sd["spe_tok_embeddings.special_embeddings.weight"][0]) + 1,
  )
  hidden = int(sd["layers.0.feed_forward.w1.weight"][0])
  if hidden != ffn_hidden_size(inferred["dim"]):
    inferred["ffn_dim"] = hidden
  return inferred


# Official ModelArgs / config.json name -> GPTConfig field.
_OFFICIAL_ARG_NAMES = {
    "vocab_size": "vocab_size", "n_layer": "num_layers", "dim": "dim", "n_head": "num_heads",
    "num_classes": "num_classes", "block_size": "block_size", "group_size": "group_size",
    "causal_num": "causal_num", "cls_token_num": "cls_token_num", "norm_eps": "norm_eps",
    "rope_base": "rope_base", "token_dropout_p": "token_dropout",
    "resid_dropout_p": "resid_dropout", "ffn_dropout_p": "ffn_dropout",
    "class_dropout_prob": "class_dropout_prob",
}
# Official arguments we accept only at the value the official DetailFlow models use.
_OFFICIAL_FIXED = {"n_kv_head": (None,), "ffn_dim_multiplier": (None,), "model_type": ("c2i",),
                   "attn_dropout_p": (0.0,), "drop_path_rate": (0.0,),
                   "learnable_tok_embeddings": (True,)}


def gpt_config_from_official_args(args, **overrides):
  """GPTConfig-compatible dict from the official ModelArgs fields (its saved config.json).

  Fields without an equivalent here (max_batch_size, caption_dim, initializer_range, ...) are
  ignored; arguments that would change the architecture away from what we implement raise."""
  out = {}
  for name, value in dict(args).items():
    if name in _OFFICIAL_ARG_NAMES:
      out[_OFFICIAL_ARG_NAMES[name]] = value
    elif name in _OFFICIAL_FIXED and value not in _OFFICIAL_FIXED[name]:
      raise ValueError(f"official argument {name}={value!r} is not supported "
                       f"(supported: {_OFFICIAL_FIXED[name]})")
  multiple_of = dict(args).get("multiple_of", 256)
  if multiple_of != 256 and "dim" in out:
    out["ffn_dim"] = ffn_hidden_size(out["dim"], multiple_of)
  if out.get("causal_num") is None and "group_size" in out:
    out["causal_num"] = out["group_size"]   # the official default
  out.update(overrides)
  return out
