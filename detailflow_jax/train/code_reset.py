"""Dead-code restarts for the tokenizer's codebook.

Not part of the paper: the official encoder starts from SigLIP2 weights, whose latents are
diverse from step one. A small encoder trained from scratch (the Fashion-MNIST tiny config)
instead sends almost every token to a handful of codes within the first hundred steps
(measured: 5 of 1024 codes in use by step 200), and codes that are never selected get no
gradient, so they never come back. This module keeps a running count of how often each code is
selected and, every `every` steps, moves the codes whose count fell below `min_fraction` of an
even share onto latents drawn at random from the current batch, the usual restart of the VQ
literature. Off (every = 0) in the paper configs; settings in config.defaults.code_reset_config.

Everything runs inside the jitted train step on fixed shapes: the reset is a `where` over the
(K, D) codebook, so it adds no compiled variant and no host round-trip.
"""
import jax
import jax.numpy as jnp


def init_usage(codebook_size, tokens_per_step):
  """Every code starts at the even share, so none is restarted before it had a chance."""
  return jnp.full((codebook_size,), tokens_per_step / codebook_size, jnp.float32)


def selection_counts(indices, codebook_size):
  return jnp.zeros((codebook_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def restart_dead_codes(codebook, usage, indices, latents, step, rng, cfg):
  """One update of the running counts and, on restart steps, of the dead codebook rows.

  codebook (K, D) raw rows; usage (K,) running counts; indices (...) this step's selected codes;
  latents (..., D) this step's l2-normalised encoder outputs; step: the step just taken (traced).
  Returns (codebook, usage, num_restarted).
  """
  k = codebook.shape[0]
  flat = latents.reshape(-1, latents.shape[-1]).astype(codebook.dtype)
  even_share = flat.shape[0] / k
  usage = cfg.decay * usage + (1.0 - cfg.decay) * selection_counts(indices, k)
  due = (step % cfg.every) == 0
  dead = due & (usage < cfg.min_fraction * even_share)
  pick_rng, noise_rng = jax.random.split(rng)
  picks = jax.random.randint(pick_rng, (k,), 0, flat.shape[0])
  # A little noise keeps two dead codes that draw the same latent apart.
  replacement = jax.lax.stop_gradient(flat[picks]) + 0.01 * jax.random.normal(
      noise_rng, codebook.shape, codebook.dtype)
  codebook = jnp.where(dead[:, None], replacement, codebook)
  usage = jnp.where(dead, even_share, usage)
  return codebook, usage, jnp.sum(dead.astype(jnp.int32))
