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

# Every size below comes from the fixture's config (official.config): batch, N, group_size,
# causal_num, codebook size, patch and tower widths.


def output_size(official):
  """A small decoder output: two decoder patches."""
  return 2 * official.config.decoder.patch_size


def noise_positions(official):
  """One noise position in the causal head (span of 1) and one that starts a group after it
  (span of group_size): the second such group when the sequence has room for it."""
  c = official.config
  group = c.causal_num + c.group_size
  if group + c.group_size > c.num_tokens:
    group = c.causal_num
  return {"causal": 2 % c.causal_num, "group": group}


@pytest.fixture(scope="module")
def train_forward(official):
  variables = {"params": official.params}

  @jax.jit
  def run(images, num_tokens, noise_position, rng):
    return official.model.apply(variables, images, num_tokens, noise_position,
                                output_size(official), rng, method="train_forward")
  return run


@pytest.mark.parametrize("span", ["group", "causal"])
def test_train_forward_with_self_correction(official, train_forward, span):
  c = official.config
  noise_position = noise_positions(official)[span]
  images, rng, n = nhwc(official.io["x"]), jax.random.PRNGKey(7), c.causal_num
  batch, size = images.shape[0], output_size(official)
  out = train_forward(images, jnp.int32(n), jnp.int32(noise_position), rng)
  clean = official.clean
  # The same rng draws the same noisy codes; replay them through self_correct.
  selected = vq.sample_top_k_codes(rng, clean["distances"], 50)
  corr = official.self_correct(images, jnp.int32(noise_position), selected)
  np.testing.assert_array_equal(out["index_triplet"], corr["index_triplet"])

  # Batch layout: [clean; self-corrected], both decoded from their first n tokens.
  recon = out["reconstructions"]
  assert recon.shape == (2 * batch, size, size, 3)
  expect_clean = official.decode(clean["quant"], n, size)
  expect_corr = official.decode(corr["quant"], n, size)
  assert max_relative_error(recon[:batch], expect_clean) <= 1e-5
  assert max_relative_error(recon[batch:], expect_corr) <= 1e-5

  # Loss weights T/(2T-e) and (T-e)/(2T-e); pass 2 only after the span.
  t, e = c.num_tokens, int(corr["noise_end"])
  assert e == noise_position + (c.group_size if noise_position >= c.causal_num else 1)
  sq_clean = np.mean((np.asarray(clean["codes"]) - np.asarray(clean["z"])) ** 2)
  sq_noise = np.mean((np.asarray(corr["codes"]) - np.asarray(corr["z"]))[:, e:] ** 2)
  expect = sq_clean * t / (2 * t - e) + sq_noise * (t - e) / (2 * t - e)
  np.testing.assert_allclose(out["vq_loss"], expect, rtol=1e-5)
  np.testing.assert_allclose(out["commit_loss"], c.commitment_beta * expect, rtol=1e-5)

  np.testing.assert_array_equal(out["first_token"], clean["quant"][:, 0])
  np.testing.assert_array_equal(out["indices"], clean["indices"])
  metrics = vq.codebook_metrics(clean["indices"], c.codebook_size)
  np.testing.assert_allclose(out["perplexity"], metrics["perplexity"], rtol=1e-6)
  both = jnp.concatenate([clean["quant"], corr["quant"]])
  np.testing.assert_allclose(out["group_cosine_similarity"],
                             vq.group_cosine_similarity(both, c.group_size), rtol=1e-5)
  # Every noise position and token count share one compiled program.
  assert train_forward._cache_size() == 1


def test_train_forward_without_correction_matches_official_decode(official):
  c = official.config
  # An official decode of all N tokens (the fixture's decode_cases say which array holds it).
  case = next((case for case in official.case.config["decode_cases"]
               if case["t"] == c.num_tokens), None)
  if case is None:
    pytest.skip(f"{official.case.folder} records no decode of all {c.num_tokens} tokens")
  size = case["img_size"]
  run = jax.jit(lambda images: official.model.apply(
      {"params": official.params}, images, c.num_tokens, None, size, method="train_forward"))
  images = nhwc(official.io["x"])
  out = run(images)
  assert out["reconstructions"].shape == (images.shape[0], size, size, 3)
  assert "index_triplet" not in out
  assert max_relative_error(nchw(out["reconstructions"]), official.io[case["name"]]) <= 1e-4
  clean = official.clean
  sq = np.mean((np.asarray(clean["codes"]) - np.asarray(clean["z"])) ** 2)
  np.testing.assert_allclose(out["vq_loss"], sq, rtol=1e-5)
  np.testing.assert_allclose(out["commit_loss"], c.commitment_beta * sq, rtol=1e-5)


def one_layer(official):
  """The official model cut to its first layer per tower (cheaper to compile)."""
  config = official.config.copy_and_resolve_references()
  config.encoder.depth = config.decoder.depth = 1
  params = jax.tree.map(lambda x: x, official.params)
  for tower in ("encoder", "decoder"):
    layers = params[tower]["transformer"]
    for name in [k for k in layers if k.startswith("layers_") and k != "layers_0"]:
      del layers[name]
  return tokenizer_lib.DetailFlowTokenizer(config, precision=official.model.precision), params


def test_train_forward_gradients_follow_the_masks(official):
  """refined_tokens only feed positions after the noisy span; masked decoder latents get none."""
  c = official.config
  # Noise on the first group after the causal head: span [c, c+g); decode exactly up to its end.
  noise_position = c.causal_num
  n = end = c.causal_num + c.group_size
  images = nhwc(official.io["x"])
  model, params = one_layer(official)

  def loss(params):
    out = model.apply({"params": params}, images, jnp.int32(n), jnp.int32(noise_position),
                      output_size(official), jax.random.PRNGKey(0), method="train_forward")
    return jnp.mean(out["reconstructions"] ** 2) + out["vq_loss"] + out["commit_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  refined = np.abs(np.asarray(grads["encoder"]["refined_tokens"][0])).sum(-1)
  assert not refined[:end].any() and refined[end:].all()
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
  bound = 1 / np.sqrt(config.encoder.width)   # quant_conv's fan-in
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
  c = official.config
  n, g, p = c.num_tokens, c.group_size, c.decoder.patch_size
  apply = lambda *a, **k: official.model.apply({"params": official.params}, *a, **k)
  quant = official.clean["quant"]
  bad_size = 2 * p + p // 2   # not a multiple of the decoder patch
  with pytest.raises(ValueError,
                     match=f"output_size={bad_size} must be a static positive multiple"):
    apply(quant, c.causal_num, bad_size, method="decode")
  with pytest.raises(ValueError, match=rf"num_tokens={n + 1} must be in \[1, {n}\]"):
    apply(quant, n + 1, 2 * p, method="decode")
  images = nhwc(official.io["x"])
  # Past the causal head a noise span must start a group; with g = 1 every start does, so
  # only a position past the end is wrong.
  bad_noise = c.causal_num + 1 if g > 1 else n
  with pytest.raises(ValueError, match=f"noise_position={bad_noise} must be"):
    apply(images, bad_noise, selected_indices=official.clean["indices"], clean=official.clean,
          method="self_correct")
  with pytest.raises(ValueError, match="needs `rng`"):
    apply(images, 2 % c.causal_num, clean=official.clean, method="self_correct")
  bad_latents = c.causal_num + g // 2 if g > 1 else n + 1   # not a multiple of g / too many
  with pytest.raises(ValueError, match=f"num_latents={bad_latents} must be a static int"):
    apply(images, bad_latents, method="encode")
