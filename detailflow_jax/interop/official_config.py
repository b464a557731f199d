"""Config mapping between our configs and the official DetailFlow run files.

config.json holds the official ModelArgs (the loaders pass them to the model constructor, so
nothing else may be in it); config.yaml holds the training arguments, where the loaders read
the model family (`vq_model` / `gpt_model`) and the tokenizer's R(n) schedule fields. Our model
section also goes into config.yaml (key `jax_config`, ignored by the official loaders): it
carries what the official fields cannot say (head counts of towers of a custom size, our
minimum decoder size, the compute dtype).

Importing an official tokenizer: the tower sizes come from the tensor shapes, the head counts
from the official tower names (`encoder_model` / `decoder_model` with `*_pretrained`).
"""
import math
import re

import ml_collections
import numpy as np

from detailflow_jax import dynamic_resolution
from detailflow_jax.config import defaults
from detailflow_jax.interop import gpt_state_dict
from detailflow_jax.models import gpt_config as gpt_lib

JAX_CONFIG_KEY = "jax_config"
TOKENIZER, GPT = "tokenizer", "gpt"
# Wrapper prefixes of DDP / torch.compile state dicts.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# (encoder_model or decoder_model, pretrained) -> (width, depth, heads, mlp) of the tower the
# official builder creates. Pretrained towers are the first layers of SigLIP2 so400m; the
# position table always has the so400m config's 256 positions (16 x 16) and LayerNorm eps 1e-6.
OFFICIAL_TOWERS = {
    ("siglip2_base", True): (1152, 12, 16, 4304),
    ("siglip2_large", True): (1152, 16, 16, 4304),
    ("siglip2", True): (1152, 27, 16, 4304),
    ("siglip2_base", False): (768, 12, 12, 3072),
}
OFFICIAL_POS_GRID = 16
OFFICIAL_LAYER_NORM_EPS = 1e-6
# Any other size: the official builder has no entry for it (register one to load it there).
CUSTOM_TOWER = "siglip2_custom"
CUSTOM_GPT = "GPT-custom"
# Official GPT_models names -> (n_layer, dim, n_head).
OFFICIAL_GPT_SIZES = {
    "GPT-B": (12, 768, 12), "GPT-L": (24, 1024, 16), "GPT-XL": (36, 1280, 20),
    "GPT-XLPlus": (42, 1408, 22), "GPT-XXL": (48, 1536, 24), "GPT-XXLPlus": (48, 1920, 30),
    "GPT-XXXL": (48, 2560, 40), "GPT-1B": (22, 2048, 32), "GPT-3B": (24, 3200, 32),
    "GPT-7B": (32, 4096, 32),
}

# config.yaml training argument -> path in our training config. Used both ways; a value one
# side lacks is skipped. (Model fields travel through config.json instead.)
TOKENIZER_TRAIN_FIELDS = {
    "degradation_prob": "data.degrade_prob", "global_batch_size": "data.batch_size",
    "global_seed": "seed", "lr": "optim.learning_rate", "beta1": "optim.b1", "beta2": "optim.b2",
    "weight_decay": "optim.weight_decay", "max_grad_norm": "optim.grad_clip",
    "reconstruction_weight": "loss.mse_weight", "perceptual_weight": "loss.lpips_weight",
    "perceptual_warmup": "loss.lpips_warmup_steps", "disc_weight": "loss.gan_weight",
    "disc_start": "loss.gan_start_step", "lecam_loss_weight": "loss.lecam_weight",
    "disc_cr_loss_weight": "loss.consistency_weight", "use_diff_aug": "loss.diff_augment",
    "global_token_loss_weight": "loss.align_weight",
    "dynamic_resolution_prob": "data.dynamic_resolution_prob",
    "max_resolution_prob": "data.max_resolution_prob",
    "adjust_bs_by_resolution": "data.reduce_batch_at_large_sizes",
}
GPT_TRAIN_FIELDS = {
    "global_batch_size": "data.batch_size", "global_seed": "seed", "lr": "optim.learning_rate",
    "weight_decay": "optim.weight_decay", "beta1": "optim.b1", "beta2": "optim.b2",
    "max_grad_norm": "optim.grad_clip",
}
# The official EMA decay (fixed in its trainers): what `ema: true` in config.yaml means.
OFFICIAL_EMA_DECAY = 0.9999


# ----------------------------------------------------------------------------- tokenizer config

def official_tower(tower):
  """(model name, pretrained) the official builder uses for one of our ViT tower configs."""
  dims = (tower.width, tower.depth, tower.num_heads, tower.mlp_dim)
  if tower.pos_grid == OFFICIAL_POS_GRID and tower.layer_norm_eps == OFFICIAL_LAYER_NORM_EPS:
    for key, official_dims in OFFICIAL_TOWERS.items():
      if official_dims == dims:
        return key
  return CUSTOM_TOWER, False


