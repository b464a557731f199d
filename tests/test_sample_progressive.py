"""api.sample_progressive: one preview per causal token and per group, the last equal to sample()."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detailflow_jax as dfj
from detailflow_jax import detail
from detailflow_jax.config.files import load_config_file
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.models import tokenizer as tokenizer_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LABELS = np.array([0, 3], np.int32)


@pytest.fixture(scope="module")
def params():
  config = load_config_file(str(REPO_ROOT / "configs" / "tokenizer_tiny.py") + ":smoke").tokenizer
  config.num_tokens = 16   # stages 1, 2, 3, 4, 8, 12, 16: few compiled decodes
  tokenizer = dfj.tokenizer_params(tokenizer_model.init_params(config, jax.random.PRNGKey(0)),
                                   config)
  gcfg = gpt_model.GPTConfig(vocab_size=config.codebook_size, num_layers=1, dim=32, num_heads=2,
                             num_classes=10, block_size=config.num_tokens,
                             group_size=config.group_size, causal_num=config.causal_num,
                             class_dropout_prob=0.1)
  gpt_params = gpt_model.init_params(gcfg, jax.random.PRNGKey(2))
  # The official init zeroes the head (uniform logits); draw it so the samples depend on it.
  gpt_params["output"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(3), gpt_params["output"]["kernel"].shape)
  return dfj.SamplerParams(tokenizer=tokenizer, gpt=gpt_params, gpt_config=gcfg)


def test_one_preview_per_stage_at_its_resolution(params):
  schedule = detail.resolution_schedule(params.tokenizer.config)
  previews = list(dfj.sample_progressive(params, LABELS, rng=jax.random.PRNGKey(0), cfg_scale=2.0))
  assert [p.num_tokens for p in previews] == [1, 2, 3, 4, 8, 12, 16]
  assert [p.final for p in previews] == [False] * 6 + [True]
  for p in previews:
    d = schedule.decoder_size(p.num_tokens)
    assert p.decoder_size == d and p.resolution == schedule.content_resolution(p.num_tokens)
    assert p.images.shape == (2, d, d, 3) and p.images.dtype == jnp.float32
    assert float(p.images.min()) >= -1 and float(p.images.max()) <= 1
    assert p.codes.shape == (2, p.num_tokens)
    # Each stage is the decode of its prefix of the final codes.
    np.testing.assert_array_equal(np.asarray(p.codes), np.asarray(previews[-1].codes)[:, :p.num_tokens])
    expected = jnp.clip(dfj.decode(params.tokenizer, previews[-1].codes, num_tokens=p.num_tokens), -1, 1)
    np.testing.assert_array_equal(np.asarray(p.images), np.asarray(expected))
  assert previews[0].decoder_size < previews[-1].decoder_size == 32   # coarse to fine


@pytest.mark.parametrize("cfg_scale", [2.0, 1.0])
def test_last_preview_equals_sample_bit_for_bit(params, cfg_scale):
  for seed in (0, 1):
    rng = jax.random.PRNGKey(seed)
    *_, last = dfj.sample_progressive(params, LABELS, rng=rng, cfg_scale=cfg_scale)
    np.testing.assert_array_equal(
        np.asarray(last.images), np.asarray(dfj.sample(params, LABELS, rng=rng, cfg_scale=cfg_scale)))
    np.testing.assert_array_equal(
        np.asarray(last.codes), np.asarray(dfj.generate_codes(params, LABELS, rng=rng, cfg_scale=cfg_scale)))


def test_deterministic_per_key_and_stops_early(params):
  run = lambda seed, **kw: [np.asarray(p.images) for p in dfj.sample_progressive(
      params, LABELS, rng=jax.random.PRNGKey(seed), cfg_scale=2.0, **kw)]
  first, again, other = run(0), run(0), run(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[-1], other[-1])
  short = list(dfj.sample_progressive(params, LABELS, rng=jax.random.PRNGKey(0), cfg_scale=2.0,
                                      num_tokens=8))
  assert [p.num_tokens for p in short] == [1, 2, 3, 4, 8] and short[-1].final
  np.testing.assert_array_equal(
      np.asarray(short[-1].images),
      np.asarray(dfj.sample(params, LABELS, rng=jax.random.PRNGKey(0), cfg_scale=2.0, num_tokens=8)))


def test_bad_arguments_raise_at_the_call(params):
  assert dfj.supported_image_sizes(params.tokenizer.config) == (32,)
  for size in (64, 31, "32", True):
    with pytest.raises(ValueError, match=r"image_size=.* is not supported .*supported sizes: \[32\]"):
      dfj.sample_progressive(params, LABELS, rng=jax.random.PRNGKey(0), image_size=size)
  with pytest.raises(ValueError, match="valid range"):
    dfj.sample_progressive(params, np.array([10]), rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="num_tokens=5"):
    dfj.sample_progressive(params, LABELS, rng=jax.random.PRNGKey(0), num_tokens=5)
  *_, last = dfj.sample_progressive(params, LABELS, rng=jax.random.PRNGKey(0), cfg_scale=2.0,
                                    image_size=32)
  assert last.images.shape == (2, 32, 32, 3)
