"""The tokenizer's latent_mask switch (the study's bidirectional arm, docs/reproduction.md):
what encoding and decoding a prefix mean under each mask, on a tiny random tokenizer."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.interop import official_config
from detailflow_jax.models import tokenizer as tokenizer_lib
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "configs"))
import tokenizer_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny(latent_mask):
  c = tokenizer_tiny.get_config("smoke").tokenizer
  c.latent_mask = latent_mask
  return c


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)


def encode(config, params, images, num_latents=None):
  model = tokenizer_lib.DetailFlowTokenizer(config)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, num_latents, method="encode"))(
      params, images)


def test_prefix_encoding_under_each_mask(images):
  """Group-causal: the first m latents of a full encode equal an encode with only m queries, so
  a prefix is self-contained. Bidirectional: they differ (the first tokens see the later
  queries); a prefix means the first n codes of the full N-token encoding, which the decoder
  still decodes as trained."""
  params = tokenizer_lib.init_params(tiny("group_causal"), jax.random.PRNGKey(0))
  for mask, same in (("group_causal", True), ("bidirectional", False)):
    config = tiny(mask)
    full = encode(config, params, images)["enc_latent"]
    short = encode(config, params, images, num_latents=8)["enc_latent"]
    assert full.shape == (2, 32, 32) and short.shape == (2, 8, 32)
    gap = float(jnp.max(jnp.abs(full[:, :8] - short)))
    assert (gap < 1e-5) if same else (gap > 1e-3), (mask, gap)
  # Same params, only the mask differs: the latents differ, the decoder reads any prefix.
  causal = encode(tiny("group_causal"), params, images)
  both = encode(tiny("bidirectional"), params, images)
  assert float(jnp.max(jnp.abs(causal["enc_latent"] - both["enc_latent"]))) > 1e-3
  model = tokenizer_lib.DetailFlowTokenizer(tiny("bidirectional"))
  decoded = jax.jit(lambda p, q: model.apply({"params": p}, q, 4, 16, method="decode"))(
      params, both["quant"])
  assert decoded.shape == (2, 16, 16, 3) and bool(jnp.isfinite(decoded).all())


def test_latent_mask_is_checked_and_not_exported(images):
  with pytest.raises(ValueError, match="latent_mask"):
    tokenizer_lib.init_params(tiny("causal"), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="no official equivalent"):
    official_config.tokenizer_model_args(tiny("bidirectional"))
  assert official_config.tokenizer_model_args(tiny("group_causal"))["causal_encoder"] is True
  # A config saved before the key existed builds the group-causal model.
  old = tiny("group_causal")
  del old["latent_mask"]
  assert tokenizer_lib.latent_mask(old) == "group_causal"
  params = tokenizer_lib.init_params(old, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(encode(old, params, images)["indices"],
                                encode(tiny("group_causal"), params, images)["indices"])
