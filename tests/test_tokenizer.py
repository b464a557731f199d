"""DetailFlowTokenizer training forward, init and argument checks (on the official tiny model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.interop import tokenizer_state_dict as sd_lib
from detailflow_jax.models import quantizer as vq
from detailflow_jax.models import tokenizer as tokenizer_lib
from tests.conftest import max_relative_error
from tests.test_tokenizer_parity import nchw, nhwc, official  # pylint: disable=unused-import

OUTPUT_SIZE = 16


@pytest.fixture(scope="module")
def train_forward(official):
  variables = {"params": official.params}

  @jax.jit
  def run(images, num_tokens, noise_position, rng):
    return official.model.apply(variables, images, num_tokens, noise_position, OUTPUT_SIZE, rng,
                                method="train_forward")
  return run


@pytest.mark.parametrize("noise_position", [8, 2])
def test_train_forward_with_self_correction(official, train_forward, noise_position):
  images, rng, n = nhwc(official.io["x"]), jax.random.PRNGKey(7), 4
  out = train_forward(images, jnp.int32(n), jnp.int32(noise_position), rng)
  clean = official.clean
  # The same rng draws the same noisy codes; replay them through self_correct.
  selected = vq.sample_top_k_codes(rng, clean["distances"], 50)
  corr = official.self_correct(images, jnp.int32(noise_position), selected)
  np.testing.assert_array_equal(out["index_triplet"], corr["index_triplet"])

  # Batch layout: [clean; self-corrected], both decoded from their first n tokens.
  recon = out["reconstructions"]
  assert recon.shape == (4, OUTPUT_SIZE, OUTPUT_SIZE, 3)
  expect_clean = official.decode(clean["quant"], n, OUTPUT_SIZE)
  expect_corr = official.decode(corr["quant"], n, OUTPUT_SIZE)
  assert max_relative_error(recon[:2], expect_clean) <= 1e-5
  assert max_relative_error(recon[2:], expect_corr) <= 1e-5

  # Loss weights T/(2T-e) and (T-e)/(2T-e); pass 2 only after the span.
  t, e = 16, int(corr["noise_end"])
  assert e == (noise_position + 4 if noise_position >= 4 else noise_position + 1)
  sq_clean = np.mean((np.asarray(clean["codes"]) - np.asarray(clean["z"])) ** 2)
  sq_noise = np.mean((np.asarray(corr["codes"]) - np.asarray(corr["z"]))[:, e:] ** 2)
  expect = sq_clean * t / (2 * t - e) + sq_noise * (t - e) / (2 * t - e)
  np.testing.assert_allclose(out["vq_loss"], expect, rtol=1e-5)
  np.testing.assert_allclose(out["commit_loss"], 0.25 * expect, rtol=1e-5)

  np.testing.assert_array_equal(out["first_token"], clean["quant"][:, 0])
  np.testing.assert_array_equal(out["indices"], clean["indices"])
  metrics = vq.codebook_metrics(clean["indices"], 64)
  np.testing.assert_allclose(out["perplexity"], metrics["perplexity"], rtol=1e-6)
  both = jnp.concatenate([clean["quant"], corr["quant"]])
  np.testing.assert_allclose(out["group_cosine_similarity"],
                             vq.group_cosine_similarity(both, 4), rtol=1e-5)
  # Every noise position and token count share one compiled program.
  assert train_forward._cache_size() == 1


def test_train_forward_without_correction_matches_official_decode(official):
  run = jax.jit(lambda images: official.model.apply(
      {"params": official.params}, images, 16, None, 32, method="train_forward"))
  out = run(nhwc(official.io["x"]))
  assert out["reconstructions"].shape == (2, 32, 32, 3) and "index_triplet" not in out
  assert max_relative_error(nchw(out["reconstructions"]), official.io["dec0_pixel"]) <= 1e-4
  clean = official.clean
  sq = np.mean((np.asarray(clean["codes"]) - np.asarray(clean["z"])) ** 2)
  np.testing.assert_allclose(out["vq_loss"], sq, rtol=1e-5)
  np.testing.assert_allclose(out["commit_loss"], 0.25 * sq, rtol=1e-5)


def one_layer(official):
  """The official model cut to its first layer per tower (cheaper to compile)."""
  config = official.config.copy_and_resolve_references()
  config.encoder.depth = config.decoder.depth = 1
  params = jax.tree.map(lambda x: x, official.params)
  for tower in ("encoder", "decoder"):
    del params[tower]["transformer"]["layers_1"]
  return tokenizer_lib.DetailFlowTokenizer(config, precision=official.model.precision), params


def test_train_forward_gradients_follow_the_masks(official):
  """refined_tokens only feed positions after the noisy span; masked decoder latents get none."""
  images, noise_position, n = nhwc(official.io["x"]), 4, 8   # span [4, 8)
  model, params = one_layer(official)

  def loss(params):
    out = model.apply({"params": params}, images, jnp.int32(n), jnp.int32(noise_position),
                      OUTPUT_SIZE, jax.random.PRNGKey(0), method="train_forward")
    return jnp.mean(out["reconstructions"] ** 2) + out["vq_loss"] + out["commit_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  refined = np.abs(np.asarray(grads["encoder"]["refined_tokens"][0])).sum(-1)
  assert not refined[:8].any() and refined[8:].all()
  dec_pos = np.abs(np.asarray(grads["decoder"]["latent_pos_embed"][0])).sum(-1)
  assert dec_pos[:n].all() and not dec_pos[n:].any()
  for name in ("refine_conv", "quant_conv", "post_quant_conv", "quantize"):
    assert any(np.any(g) for g in jax.tree.leaves(grads[name])), name


@pytest.fixture(scope="module")
def fresh(official):
  """A freshly initialised model without transformer layers: the tokenizer's own params (the
  layers' init is checked in test_vit) at a fraction of the compile time."""
  config = official.config.copy_and_resolve_references()
  config.encoder.depth = config.decoder.depth = 0
  return config, tokenizer_lib.init_params(config, jax.random.PRNGKey(3))


