"""l2-normalised vector quantiser (cosine nearest neighbour), its losses, metrics and the top-k
random-code draw used by self-correction.

The codebook param holds the raw (K, D) rows, like the official `quantize.embedding.weight`; every
use normalises them first, so the stored rows' norms never matter.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def codebook_init(key, shape, dtype=jnp.float32):
  """U(-1/K, 1/K) then l2-normalised rows, as the official VectorQuantizer."""
  k = shape[0]
  rows = jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
  return l2_normalize(rows)


def code_distances(z, codebook_normalized):
  """Squared distances (..., K) between unit vectors z (..., D) and the normalised codes (K, D).

  Written ||z||^2 + ||e||^2 - 2 z.e like the reference so the nearest code is the same.
  """
  z = z.astype(jnp.float32)
  e = codebook_normalized.astype(jnp.float32)
  dots = jnp.einsum("...d,kd->...k", z, e, precision=HIGHEST)
  return jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(e * e, axis=-1) - 2.0 * dots


def straight_through(z, codes):
  """z + sg(codes - z): the value of `codes`, the gradient of z."""
  return z + jax.lax.stop_gradient(codes - z)


def quantize(h, codebook):
  """Nearest-code quantisation of pre-quant vectors h (..., D) against raw codebook rows (K, D).

  Returns a dict:
    z: l2-normalised h (gradient flows to h through it)
    codes: the normalised nearest codes e_index (no gradient to h)
    quant: straight-through z + sg(e_index - z)
    indices: int32 (...), the first nearest code on ties
    distances: (..., K) float32
  """
  codebook_normalized = l2_normalize(codebook.astype(jnp.float32))
  z = l2_normalize(h.astype(jnp.float32))
  distances = code_distances(z, codebook_normalized)
  indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)  # argmin keeps the first minimum
  codes = jnp.take(codebook_normalized, indices, axis=0)
  return dict(z=z, codes=codes, quant=straight_through(z, codes), indices=indices,
              distances=distances)


def sample_top_k_codes(rng, distances, top_k):
  """One code per token drawn uniformly from its `top_k` nearest codes (the nearest included).

  distances (..., K) -> int32 indices (...). Self-correction's noisy codes.
  """
  num_codes = distances.shape[-1]
  if not 1 <= top_k <= num_codes:
    raise ValueError(f"top_k={top_k} must be in [1, codebook_size={num_codes}]")
  _, nearest = jax.lax.top_k(-distances, top_k)                     # (..., top_k), ascending
  choice = jax.random.randint(rng, distances.shape[:-1], 0, top_k)  # one draw per token
  return jnp.take_along_axis(nearest, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def vq_losses(z, codes, commitment_beta, valid=None):
  """The official VQ and commitment losses.

  vq = mean((codes - sg(z))^2) and commit = beta * mean((sg(codes) - z)^2) over the tokens where
  `valid` (broadcastable to z.shape[:-1]) is True, and over the code dimension. The reference's
  self-correction pass restricts both to the positions after the noisy span: pass such a mask.
  Pass `codes` as `quantize` returns them (gathered from the normalised codebook, so the vq term
  trains the codebook through the normalisation, as the reference's does).
  """
  sq_vq = jnp.square(codes - jax.lax.stop_gradient(z))
  sq_commit = jnp.square(jax.lax.stop_gradient(codes) - z)
  if valid is None:
    return jnp.mean(sq_vq), commitment_beta * jnp.mean(sq_commit)
  weight = jnp.broadcast_to(jnp.asarray(valid, z.dtype), z.shape[:-1])[..., None]
  count = jnp.maximum(jnp.sum(weight) * z.shape[-1], 1.0)
  return (jnp.sum(sq_vq * weight) / count,
          commitment_beta * jnp.sum(sq_commit * weight) / count)


def codebook_metrics(indices, codebook_size):
  """Per-batch codebook usage (fraction of codes used at least once) and perplexity.

  Perplexity is exp(entropy) of the batch's code histogram: codebook_size when every code is used
  equally, 1 when a single code is used. (The reference's usage figure is over a ring buffer of
  its last 65536 indices; a trainer can average ours over steps instead.)
  """
  counts = jnp.zeros((codebook_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return dict(codebook_usage=jnp.mean((counts > 0).astype(jnp.float32)),
              perplexity=jnp.exp(entropy))


def group_cosine_similarity(quant, group_size):
  """Mean pairwise cosine similarity of the codes inside each group of `group_size` tokens
  (diagonal excluded): the reference's `fea_cosine_sim` log value."""
  b, n, d = quant.shape
  if group_size < 2:
    return jnp.float32(-100.0)  # the reference logs this sentinel when groups have one token
  x = l2_normalize(quant.reshape(b * (n // group_size), group_size, d).astype(jnp.float32), eps=1e-8)
  sim = jnp.einsum("gid,gjd->gij", x, x, precision=HIGHEST)
  sim = sim * (1.0 - jnp.eye(group_size, dtype=sim.dtype))
  return jnp.mean(jnp.sum(sim, axis=(-1, -2)) / (group_size * (group_size - 1)))


class VectorQuantizer(nn.Module):
  """Holds the (codebook_size, codebook_dim) codebook param ("codebook") and quantises with it."""
  codebook_size: int
  codebook_dim: int

  def setup(self):
    # Replicated: every token is compared with every code.
    self.codebook = self.param("codebook", nn.with_logical_partitioning(
        codebook_init, ("codebook", "codebook_dim")), (self.codebook_size, self.codebook_dim))

  def normalized_codebook(self):
    return l2_normalize(self.codebook.astype(jnp.float32))

  def __call__(self, h):
    """quantize(h, codebook): see `quantize`."""
    if h.shape[-1] != self.codebook_dim:
      raise ValueError(f"h has last dim {h.shape[-1]}, codebook_dim is {self.codebook_dim}")
    return quantize(h, self.codebook)

  def lookup(self, indices):
    """Normalised code vectors for int indices (...) -> (..., codebook_dim)."""
    return jnp.take(self.normalized_codebook(), indices, axis=0)
