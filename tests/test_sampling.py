"""The KV-cache group-parallel sampler against the training-path forward, and its API."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_relative_error
from detailflow_jax import api, kv_cache, sampling
from detailflow_jax.models import gpt

CONFIG = gpt.GPTConfig(vocab_size=64, num_layers=2, dim=32, num_heads=2, num_classes=10,
                       block_size=32, group_size=4, causal_num=4)
LABELS = np.array([3, 0, 9], np.int32)



@pytest.fixture(scope="module", autouse=True)
def full_float32_matmuls():
  """Exact float32 matmuls on accelerators too (their default may use reduced precision)."""
  with jax.default_matmul_precision("highest"):
    yield

@pytest.fixture(scope="module")
def params():
  p = gpt.init_params(CONFIG, jax.random.PRNGKey(0))
  # The official init zeroes the head; give it weights so the logits carry information.
  p["output"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), p["output"]["kernel"].shape)
  return p


def _keys(seed, n=len(LABELS)):
  return jax.random.split(jax.random.PRNGKey(seed), n)


@pytest.fixture(scope="module")
def guided_run(params):
  """One sampled decode with guidance, recording the logits behind every code."""
  return sampling.generate_codes_with_logits(params, CONFIG, LABELS, rng=_keys(0), cfg_scale=1.5)


def test_token_counts():
  assert sampling.decodable_token_counts(CONFIG) == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
  assert sampling.decodable_token_counts(gpt.gpt_model_config("B"))[-3:] == [112, 120, 128]


@pytest.fixture(scope="module")
def forward(params):
  return jax.jit(lambda codes, labels: gpt.GPT(CONFIG).apply({"params": params}, codes, labels))


def test_cached_logits_equal_prefix_recomputation(guided_run, forward):
  """Every step: the logits the cache-based step produced == the training forward run on the
  whole prefix, as the official sampler does (both halves of the guidance batch)."""
  codes, cond, uncond = map(np.asarray, guided_run)
  recorded = np.concatenate([cond, uncond])
  labels = jnp.asarray(np.concatenate([LABELS, np.full_like(LABELS, CONFIG.num_classes)]))
  c, g = CONFIG.causal_num, CONFIG.group_size
  steps = [(k, 1) for k in range(c)] + [(k, g) for k in range(c, CONFIG.block_size, g)]
  assert len(steps) == 11
  for first, count in steps:
    prefix = jnp.asarray(np.concatenate([codes[:, :first]] * 2))
    predicted = np.asarray(forward(prefix, labels))[:, -count:]
    assert max_relative_error(recorded[:, first:first + count], predicted) <= 1e-5, first


def _again(params, rng, **kw):
  """A guided decode that reuses the compiled program of `guided_run` (same static settings)."""
  return sampling.generate_codes_with_logits(params, CONFIG, kw.pop("labels", LABELS), rng=rng,
                                             cfg_scale=1.5, **kw)[0]


def test_same_key_same_samples(params, guided_run):
  np.testing.assert_array_equal(np.asarray(_again(params, _keys(0))), np.asarray(guided_run[0]))
  assert not np.array_equal(np.asarray(_again(params, _keys(1))), np.asarray(guided_run[0]))


def test_rows_are_independent_and_shorter_decodes_are_prefixes(params, guided_run):
  keys = _keys(0)
  for i in range(len(LABELS)):
    alone = _again(params, keys[i:i + 1], labels=LABELS[i:i + 1], num_tokens=8)
    assert alone.shape == (1, 8)
    np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(guided_run[0])[i, :8])
  # Stopping inside the causal region (a program without the group phase).
  short = sampling.generate_codes(params, CONFIG, LABELS, rng=_keys(0), cfg_scale=1.5, num_tokens=3)
  np.testing.assert_array_equal(np.asarray(short), np.asarray(guided_run[0])[:, :3])


def test_stepwise_decode_gives_the_same_codes_step_by_step(params, guided_run):
  """generate_codes_stepwise: one (n, codes) per causal token and per group, each the prefix of
  the one-program decode with the same key (also when stopping early, and without guidance)."""
  steps = list(sampling.generate_codes_stepwise(params, CONFIG, LABELS, rng=_keys(0), cfg_scale=1.5))
  assert [n for n, _ in steps] == sampling.decodable_token_counts(CONFIG)
  for n, codes in steps:
    assert codes.shape == (3, n) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(guided_run[0])[:, :n])
  short = list(sampling.generate_codes_stepwise(params, CONFIG, LABELS, rng=_keys(2), cfg_scale=1.0,
                                                temperature=0.7, num_tokens=12))
  assert [n for n, _ in short] == [1, 2, 3, 4, 8, 12]
  whole = sampling.generate_codes(params, CONFIG, LABELS, rng=_keys(2), cfg_scale=1.0,
                                  temperature=0.7, num_tokens=12)
  np.testing.assert_array_equal(np.asarray(short[-1][1]), np.asarray(whole))
  with pytest.raises(ValueError, match="valid range"):   # checked at the call, not at next()
    sampling.generate_codes_stepwise(params, CONFIG, np.array([10]), rng=jax.random.PRNGKey(0))


def test_unguided_decode_matches_training_forward(params, forward):
  codes, cond, uncond = sampling.generate_codes_with_logits(
      params, CONFIG, LABELS, rng=_keys(2), cfg_scale=1.0, temperature=0.7)
  assert codes.dtype == jnp.int32 and codes.shape == (3, CONFIG.block_size)
  np.testing.assert_array_equal(np.asarray(cond), np.asarray(uncond))
  # The mask lets one teacher-forced forward give every decision's logits at once.
  full = forward(codes[:, :-CONFIG.group_size], jnp.asarray(LABELS))
  assert max_relative_error(cond, full) <= 1e-5


def bfloat16_dots(config, params):
  """(bfloat16 -> float32, bfloat16 -> bfloat16) dot_general counts of a bfloat16 forward."""
  fn = lambda p: gpt.GPT(config).apply({"params": p}, jnp.zeros((2, 8), jnp.int32),
                                       jnp.zeros((2,), jnp.int32))
  text = jax.jit(fn).lower(params).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*\((tensor<[^)]*)\) -> tensor<[0-9x]*(\w+)>", text)
  low = [result for operands, result in dots if "bf16" in operands]
  return low.count("f32"), low.count("bf16")


def test_bfloat16_projections_accumulate_in_float32(params):
  """Every projection (wqkv, wo, w1, w3, w2 per block, the head) and the attention scores of a
  bfloat16 forward give float32 sums; only the attention-weighted values stay bfloat16."""
  sampler = api.in_bfloat16(api.SamplerParams(tokenizer=None, gpt=params, gpt_config=CONFIG))
  assert sampler.gpt_config.dtype == "bfloat16"
  assert sampler.gpt["layers_0"]["feed_forward"]["w1"]["kernel"].dtype == jnp.bfloat16
  assert sampler.gpt["norm"]["scale"].dtype == jnp.float32
  to_float32, to_bfloat16 = bfloat16_dots(sampler.gpt_config, sampler.gpt)
  assert (to_float32, to_bfloat16) == (6 * CONFIG.num_layers + 1, CONFIG.num_layers)


def test_bfloat16_sampler_logits_follow_float32(params, forward):
  """bfloat16 sampling (api.in_bfloat16): each decision's logits within bfloat16's precision
  of the float32 training forward teacher-forced on the codes it chose."""
  sampler = api.in_bfloat16(api.SamplerParams(tokenizer=None, gpt=params, gpt_config=CONFIG))
  codes, cond, _ = sampling.generate_codes_with_logits(
      sampler.gpt, sampler.gpt_config, LABELS, rng=_keys(2), cfg_scale=1.0, temperature=0.7)
  full = forward(codes[:, :-CONFIG.group_size], jnp.asarray(LABELS))
  error = max_relative_error(cond, full)
  assert 1e-4 < error <= 3e-2, error   # not float32's 1e-5: bfloat16 did run


def test_decoding_layout_gives_the_same_logits_and_codes(params, forward):
  """gpt.to_decoding_layout (what load_sampler_params gives): every projection's kernel stored
  transposed; the training forward and the sampler give the same numbers from it, and
  from_decoding_layout restores the stored params exactly."""
  transposed = gpt.to_decoding_layout(params)
  block = transposed["layers_0"]
  assert set(block["feed_forward"]["w1"]) == {"kernel_t"}
  assert block["attention"]["wqkv"]["kernel_t"].shape == (3 * CONFIG.dim, CONFIG.dim)
  assert transposed["output"]["kernel_t"].shape == (CONFIG.vocab_size, CONFIG.dim)
  assert transposed["tok_embeddings"]["embedding"] is params["tok_embeddings"]["embedding"]
  codes = jnp.asarray(np.arange(3 * 20).reshape(3, 20) % CONFIG.vocab_size)
  stored_logits = forward(codes, jnp.asarray(LABELS))
  transposed_logits = gpt.GPT(CONFIG).apply({"params": transposed}, codes, jnp.asarray(LABELS))
  assert max_relative_error(transposed_logits, stored_logits) <= 1e-6
  sample = lambda p: sampling.generate_codes_with_logits(p, CONFIG, LABELS, rng=_keys(4),
                                                         cfg_scale=2.0, temperature=0.7)
  (codes_a, cond_a, _), (codes_b, cond_b, _) = sample(params), sample(transposed)
  np.testing.assert_array_equal(np.asarray(codes_b), np.asarray(codes_a))
  assert max_relative_error(cond_b, cond_a) <= 1e-6
  restored = gpt.from_decoding_layout(transposed)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree_util.tree_structure(gpt.to_decoding_layout(transposed)) == \
      jax.tree_util.tree_structure(transposed)   # already transposed: unchanged


def test_bfloat16_decoding_layout_accumulates_in_float32(params):
  """The transposed projections keep the float32 sums of a bfloat16 forward (as in the stored
  layout above)."""
  sampler = api.in_bfloat16(api.in_decoding_layout(
      api.SamplerParams(tokenizer=None, gpt=params, gpt_config=CONFIG)))
  assert sampler.gpt["layers_0"]["feed_forward"]["w1"]["kernel_t"].dtype == jnp.bfloat16
  to_float32, to_bfloat16 = bfloat16_dots(sampler.gpt_config, sampler.gpt)
  assert (to_float32, to_bfloat16) == (6 * CONFIG.num_layers + 1, CONFIG.num_layers)


@pytest.mark.parametrize("labels", [[0, 10], [-1], [2, 11, 5]])
def test_bad_labels_raise(params, labels):
  with pytest.raises(ValueError, match=r"valid range \[0, 10\)"):
    sampling.generate_codes(params, CONFIG, np.array(labels), rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("num_tokens", [0, 5, 9, 33])
def test_bad_token_counts_raise(params, num_tokens):
  with pytest.raises(ValueError, match=r"valid: \[1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32\]"):
    sampling.generate_codes(params, CONFIG, LABELS, rng=jax.random.PRNGKey(0), num_tokens=num_tokens)


def test_bad_sampling_settings_raise(params):
  with pytest.raises(ValueError, match="top_k"):
    sampling.generate_codes(params, CONFIG, LABELS, rng=jax.random.PRNGKey(0), top_k=65)
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate_codes(params, CONFIG, LABELS, rng=jax.random.PRNGKey(0), top_p=0.0)
  with pytest.raises(ValueError, match="one key per label"):
    sampling.generate_codes(params, CONFIG, LABELS, rng=_keys(0, 2))


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
  top2 = np.isfinite(np.asarray(sampling.filter_logits(logits, 2)))
  np.testing.assert_array_equal(top2, [[False, True, False, True], [True, True, True, True]])
  # Sorted masses 0.4, 0.3, 0.2, 0.1: mass before the 3rd is 0.7 > 0.6, so two survive.
  nucleus = np.isfinite(np.asarray(sampling.filter_logits(logits[:1], 0, jnp.float32(0.6))))
  np.testing.assert_array_equal(nucleus, [[False, True, False, True]])
  # The most likely entry always survives, however small top_p.
  tiny = np.isfinite(np.asarray(sampling.filter_logits(logits[:1], 0, jnp.float32(1e-6))))
  np.testing.assert_array_equal(tiny, [[False, True, False, False]])


def test_categorical_from_uniform_inverts_the_cdf():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 300)).astype(np.float32) * 2
  logits[:, ::7] = -np.inf   # filtered entries must never be drawn
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  cdf = np.cumsum(probs, -1) / probs.sum(-1, keepdims=True)
  uniforms = np.linspace(0.0, 1.0, 200, endpoint=False, dtype=np.float32)[7:13] + 0.0031
  drawn = np.asarray(sampling.categorical_from_uniform(jnp.asarray(logits), jnp.asarray(uniforms), 16))
  expected = [np.searchsorted(cdf[i], uniforms[i], side="right") for i in range(6)]
  np.testing.assert_array_equal(drawn, expected)
  edges = np.asarray(sampling.categorical_from_uniform(
      jnp.asarray(logits), jnp.asarray(np.array([0.0, 0.0, 0.9999999, 0.9999999, 0.5, 0.5], np.float32)), 16))
  assert np.all(np.isfinite(logits[np.arange(6), edges]))


def test_kv_cache_layout():
  cache = kv_cache.init_kv_cache(CONFIG, 5, 8)
  assert len(cache["k"]) == CONFIG.num_layers and cache["v"][0].shape == (5, 2, 8, 16)
  assert cache["k"][0].shape == (5, 2, 16, 8)   # keys transposed: head_dim before positions
  grown = kv_cache.grow_kv_cache(cache, 32)
  assert kv_cache.cache_length(grown) == 32
  assert grown["k"][0].shape == (5, 2, 16, 32) and grown["v"][0].shape == (5, 2, 32, 16)
  with pytest.raises(ValueError, match="cannot shrink"):
    kv_cache.grow_kv_cache(grown, 16)
