"""GAN loss terms of the reference tokenizer training: hinge losses, LeCAM, consistency, weights.

All functions are pure; the LeCAM logit EMAs are a small pytree (`LecamState`) carried by the
trainer next to the discriminator state.

Step convention: `step` is the reference's `global_step`, the number of the update being
computed counting from 1 (the reference passes train_steps + 1).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

LECAM_DECAY = 0.999


def hinge_d_loss(logits_real, logits_fake):
  """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake))
  return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake):
  """-mean D(fake)."""
  return -jnp.mean(logits_fake)


class LecamState(NamedTuple):
  """EMAs of the mean real and fake discriminator logits (float32 scalars)."""
  real_ema: jax.Array
  fake_ema: jax.Array


def lecam_init(init=0.0):
  return LecamState(jnp.asarray(init, jnp.float32), jnp.asarray(init, jnp.float32))


def lecam_update(state, logits_real, logits_fake, decay=LECAM_DECAY):
  """One EMA step with the batch-mean logits (no gradient flows into the EMAs)."""
  real = jax.lax.stop_gradient(jnp.mean(logits_real).astype(jnp.float32))
  fake = jax.lax.stop_gradient(jnp.mean(logits_fake).astype(jnp.float32))
  return LecamState(state.real_ema * decay + real * (1 - decay),
                    state.fake_ema * decay + fake * (1 - decay))


def lecam_regularizer(logits_real, logits_fake, state):
  """LeCAM (Tseng et al. 2021):
  mean relu(D(real) - ema_fake)^2 + mean relu(ema_real - D(fake))^2."""
  return (jnp.mean(jnp.square(jax.nn.relu(logits_real - state.fake_ema)))
          + jnp.mean(jnp.square(jax.nn.relu(state.real_ema - logits_fake))))


def consistency_loss(logits_real, logits_fake, logits_real_aug, logits_fake_aug):
  """bCR: mean squared difference between logits of plain and strongly augmented inputs.

  The reference takes the MSE of the concatenated [real; fake] logits, i.e. the mean over both.
  """
  plain = jnp.concatenate([logits_real, logits_fake], axis=0)
  augmented = jnp.concatenate([logits_real_aug, logits_fake_aug], axis=0)
  return jnp.mean(jnp.square(plain - augmented))


def adopt_weight(weight, step, start_step):
  """`weight` from `start_step` on, 0 before (reference: zero while global_step < start)."""
  return jnp.where(jnp.asarray(step) >= start_step, jnp.asarray(weight, jnp.float32), 0.0)


def warmup_weight(weight, step, warmup_steps):
  """min(1, step / warmup_steps) * weight; the full weight when warmup_steps is 0 or None."""
  if not warmup_steps:
    return jnp.asarray(weight, jnp.float32)
  ramp = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
  return ramp * weight
