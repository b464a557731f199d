"""SigLIP2 vision tower: loaders (HF safetensors, big_vision npz) on tiny random files, a numpy
reference forward, the alignment-target quirk and the tokenizer encoder init."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from detailflow_jax.models import siglip2

# Tiny tower: width 32, 3 layers, 2 heads, MLP 48, 4x4 patches, 4x4 position table.
WIDTH, DEPTH, HEADS, MLP, PATCH, GRID = 32, 3, 2, 48, 4, 4


def tiny_hf_state_dict(seed=0):
  rng = np.random.RandomState(seed)
  r = lambda *shape: (0.3 * rng.randn(*shape)).astype(np.float32)
  p = "vision_model."
  sd = {p + "embeddings.patch_embedding.weight": r(WIDTH, PATCH * PATCH * 3),
        p + "embeddings.patch_embedding.bias": r(WIDTH),
        p + "embeddings.position_embedding.weight": r(GRID * GRID, WIDTH),
        p + "post_layernorm.weight": 1 + r(WIDTH), p + "post_layernorm.bias": r(WIDTH),
        # not vision tower tensors: skipped by the loader
        p + "head.probe": r(1, 1, WIDTH), "logit_scale": r(1),
        "text_model.final_layer_norm.weight": r(WIDTH)}
  for i in range(DEPTH):
    q = f"{p}encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      sd[q + f"self_attn.{proj}.weight"] = r(WIDTH, WIDTH)
      sd[q + f"self_attn.{proj}.bias"] = r(WIDTH)
    for ln in ("layer_norm1", "layer_norm2"):
      sd[q + f"{ln}.weight"] = 1 + r(WIDTH)
      sd[q + f"{ln}.bias"] = r(WIDTH)
    sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"] = r(MLP, WIDTH), r(MLP)
    sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"] = r(WIDTH, MLP), r(WIDTH)
  return sd


def to_big_vision(sd, scanned=False):
  """The same weights in big_vision's npz naming (the inverse of the documented mapping)."""
  p, hd = "vision_model.", WIDTH // HEADS
  bv = {"params/img/embedding/kernel": sd[p + "embeddings.patch_embedding.weight"].T,
        "params/img/embedding/bias": sd[p + "embeddings.patch_embedding.bias"],
        "params/img/pos_embedding": sd[p + "embeddings.position_embedding.weight"][None],
        "params/img/Transformer/encoder_norm/scale": sd[p + "post_layernorm.weight"],
        "params/img/Transformer/encoder_norm/bias": sd[p + "post_layernorm.bias"],
        "params/img/MAPHead_0/probe": sd[p + "head.probe"], "params/t": sd["logit_scale"]}
  layers = []
  for i in range(DEPTH):
    q = f"{p}encoder.layers.{i}."
    layer = {}
    for bv_name, hf_name in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
      layer[f"{bv_name}/scale"] = sd[q + f"{hf_name}.weight"]
      layer[f"{bv_name}/bias"] = sd[q + f"{hf_name}.bias"]
    for bv_name, hf_name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      layer[f"MlpBlock_0/{bv_name}/kernel"] = sd[q + f"mlp.{hf_name}.weight"].T
      layer[f"MlpBlock_0/{bv_name}/bias"] = sd[q + f"mlp.{hf_name}.bias"]
    for bv_name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      layer[f"MultiHeadDotProductAttention_0/{bv_name}/kernel"] = \
          sd[q + f"self_attn.{proj}.weight"].T.reshape(WIDTH, HEADS, hd)
      layer[f"MultiHeadDotProductAttention_0/{bv_name}/bias"] = \
          sd[q + f"self_attn.{proj}.bias"].reshape(HEADS, hd)
    layer["MultiHeadDotProductAttention_0/out/kernel"] = \
        sd[q + "self_attn.out_proj.weight"].T.reshape(HEADS, hd, WIDTH)
    layer["MultiHeadDotProductAttention_0/out/bias"] = sd[q + "self_attn.out_proj.bias"]
    layers.append(layer)
  if scanned:
    for name in layers[0]:
      bv[f"params/img/Transformer/encoderblock/{name}"] = np.stack([l[name] for l in layers])
  else:
    for i, layer in enumerate(layers):
      bv.update({f"params/img/Transformer/encoderblock_{i}/{k}": v for k, v in layer.items()})
  return bv