def tokenizer_model_args(c):
  """Official tokenizer ModelArgs (config.json) for our `tokenizer` config section."""
  if c.get("latent_mask", "group_causal") != "group_causal":
    # The official causal_encoder=False is full attention (patches see latents too), not this.
    raise ValueError(f"latent_mask={c.latent_mask!r} has no official equivalent; only "
                     "'group_causal' tokenizers can be exported")
  enc_model, enc_pretrained = official_tower(c.encoder)
  dec_model, dec_pretrained = official_tower(c.decoder)
  return dict(
      image_size=c.image_size, max_image_size=c.image_size, codebook_size=c.codebook_size,
      codebook_embed_dim=c.codebook_dim, codebook_l2_norm=True, codebook_show_usage=True,
      commit_loss_beta=c.commitment_beta, entropy_loss_ratio=0.0, vq_loss_ratio=1.0,
      kl_loss_weight=1e-06, tau=0.1, num_codebooks=1, encoder_ch_mult=[1, 1, 2, 2, 4],
      decoder_ch_mult=[1, 1, 2, 2, 4], z_channels=256, dropout_p=0.0, enc_type="siglip2",
      dec_type="siglip2", encoder_model=enc_model, decoder_model=dec_model,
      num_latent_tokens=c.num_tokens, enc_tuning_method="full", dec_tuning_method="full",
      enc_pretrained=enc_pretrained, dec_pretrained=dec_pretrained,
      enc_patch_size=c.encoder.patch_size, dec_patch_size=c.decoder.patch_size,
      enc_drop_path_rate=0.0, dec_drop_path_rate=0.0, repa=False, repa_patch_size=16,
      repa_model="vit_base_patch16_224", repa_proj_dim=2048, repa_layer_indices=1,
      repa_loss_weight=0.1, repa_align="global", vq_mean=0.0, vq_std=1.0, causal_encoder=True,
      causal_decoder=False, gradient_checkpointing_encoder=False,
      gradient_checkpointing_decoder=False, group_size=c.group_size, causal_num=c.causal_num,
      # 0: the exported model has no SigLIP2 feature model for the official one to build.
      global_token_loss_weight=0.0, correction_training=True)


def _get_path(config, path):
  node = config
  for name in path.split("."):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or name not in node:
      return None
    node = node[name]
  return node


