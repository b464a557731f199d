"""SigLIP2 ViT blocks: position-table resizing, patch order, and a tower against official outputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.interop import tokenizer_state_dict as sd_lib
from detailflow_jax.models import vit
from tests.conftest import max_relative_error

TOLERANCE = 1e-4


@pytest.mark.parametrize("tower,prefix", [("enc", "encoder"), ("dec", "decoder")])
def test_resize_position_table_matches_official(parity_tokenizer, tower, prefix):
  table = parity_tokenizer.state_dict[f"{prefix}.visual_model.embeddings.position_embedding.weight"]
  # Every grid the fixture recorded for this tower: posemb_<tower>_grid<n>.
  grids = [int(key[len(f"posemb_{tower}_grid"):]) for key in parity_tokenizer.io
           if key.startswith(f"posemb_{tower}_grid")]
  if not grids:
    pytest.skip(f"{parity_tokenizer.folder} records no posemb_{tower}_grid* table")
  for n in grids:
    key = f"posemb_{tower}_grid{n}"
    ours = vit.resize_position_table(table, n, n)
    assert max_relative_error(ours, parity_tokenizer.io[key]) <= TOLERANCE, key


def test_resize_position_table_identity_and_rectangular():
  table = np.random.RandomState(0).randn(16, 5).astype(np.float32)
  np.testing.assert_array_equal(vit.resize_position_table(table, 4, 4), table)
  assert vit.resize_position_table(table, 2, 6).shape == (12, 5)
  with pytest.raises(ValueError, match="not a square grid"):
    vit.resize_position_table(table[:15], 4, 4)
  with pytest.raises(ValueError, match="grid_h must be a positive integer"):
    vit.resize_position_table(table, 0, 4)


def test_patchify_order_and_inverse():
  images = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  patches = vit.patchify(images, 2)
  assert patches.shape == (2, 6, 12)
  # Patch (row 1, col 2) is index 1*3+2 = 5; its vector is (row-in-patch, col-in-patch, channel).
  np.testing.assert_array_equal(patches[1, 5], images[1, 2:4, 4:6, :].reshape(-1))
  np.testing.assert_array_equal(vit.unpatchify(patches, 2, 3, 2), images)
  with pytest.raises(ValueError, match="multiple of patch_size=4"):
    vit.patchify(images, 4)


def test_mask_blocks_keys():
  model = vit.SiglipTransformer(width=8, depth=1, num_heads=2, mlp_dim=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 8))
  # init returns params boxed with their logical axes (train/sharding.py); unbox for values.
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), x))
  # Hugging Face SigLIP init: zero attention biases, ~1e-6 MLP biases, LayerNorm (1, 0).
  layer = params["params"]["layers_0"]
  assert not np.any(layer["self_attn"]["q_proj"]["bias"])
  assert 0 < np.abs(layer["mlp"]["fc1"]["bias"]).max() < 1e-5
  np.testing.assert_array_equal(layer["layer_norm1"]["scale"], 1.0)
  # Queries 0..2 may only see keys 0..2: changing tokens 3, 4 must not change outputs 0..2.
  mask = np.ones((5, 5), bool)
  mask[:3, 3:] = False
  apply = jax.jit(model.apply)
  y1 = apply(params, x, mask)
  y2 = apply(params, x.at[:, 3:].set(7.0), mask)
  np.testing.assert_allclose(y1[:, :3], y2[:, :3], rtol=0, atol=1e-6)
  assert not np.allclose(y1[:, 3:], y2[:, 3:])
  with pytest.raises(ValueError, match="mask must be boolean"):
    model.apply(params, x, mask.astype(np.float32))


def test_encoder_tower_patch_tokens_match_official(parity_tokenizer):
  """The official encoder's patch rows only attend to patches, so a patches-only pass through
  embeddings + transformer must reproduce `enc_patch_hidden`."""
  cfg = parity_tokenizer.config
  sd = parity_tokenizer.state_dict
  enc = cfg["encoder"]
  prefix = "encoder.visual_model."
  highest = jax.lax.Precision.HIGHEST  # full float32 matmuls on accelerators too
  embeddings = vit.SiglipPatchEmbeddings(enc["width"], enc["patch_size"], cfg["pos_emb_grid"],
                                         precision=highest)
  transformer = vit.SiglipTransformer(enc["width"], enc["layers"], enc["heads"], enc["mlp"],
                                      cfg["layer_norm_eps"], precision=highest)
  emb_params = sd_lib.siglip_embeddings_params_from_state_dict(sd, prefix)
  tr_params = sd_lib.siglip_transformer_params_from_state_dict(sd, prefix)
  assert len([k for k in tr_params if k.startswith("layers_")]) == enc["layers"]
  images = jnp.asarray(parity_tokenizer.io["x"]).transpose(0, 2, 3, 1)
  tokens, grid = embeddings.apply({"params": emb_params}, images)
  side = cfg["image_size"] // enc["patch_size"]
  assert grid == (side, side)
  hidden = transformer.apply({"params": tr_params}, tokens)
  err = max_relative_error(hidden, parity_tokenizer.io["enc_patch_hidden"])
  print(f"enc_patch_hidden max relative error {err:.2e}")
  assert err <= TOLERANCE
