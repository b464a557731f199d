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


# Any-resolution: a tiny tokenizer that supports every side from 16 to 32 px. Token counts per
# side by the official rule (decres2besttoken of R(n) for N = 32 at 32 px, alpha 1.5, patch 4):
# side 16 <- n = 12 (R = 15), 20 <- 16 (R = 20), 24 <- 20 (R = 24), 28 <- 24 (R = 27),
# 32 <- 32 (R = 32).
TOKENS_PER_SIDE = {16: 12, 20: 16, 24: 20, 28: 24, 32: 32}


@pytest.fixture(scope="module")
def any_size():
  import pathlib  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  config = load_config_file(str(repo / "configs" / "tokenizer_tiny.py") + ":smoke").tokenizer
  config.min_image_size = 16
  tokenizer = dfj.tokenizer_params(tokenizer_model.init_params(config, jax.random.PRNGKey(0)),
                                   config)
  gcfg = gpt_model.GPTConfig(vocab_size=config.codebook_size, num_layers=1, dim=32, num_heads=2,
                             num_classes=10, block_size=config.num_tokens, group_size=4,
                             causal_num=4)
  gpt_params = gpt_model.init_params(gcfg, jax.random.PRNGKey(2))
  # The official init zeroes the head (uniform logits); draw it so the samples depend on it.
  gpt_params["output"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(3), gpt_params["output"]["kernel"].shape)
  return dfj.SamplerParams(tokenizer=tokenizer, gpt=gpt_params, gpt_config=gcfg)


def test_supported_sizes_and_token_counts(any_size, tokenizer):
  config = any_size.tokenizer.config
  assert dfj.supported_image_sizes(config) == tuple(TOKENS_PER_SIDE)
  assert {s: dfj.token_count_for_size(config, s) for s in TOKENS_PER_SIDE} == TOKENS_PER_SIDE
  assert dfj.supported_image_sizes(tokenizer.config) == (32,)   # a one-size tokenizer


@pytest.mark.parametrize("side", sorted(TOKENS_PER_SIDE))
def test_sample_at_each_supported_size(any_size, side):
  labels = jnp.array([0, 3])
  rng = jax.random.PRNGKey(5)
  images = dfj.sample(any_size, labels, rng=rng, image_size=side)
  assert images.shape == (2, side, side, 3)
  assert float(images.min()) >= -1 and float(images.max()) <= 1
  np.testing.assert_array_equal(images, dfj.sample(any_size, labels, rng=rng, image_size=side))
  # The official count of codes for the side, decoded at the side.
  codes = dfj.generate_codes(any_size, labels, rng=rng, num_tokens=TOKENS_PER_SIDE[side])
  expected = jnp.clip(dfj.decode(any_size.tokenizer, codes, image_size=side), -1, 1)
  np.testing.assert_array_equal(images, expected)
  if side == 20:   # one side is enough here (every stage compiles its own decode)
    *_, last = dfj.sample_progressive(any_size, labels, rng=rng, image_size=side)
    assert last.codes.shape == (2, TOKENS_PER_SIDE[side]) and last.final
    np.testing.assert_array_equal(last.images, images)


def test_decode_any_prefix_at_any_size_and_encode_at_a_smaller_size(any_size, images):
  tokenizer = any_size.tokenizer
  codes = dfj.encode(tokenizer, images)
  assert codes.shape == (2, 32)
  for n, side in ((8, 32), (32, 16), (4, 24)):
    assert dfj.decode(tokenizer, codes, num_tokens=n, image_size=side).shape == (2, side, side, 3)
  small = dfj.encode(tokenizer, images[:, ::2, ::2])   # a 16 x 16 image: 12 codes
  assert small.shape == (2, 12)
  at_16 = dfj.decode(tokenizer, small, image_size=16)
  assert at_16.shape == (2, 16, 16, 3)
  # All 12 codes of a 16 px image decode at R(12) = 15 -> 16 px: the same program and output.
  np.testing.assert_array_equal(at_16, dfj.decode(tokenizer, small, num_tokens=12))


def test_unsupported_size_lists_the_supported_ones(any_size, tokenizer, images):
  message = (r"image_size=18 is not supported by this tokenizer; "
             r"supported sizes: \[16, 20, 24, 28, 32\]")
  with pytest.raises(ValueError, match=message):
    dfj.sample(any_size, jnp.array([0]), rng=jax.random.PRNGKey(0), image_size=18)
  with pytest.raises(ValueError, match=message):
    dfj.decode(any_size.tokenizer, dfj.encode(any_size.tokenizer, images), image_size=18)
  with pytest.raises(ValueError, match=r"image_size=16 is not supported .*supported sizes: \[32\]"):
    dfj.decode(tokenizer, dfj.encode(tokenizer, images), image_size=16)