def plain(value):
  """yaml/json-safe Python value (numpy scalars and ConfigDicts become plain types)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: plain(v) for k, v in dict(value).items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _train_args(config, fields):
  out = {}
  for name, path in fields.items():
    value = _get_path(config, path)
    if value is not None:
      out[name] = plain(value)
  return out


def tokenizer_train_args(config, has_ema):
  """config.yaml content for a tokenizer run (config: our whole training config)."""
  c = config.tokenizer
  enc_model, enc_pretrained = official_tower(c.encoder)
  dec_model, dec_pretrained = official_tower(c.decoder)
  args = dict(
      vq_model="VQ-16", image_size=c.image_size, max_image_size=c.image_size,
      min_image_size=dynamic_resolution.min_image_size(c), content_degradation="resolution_power",
      degradation_power=c.degradation_power, dynamic_resolution_prob=0,
      num_latent_tokens=c.num_tokens, group_size=c.group_size, causal_num=c.causal_num,
      codebook_size=c.codebook_size, codebook_embed_dim=c.codebook_dim,
      commit_loss_beta=c.commitment_beta, entropy_loss_ratio=0.0, vq_loss_ratio=1.0,
      num_codebooks=1, codebook_l2_norm=True, enc_type="siglip2", encoder_model=enc_model,
      encoder_pretrained=enc_pretrained, encoder_patch_size=c.encoder.patch_size,
      encoder_tuning_method="full", dec_type="siglip2", decoder_model=dec_model,
      decoder_pretrained=dec_pretrained, decoder_patch_size=c.decoder.patch_size,
      decoder_tuning_method="full", causal_encoder=True, causal_decoder=False,
      correction_training=True, ema=bool(has_ema))
  args.update(_train_args(config, TOKENIZER_TRAIN_FIELDS))
  compute = _get_path(config, "train.compute_dtype")
  args["mixed_precision"] = "bf16" if compute == "bfloat16" else "none"
  args[JAX_CONFIG_KEY] = plain(c)
  return args


def _isqrt_exact(n, what):
  root = math.isqrt(int(n))
  if root * root != n:
    raise ValueError(f"{what} ({n}) is not a square number")
  return root


def _layer_count(state_dict, prefix):
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
  if not found:
    raise ValueError(f"state dict has no tensors '{prefix}<i>.*'")
  return max(found) + 1


def _need(state_dict, key):
  if key not in state_dict:
    raise ValueError(f"state dict has no tensor {key}: it is not a DetailFlow tokenizer state dict")
  return np.shape(state_dict[key])


def _tower_from_shapes(state_dict, side, patch_size):
  prefix = f"{side}.visual_model."
  if side == "encoder":
    width = _need(state_dict, "encoder.latent_tokens")[-1]
  else:
    width = _need(state_dict, "decoder.mask_token")[-1]
  positions = _need(state_dict, prefix + "embeddings.position_embedding.weight")[0]
  return dict(
      width=int(width), depth=_layer_count(state_dict, prefix + "encoder.layers."),
      mlp_dim=int(_need(state_dict, prefix + "encoder.layers.0.mlp.fc1.weight")[0]),
      patch_size=int(patch_size),
      pos_grid=_isqrt_exact(positions, f"{side} position table rows"))


def _check_supported(model_args, name, supported):
  if name in model_args and model_args[name] not in supported:
    raise ValueError(f"official config.json has {name}={model_args[name]!r}; only "
                     f"{supported} is supported by this implementation")


def tokenizer_config_from_official(model_args, train_args, state_dict):
  """Our `tokenizer` config section from an official run: config.json fields, the tensor shapes
  and config.yaml (its jax_config, when we wrote it). Returns (config, unresolved) where
  unresolved lists the keys nothing determined (head counts of towers of a custom size)."""
  for name, supported in (("enc_type", ("siglip2",)), ("dec_type", ("siglip2",)),
                          ("codebook_l2_norm", (True,)), ("num_codebooks", (1,)),
                          ("repa", (False,)), ("causal_encoder", (True,)),
                          ("causal_decoder", (False,))):
    _check_supported(model_args, name, supported)
  c = defaults.tokenizer_model_config()
  saved = train_args.get(JAX_CONFIG_KEY) or {}
  for key, value in saved.items():
    if key in c:
      c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  unresolved = []
  group = int(model_args["group_size"])
  c.image_size = int(model_args.get("image_size", train_args.get("image_size", c.image_size)))
  c.num_tokens = int(model_args["num_latent_tokens"])
  c.group_size = group
  c.causal_num = int(model_args.get("causal_num") or group)   # official: None means g
  c.codebook_size = int(model_args["codebook_size"])
  c.codebook_dim = int(model_args["codebook_embed_dim"])
  c.commitment_beta = float(model_args.get("commit_loss_beta", c.commitment_beta))
  if "degradation_power" in train_args:
    c.degradation_power = float(train_args["degradation_power"])
  if "min_image_size" not in saved and int(train_args.get("min_image_size") or 0) < c.image_size:
    c.min_image_size = int(train_args.get("min_image_size") or 0)   # an any-resolution run
  if "min_decoder_size" not in saved:
    # The official R(n) schedule uses the decoder patch as its minimum output size.
    c.min_decoder_size = int(model_args.get("dec_patch_size", c.decoder.patch_size))
  patch = {"encoder": model_args.get("enc_patch_size"), "decoder": model_args.get("dec_patch_size")}
  for side, prefix in (("encoder", "enc"), ("decoder", "dec")):
    tower = _tower_from_shapes(state_dict, side, patch[side])
    key = (model_args.get(f"{side}_model"), bool(model_args.get(f"{prefix}_pretrained")))
    if key in OFFICIAL_TOWERS:
      width, depth, heads, mlp = OFFICIAL_TOWERS[key]
      if (tower["width"], tower["depth"], tower["mlp_dim"]) != (width, depth, mlp):
        raise ValueError(
            f"config.json says {side}_model={key[0]!r} ({prefix}_pretrained={key[1]}), a "
            f"{width}-wide, {depth}-layer tower with MLP {mlp}, but the state dict's {side} is "
            f"{tower['width']} wide with {tower['depth']} layers and MLP {tower['mlp_dim']}")
      tower["num_heads"] = heads
      tower["layer_norm_eps"] = OFFICIAL_LAYER_NORM_EPS
    elif side in saved:
      tower["num_heads"] = saved[side]["num_heads"]
    else:
      unresolved.append(f"{side}.num_heads")
    c[side].update(tower)
  return c, unresolved


# ----------------------------------------------------------------------------- GPT config

def _multiple_of_for(dim, ffn_hidden):
  """An official `multiple_of` whose SwiGLU rounding of `dim` gives `ffn_hidden`."""
  for multiple in (256, 128, 64, 32, 16, 8, 4, 2, 1, ffn_hidden):
    if gpt_lib.ffn_hidden_size(dim, multiple) == ffn_hidden:
      return multiple
  raise ValueError(f"ffn hidden size {ffn_hidden} < {int(8 * dim / 3)} cannot be expressed by "
                   f"the official FeedForward (dim={dim})")


def official_gpt_name(config):
  dims = (config.num_layers, config.dim, config.num_heads)
  for name, official_dims in OFFICIAL_GPT_SIZES.items():
    if official_dims == dims:
      return name
  return CUSTOM_GPT


def gpt_model_args(config):
  """Official GPT ModelArgs (config.json) for a GPTConfig."""
  return dict(
      dim=config.dim, n_layer=config.num_layers, n_head=config.num_heads, n_kv_head=None,
      multiple_of=_multiple_of_for(config.dim, config.ffn_hidden), ffn_dim_multiplier=None,
      rope_base=plain(config.rope_base), norm_eps=config.norm_eps, initializer_range=0.02,
      token_dropout_p=config.token_dropout, attn_dropout_p=0.0,
      resid_dropout_p=config.resid_dropout, ffn_dropout_p=config.ffn_dropout,
      drop_path_rate=0.0, num_classes=config.num_classes, caption_dim=2048,
      class_dropout_prob=config.class_dropout_prob, model_type="c2i",
      vocab_size=config.vocab_size, cls_token_num=config.cls_token_num,
      block_size=config.block_size, max_batch_size=32, max_seq_len=2048,
      learnable_tok_embeddings=True, group_size=config.group_size, causal_num=config.causal_num)


def gpt_train_args(config, gpt_config, has_ema):
  """config.yaml content for an AR run (config: our whole training config)."""
  args = dict(
      gpt_model=official_gpt_name(gpt_config), gpt_type="c2i",
      cls_token_num=gpt_config.cls_token_num, num_classes=gpt_config.num_classes,
      dropout_p=gpt_config.resid_dropout, token_dropout_p=gpt_config.token_dropout,
      drop_path_rate=0.0, ema=bool(has_ema), learnable_tok_embeddings=True)
  args.update(_train_args(config, GPT_TRAIN_FIELDS))
  args["mixed_precision"] = "bf16" if gpt_config.dtype == "bfloat16" else "none"
  args[JAX_CONFIG_KEY] = plain(gpt_config.to_dict())
  return args


def gpt_config_from_official(model_args, train_args):
  """GPTConfig fields (dict) from config.json; the compute dtype from our jax_config if any."""
  fields = gpt_lib.GPTConfig().to_dict()
  saved = train_args.get(JAX_CONFIG_KEY) or {}
  if "dtype" in saved:
    fields["dtype"] = saved["dtype"]
  fields.update(gpt_state_dict.gpt_config_from_official_args(model_args))
  return fields


# ----------------------------------------------------------------------------- our config <-> yaml

def coerce(value, like):
  # PyYAML reads "5e-2" (no dot) as a string; the official yaml writer leaves such numbers.
  if isinstance(like, bool):
    return bool(value)
  if isinstance(like, int) and not isinstance(value, bool):
    return int(value)
  if isinstance(like, float):
    return float(value)
  return value


def apply_train_args(config, train_args, kind):
  """Copies the config.yaml training fields we have an equivalent for into our config."""
  fields = TOKENIZER_TRAIN_FIELDS if kind == TOKENIZER else GPT_TRAIN_FIELDS
  for name, path in fields.items():
    if name not in train_args or train_args[name] is None:
      continue
    *parents, leaf = path.split(".")
    node = _get_path(config, ".".join(parents)) if parents else config
    if node is None or leaf not in node:
      continue
    try:
      node[leaf] = coerce(train_args[name], node[leaf])
    except (TypeError, ValueError):
      pass   # a value of another type than ours (e.g. a custom scheduler name): keep ours
  if "ema" in train_args:
    config.train.ema_decay = OFFICIAL_EMA_DECAY if train_args["ema"] else 0.0
  return config


def run_kind(model_args, train_args):
  """"tokenizer" or "gpt" for an official run's configs."""
  if "vq_model" in train_args:
    return TOKENIZER
  if "gpt_model" in train_args:
    return GPT
  if "n_layer" in model_args:
    return GPT
  if "num_latent_tokens" in model_args and "codebook_size" in model_args:
    return TOKENIZER
  raise ValueError("cannot tell whether this run is a tokenizer or a GPT: config.yaml has "
                   "neither vq_model nor gpt_model and config.json matches neither ModelArgs")


def state_dict_kind(state_dict):
  keys = [strip_wrappers(k) for k in state_dict]
  if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in keys):
    return TOKENIZER
  if any(k.startswith(("tok_embeddings.", "cls_embedding.", "layers.")) for k in keys):
    return GPT
  return None


def strip_wrappers(key):
  changed = True
  while changed:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key