def test_init_like_official(fresh):
  config, fresh_params = fresh
  shapes = jax.tree.map(lambda s: s.shape, tokenizer_lib.param_shapes(config))
  assert jax.tree.map(np.shape, fresh_params) == shapes
  enc, dec = fresh_params["encoder"], fresh_params["decoder"]
  for leaf in (enc["latent_tokens"], enc["refined_tokens"], enc["latent_pos_embed"],
               dec["latent_pos_embed"]):
    assert 0.015 < np.std(leaf) < 0.025 and abs(np.mean(leaf)) < 0.005
  np.testing.assert_allclose(np.linalg.norm(fresh_params["quantize"]["codebook"], axis=-1), 1.0,
                             rtol=1e-5)
  # Default PyTorch Linear: U(+-1/sqrt(fan_in)) for weight and bias.
  bound = 1 / np.sqrt(64)
  for leaf in jax.tree.leaves(fresh_params["quant_conv"]):
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound
  np.testing.assert_array_equal(enc["transformer"]["post_layernorm"]["scale"], 1.0)


def test_fresh_params_round_trip_through_state_dict(official, fresh):
  config, fresh_params = fresh
  exported = sd_lib.tokenizer_state_dict_from_params(fresh_params, config)
  assert set(exported) == {k for k in official.case.state_dict if ".layers." not in k}
  again = sd_lib.tokenizer_params_from_state_dict(exported, config)
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, fresh_params))


def test_argument_errors(official):
  apply = lambda *a, **k: official.model.apply({"params": official.params}, *a, **k)
  quant = official.clean["quant"]
  with pytest.raises(ValueError, match="output_size=20 must be a static positive multiple"):
    apply(quant, 4, 20, method="decode")
  with pytest.raises(ValueError, match=r"num_tokens=17 must be in \[1, 16\]"):
    apply(quant, 17, 16, method="decode")
  images = nhwc(official.io["x"])
  with pytest.raises(ValueError, match="noise_position=5 must be"):
    apply(images, 5, selected_indices=official.clean["indices"], clean=official.clean,
          method="self_correct")
  with pytest.raises(ValueError, match="needs `rng`"):
    apply(images, 2, clean=official.clean, method="self_correct")
  with pytest.raises(ValueError, match="num_latents=6 must be a static int"):
    apply(images, 6, method="encode")
