"""Dead-code restarts: which rows move, where they go, and the running counts."""
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.config import defaults
from detailflow_jax.models import quantizer
from detailflow_jax.train import code_reset

K, D = 16, 4


def _setup(every=5):
  cfg = defaults.code_reset_config()
  cfg.every = every
  codebook = quantizer.codebook_init(jax.random.PRNGKey(0), (K, D))
  latents = quantizer.l2_normalize(jax.random.normal(jax.random.PRNGKey(1), (2, 8, D)))
  indices = jnp.zeros((2, 8), jnp.int32).at[:, 4:].set(3)   # codes 0 and 3 used, 8 times each
  return cfg, codebook, latents, indices


def test_due_step_moves_only_dead_codes_onto_batch_latents():
  cfg, codebook, latents, indices = _setup()
  usage = code_reset.init_usage(K, 16)
  usage = usage.at[5].set(0.0).at[9].set(0.0)    # two codes far below the even share
  new, new_usage, restarted = code_reset.restart_dead_codes(
      codebook, usage, indices, latents, jnp.int32(10), jax.random.PRNGKey(2), cfg)
  moved = np.flatnonzero(np.any(np.asarray(new) != np.asarray(codebook), axis=-1))
  np.testing.assert_array_equal(moved, [5, 9])
  assert int(restarted) == 2
  flat = np.asarray(latents).reshape(-1, D)
  for row in moved:  # each restarted row sits within the 0.01-noise of some batch latent
    nearest = np.min(np.abs(flat - np.asarray(new)[row]).max(axis=-1))
    assert nearest < 0.06, nearest
  even_share = 16 / K
  np.testing.assert_allclose(np.asarray(new_usage)[[5, 9]], even_share)
  # Used codes gained count, unused ones decayed: 0.95 * 1 + 0.05 * 8 and 0.95 * 1.
  np.testing.assert_allclose(np.asarray(new_usage)[[0, 3, 1]], [1.35, 1.35, 0.95], rtol=1e-6)


def test_off_steps_only_update_the_counts():
  cfg, codebook, latents, indices = _setup(every=5)
  usage = jnp.zeros((K,), jnp.float32)   # everything dead, but step 7 is not a restart step
  new, new_usage, restarted = code_reset.restart_dead_codes(
      codebook, usage, indices, latents, jnp.int32(7), jax.random.PRNGKey(2), cfg)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(codebook))
  assert int(restarted) == 0
  np.testing.assert_allclose(np.asarray(new_usage)[[0, 3, 1]], [0.4, 0.4, 0.0], rtol=1e-6)


def test_restart_is_deterministic_under_jit():
  cfg, codebook, latents, indices = _setup()
  usage = jnp.zeros((K,), jnp.float32)
  fn = jax.jit(lambda c, u, i, z, s, r: code_reset.restart_dead_codes(c, u, i, z, s, r, cfg))
  a = fn(codebook, usage, indices, latents, jnp.int32(5), jax.random.PRNGKey(3))
  b = fn(codebook, usage, indices, latents, jnp.int32(5), jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  assert int(a[2]) == K - 2   # all but the two used codes
