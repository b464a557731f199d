"""The public API: encode / decode / sample on tiny random models; shapes and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detailflow_jax as dfj
from detailflow_jax import detail
from detailflow_jax.config.files import load_config_file
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.models import tokenizer as tokenizer_model

@pytest.fixture(scope="module")
def tokenizer():
  import pathlib  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  config = load_config_file(str(repo / "configs" / "tokenizer_tiny.py") + ":smoke").tokenizer
  params = tokenizer_model.init_params(config, jax.random.PRNGKey(0))
  return dfj.tokenizer_params(params, config)


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)


def test_encode_returns_codes_in_the_codebook(tokenizer, images):
  codes = dfj.encode(tokenizer, images)
  assert codes.shape == (2, tokenizer.config.num_tokens) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < tokenizer.config.codebook_size
  np.testing.assert_array_equal(codes, dfj.encode(tokenizer, images))  # deterministic


def test_decode_gives_the_resolution_of_the_prefix(tokenizer, images):
  codes = dfj.encode(tokenizer, images)
  schedule = detail.resolution_schedule(tokenizer.config)
  for n in (1, 4, 8, tokenizer.config.num_tokens):
    out = dfj.decode(tokenizer, codes, num_tokens=n)
    d = schedule.decoder_size(n)
    assert out.shape == (2, d, d, 3)
  full = dfj.decode(tokenizer, codes)
  assert full.shape == (2, 32, 32, 3)
  # Only the first n codes matter: changing the rest leaves the decode unchanged.
  changed = codes.at[:, 8:].set((codes[:, 8:] + 1) % tokenizer.config.codebook_size)
  np.testing.assert_allclose(dfj.decode(tokenizer, changed, num_tokens=8),
                             dfj.decode(tokenizer, codes, num_tokens=8), rtol=1e-6, atol=1e-6)
  # A prefix alone decodes the same as the full sequence cut at n.
  np.testing.assert_allclose(dfj.decode(tokenizer, codes[:, :8], num_tokens=8),
                             dfj.decode(tokenizer, codes, num_tokens=8), rtol=1e-6, atol=1e-6)


def test_decode_rejects_token_counts_off_the_list(tokenizer, images):
  codes = dfj.encode(tokenizer, images)
  with pytest.raises(ValueError, match=r"num_tokens=5 .*valid: \[1, 2, 3, 4, 8"):
    dfj.decode(tokenizer, codes, num_tokens=5)


def test_encode_rejects_bad_shapes(tokenizer):
  with pytest.raises(ValueError, match="NHWC"):
    dfj.encode(tokenizer, jnp.zeros((2, 3, 32, 32)))


def test_sample_returns_images_at_the_prefix_resolution(tokenizer):
  gcfg = gpt_model.GPTConfig(vocab_size=tokenizer.config.codebook_size, num_layers=1, dim=32,
                             num_heads=2, num_classes=10, block_size=tokenizer.config.num_tokens,
                             group_size=4, causal_num=4)
  gpt_params = gpt_model.init_params(gcfg, jax.random.PRNGKey(2))
  params = dfj.SamplerParams(tokenizer=tokenizer, gpt=gpt_params, gpt_config=gcfg)
  labels = jnp.array([0, 3])
  full = dfj.sample(params, labels, rng=jax.random.PRNGKey(0))
  assert full.shape == (2, 32, 32, 3)
  assert float(full.min()) >= -1 and float(full.max()) <= 1
  coarse = dfj.sample(params, labels, rng=jax.random.PRNGKey(0), num_tokens=8)
  d = detail.resolution_schedule(tokenizer.config).decoder_size(8)
  assert coarse.shape == (2, d, d, 3)
  with pytest.raises(ValueError, match="num_classes|range"):
    dfj.sample(params, jnp.array([10]), rng=jax.random.PRNGKey(0))


def test_check_pairing_names_the_mismatch(tokenizer):
  gcfg = gpt_model.GPTConfig(vocab_size=999, num_layers=1, dim=32, num_heads=2, num_classes=10,
                             block_size=tokenizer.config.num_tokens, group_size=4, causal_num=4)
  with pytest.raises(ValueError, match=r"codebook_size \(64, 999\)"):
    dfj.api.check_pairing(tokenizer.config, gcfg)
