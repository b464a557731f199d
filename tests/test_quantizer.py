"""l2-normalised VQ: nearest codes, straight-through, losses, metrics, top-k draw."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.models import quantizer as vq
from tests.conftest import max_relative_error


def test_quantize_matches_official(parity_tokenizer):
  io = parity_tokenizer.io
  codebook = parity_tokenizer.state_dict["quantize.embedding.weight"]
  out = vq.quantize(jnp.asarray(io["h"]), jnp.asarray(codebook))
  np.testing.assert_array_equal(out["indices"], io["indices"])
  assert max_relative_error(out["quant"], io["quant"]) <= 1e-6
  np.testing.assert_allclose(vq.l2_normalize(codebook), io["codebook_normalized"], atol=1e-7)


def test_nearest_code_first_on_ties_and_scale_invariance():
  codebook = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
  # Token 0 is equally close to codes 0 and 2 (identical rows): the first one wins.
  h = jnp.array([[[5.0, 0.0], [0.0, -3.0], [0.2, 0.1]]])
  out = vq.quantize(h, codebook * jnp.array([[2.0], [1.0], [1.0], [7.0]]))
  np.testing.assert_array_equal(out["indices"], [[0, 0, 0]])  # (0,-3) ties codes 0, 2, 3: first
  out = vq.quantize(jnp.array([[[0.1, 3.0], [-2.0, 0.5]]]), codebook)
  np.testing.assert_array_equal(out["indices"], [[1, 3]])
  np.testing.assert_allclose(out["quant"], [[[0.0, 1.0], [-1.0, 0.0]]], atol=1e-7)


def test_straight_through_and_losses():
  rng = np.random.RandomState(0)
  h = jnp.asarray(rng.randn(2, 6, 4).astype(np.float32))
  codebook = jnp.asarray(rng.randn(10, 4).astype(np.float32))

  def losses(h, codebook, valid=None):
    out = vq.quantize(h, codebook)
    return vq.vq_losses(out["z"], out["codes"], 0.25, valid)

  valid = np.arange(6) >= 2
  probe = jnp.asarray(rng.randn(2, 6, 4).astype(np.float32))

  @jax.jit
  def everything(h, codebook):
    # One compiled program: op-by-op dispatch of many small ops is slow on a busy CPU.
    grads = lambda i: jax.grad(lambda h, cb: losses(h, cb)[i], argnums=(0, 1))(h, codebook)
    return dict(
        out=vq.quantize(h, codebook), full=losses(h, codebook),
        masked=losses(h, codebook, valid[None]), g_vq=grads(0), g_commit=grads(1),
        g_quant=jax.grad(lambda h: jnp.sum(vq.quantize(h, codebook)["quant"] * probe))(h),
        g_z=jax.grad(lambda h: jnp.sum(vq.l2_normalize(h) * probe))(h))

  r = everything(h, codebook)
  z = np.asarray(h) / np.linalg.norm(np.asarray(h), axis=-1, keepdims=True)
  e = np.asarray(vq.l2_normalize(codebook))[np.asarray(r["out"]["indices"])]
  np.testing.assert_allclose(r["full"][0], np.mean((e - z) ** 2), rtol=1e-5)
  np.testing.assert_allclose(r["full"][1], 0.25 * np.mean((e - z) ** 2), rtol=1e-5)
  # Masked: only positions >= 2 count, averaged over them (the self-correction pass 2).
  np.testing.assert_allclose(r["masked"][0], np.mean((e - z)[:, 2:] ** 2), rtol=1e-5)
  np.testing.assert_allclose(r["masked"][1], 0.25 * np.mean((e - z)[:, 2:] ** 2), rtol=1e-5)
  # vq trains the codebook only, commit the encoder only.
  assert not np.any(r["g_vq"][0]) and np.any(r["g_vq"][1])
  assert np.any(r["g_commit"][0]) and not np.any(r["g_commit"][1])
  # Straight-through: d quant / d h == d z / d h.
  np.testing.assert_allclose(r["g_quant"], r["g_z"], rtol=1e-5, atol=1e-7)


def test_codebook_metrics():
  m = vq.codebook_metrics(jnp.array([[0, 1], [2, 3]]), 8)
  np.testing.assert_allclose(m["codebook_usage"], 0.5)
  np.testing.assert_allclose(m["perplexity"], 4.0, rtol=1e-6)
  m = vq.codebook_metrics(jnp.array([5, 5, 5]), 8)
  np.testing.assert_allclose(m["codebook_usage"], 1 / 8)
  np.testing.assert_allclose(m["perplexity"], 1.0)


def test_group_cosine_similarity():
  same = jnp.ones((1, 4, 3))
  np.testing.assert_allclose(vq.group_cosine_similarity(same, 2), 1.0, rtol=1e-6)
  opposite = jnp.array([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
  np.testing.assert_allclose(vq.group_cosine_similarity(opposite, 2), -0.5, atol=1e-6)


def test_top_k_draw_is_uniform_over_the_k_nearest():
  rng = np.random.RandomState(1)
  distances = jnp.asarray(rng.rand(64).astype(np.float32))
  draws = vq.sample_top_k_codes(jax.random.PRNGKey(0), jnp.tile(distances, (20000, 1)), 50)
  assert draws.shape == (20000,) and draws.dtype == jnp.int32
  nearest_50 = set(np.argsort(np.asarray(distances))[:50].tolist())
  counts = np.bincount(np.asarray(draws), minlength=64)
  assert set(np.flatnonzero(counts).tolist()) == nearest_50  # nearest included, none outside
  assert counts.max() < 1.25 * 400 and counts[counts > 0].min() > 0.75 * 400
  # One independent draw per token.
  two = vq.sample_top_k_codes(jax.random.PRNGKey(0), jnp.tile(distances, (2, 3, 1)), 50)
  assert two.shape == (2, 3) and len(set(np.asarray(two).ravel().tolist())) > 1
  with pytest.raises(ValueError, match=r"top_k=65 must be in \[1, codebook_size=64\]"):
    vq.sample_top_k_codes(jax.random.PRNGKey(0), distances[None], 65)


def test_codebook_init_is_uniform_then_normalised():
  module = vq.VectorQuantizer(codebook_size=512, codebook_dim=8)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"])
  codebook = np.asarray(params["codebook"])
  assert codebook.shape == (512, 8)
  np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="codebook_dim is 8"):
    module.apply({"params": params}, jnp.zeros((1, 4)))