def numpy_tower(sd, images, repeat_post_layernorm):
  """Hugging Face Siglip2 vision forward (plus the reference's second post-LN) in numpy."""
  p, b = "vision_model.", images.shape[0]
  g = images.shape[1] // PATCH
  patches = images.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, g * g, -1)
  h = (patches @ sd[p + "embeddings.patch_embedding.weight"].T
       + sd[p + "embeddings.patch_embedding.bias"])
  h = h + sd[p + "embeddings.position_embedding.weight"]        # grid == table: no resize

  def ln(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

  lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  split = lambda v: v.reshape(b, -1, HEADS, WIDTH // HEADS).transpose(0, 2, 1, 3)
  for i in range(DEPTH):
    q = f"{p}encoder.layers.{i}."
    y = ln(h, q + "layer_norm1")
    qh, kh, vh = (split(lin(y, q + f"self_attn.{n}")) for n in ("q_proj", "k_proj", "v_proj"))
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(WIDTH // HEADS)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = ((s / s.sum(-1, keepdims=True)) @ vh).transpose(0, 2, 1, 3).reshape(b, -1, WIDTH)
    h = h + lin(a, q + "self_attn.out_proj")
    h = h + lin(gelu(lin(ln(h, q + "layer_norm2"), q + "mlp.fc1")), q + "mlp.fc2")
  h = ln(h, p + "post_layernorm")
  return ln(h, p + "post_layernorm") if repeat_post_layernorm else h


@pytest.fixture(scope="module")
def weight_paths(tmp_path_factory):
  folder = tmp_path_factory.mktemp("siglip2")
  sd = tiny_hf_state_dict()
  paths = {"hf": str(folder / "model.safetensors"), "bv": str(folder / "siglip2.npz"),
           "bv_scan": str(folder / "siglip2_scan.npz")}
  save_file(sd, paths["hf"])
  np.savez(paths["bv"], **to_big_vision(sd))
  np.savez(paths["bv_scan"], **to_big_vision(sd, scanned=True))
  return sd, paths


@pytest.fixture(scope="module")
def features_fn():
  return jax.jit(lambda p, x: (siglip2.siglip2_features(p, x, num_heads=HEADS),
                               siglip2.siglip2_features(p, x, num_heads=HEADS,
                                                        repeat_post_layernorm=False)))


def test_formats_load_the_same_params(weight_paths):
  sd, paths = weight_paths
  ref = siglip2.load_siglip2_params(paths["hf"])
  assert len([k for k in ref["transformer"] if k.startswith("layers_")]) == DEPTH
  np.testing.assert_array_equal(ref["transformer"]["layers_1"]["self_attn"]["q_proj"]["kernel"],
                                sd["vision_model.encoder.layers.1.self_attn.q_proj.weight"].T)
  for name in ("bv", "bv_scan"):
    other = siglip2.load_siglip2_params(paths[name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, other, ref)
  two = siglip2.load_siglip2_params(paths["bv"], num_layers=2)
  assert sorted(two["transformer"]) == ["layers_0", "layers_1", "post_layernorm"]


def test_features_match_numpy_reference(weight_paths, features_fn):
  sd, paths = weight_paths
  params = siglip2.load_siglip2_params(paths["hf"])
  images = np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  target, plain = features_fn(params, images)
  assert target.shape == (2, GRID * GRID, WIDTH)
  np.testing.assert_allclose(plain, numpy_tower(sd, images, False), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(target, numpy_tower(sd, images, True), rtol=1e-4, atol=1e-4)
  tower = siglip2.tower_from_params(params, num_heads=HEADS)
  assert (tower.width, tower.depth, tower.mlp_dim, tower.patch_size, tower.pos_grid) == \
      (WIDTH, DEPTH, MLP, PATCH, GRID)


def test_conv_patch_embedding_is_flattened_in_patch_order(tmp_path, weight_paths):
  sd, _ = weight_paths
  linear = sd["vision_model.embeddings.patch_embedding.weight"]           # (D, P*P*3) (i, j, c)
  conv = linear.reshape(WIDTH, PATCH, PATCH, 3).transpose(0, 3, 1, 2)    # Conv2d (D, 3, P, P)
  path = str(tmp_path / "conv.safetensors")
  save_file({**sd, "vision_model.embeddings.patch_embedding.weight": np.ascontiguousarray(conv)}, path)
  state = siglip2.read_siglip2_vision_state_dict(path)
  np.testing.assert_array_equal(state["vision_model.embeddings.patch_embedding.weight"], linear)


def test_encoder_init_for_the_tokenizer(weight_paths):
  _, paths = weight_paths
  enc = ml_collections.ConfigDict(dict(width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=MLP,
                                       patch_size=PATCH, pos_grid=GRID, layer_norm_eps=1e-6))
  cfg = ml_collections.ConfigDict(dict(encoder=enc))
  init = siglip2.siglip2_encoder_init(paths["hf"], cfg)
  assert sorted(init) == ["embeddings", "transformer"]
  assert sorted(init["transformer"]) == ["layers_0", "layers_1", "post_layernorm"]
  assert init["embeddings"]["patch_embedding"]["kernel"].shape == (PATCH * PATCH * 3, WIDTH)
  official = siglip2.siglip2_encoder_state_dict(paths["hf"], depth=2)
  assert "encoder.visual_model.encoder.layers.1.mlp.fc2.bias" in official
  assert not any(".layers.2." in k or "head" in k for k in official)
  enc.patch_size = 8          # another patch size: the patch embedding stays fresh
  assert "patch_embedding" not in siglip2.siglip2_encoder_init(paths["hf"], cfg)["embeddings"]
  enc.width = 64
  with pytest.raises(ValueError, match="tokenizer encoder config wants"):
    siglip2.siglip2_encoder_init(paths["hf"], cfg)


def test_missing_and_wrong_files(tmp_path):
  missing = str(tmp_path / "siglip2.safetensors")
  with pytest.raises(FileNotFoundError, match=r"siglip2\.safetensors.*loss\.siglip_weights"):
    siglip2.load_siglip2_params(missing)
  with pytest.raises(FileNotFoundError, match="loss.siglip_weights"):
    siglip2.load_siglip2_params("")
  other = str(tmp_path / "other.safetensors")
  save_file({"text_model.x": np.zeros(2, np.float32)}, other)
  with pytest.raises(ValueError, match="holds no SigLIP2 vision tower"):
    siglip2.load_siglip2_params(other)


def test_feature_model_and_full_tokenizer_init(weight_paths, monkeypatch):
  from detailflow_jax.config import defaults
  from detailflow_jax.models import tokenizer as tokenizer_lib
  sd, paths = weight_paths
  model = siglip2.load_feature_model(paths["bv"], num_heads=HEADS)
  assert model.width == WIDTH
  images = np.random.RandomState(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(model.features)(model.params, images)[0],
                             numpy_tower(sd, images, True)[0], rtol=1e-4, atol=1e-4)

  cfg = defaults.tokenizer_model_config()
  cfg.image_size, cfg.num_tokens, cfg.codebook_size = 16, 16, 64
  cfg.encoder.update(width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=MLP, patch_size=PATCH,
                     pos_grid=GRID)
  cfg.decoder.update(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=PATCH, pos_grid=GRID)
  # Fresh tokenizer params are zeros of the right shapes here: compiling the real random init
  # is the tokenizer tests' job, the merge is this one's.
  shapes = tokenizer_lib.param_shapes(cfg)
  monkeypatch.setattr(tokenizer_lib, "init_params", lambda config, rng: jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), shapes))
  params = siglip2.tokenizer_params_with_siglip_encoder(paths["hf"], cfg, jax.random.PRNGKey(0))
  enc = params["encoder"]
  np.testing.assert_array_equal(enc["transformer"]["layers_1"]["mlp"]["fc2"]["kernel"],
                                sd["vision_model.encoder.layers.1.mlp.fc2.weight"].T)
  np.testing.assert_array_equal(enc["embeddings"]["position_embedding"]["embedding"],
                                sd["vision_model.embeddings.position_embedding.weight"])
  assert "layers_2" not in enc["transformer"] and "decoder" in params
  assert not np.any(enc["latent_tokens"])        # the rest stays as initialised
  jax.tree_util.tree_map(lambda a, s: np.testing.assert_equal(a.shape, s.shape), params, shapes)
