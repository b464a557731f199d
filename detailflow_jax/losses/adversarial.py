"""The reference's adversarial terms for the generator and the discriminator step, composed.

`disc_apply(params, state, images, rng) -> (logits, new_state)` is the discriminator, e.g.
`functools.partial(discriminator.discriminator_apply, module)`. Its state is threaded through
every call in the reference's order, since each training call updates BatchNorm / spectral-norm
statistics; real and fake batches go through separate calls (separate batch statistics), as in
the reference.

Generator step (reference VQLoss, optimizer_idx=0):
  g_loss = -mean D(aug(fake)),  weighted by gan_weight from gan_start_step on.
Discriminator step (optimizer_idx=1), with weak DiffAugment (p=0.5) when diff_augment:
  lecam EMAs updated with the batch means of D(aug(real)), D(aug(fake)) (every step);
  loss = w * (hinge(D(aug(real)), D(aug(fake))) + lecam_weight * LeCAM)
         + w_cr * mean((D(aug(real)), D(aug(fake))) - (D(strong(real)), D(strong(fake))))^2
  with w = gan_weight and w_cr = consistency_weight from gan_start_step on, 0 before; strong =
  DiffAugment 'color,translation,cutout_0.5' with p=1. Fake images are detached.
"""
import jax
import jax.numpy as jnp

from detailflow_jax.losses import diffaug
from detailflow_jax.losses import gan


def _augment(rng, images, enabled):
  if not enabled:
    return images
  return diffaug.diff_augment(rng, images, diffaug.WEAK_POLICY, prob=0.5)


def generator_adversarial_loss(disc_apply, disc_params, disc_state, fake, rng, step, loss_config):
  """Weighted generator GAN term. Returns (weighted_loss, aux) with aux = dict(g_loss (raw),
  gan_weight, disc_state (updated by this call))."""
  aug_rng, disc_rng = jax.random.split(rng)
  x = _augment(aug_rng, fake, loss_config.diff_augment)
  logits_fake, disc_state = disc_apply(disc_params, disc_state, x, disc_rng)
  g_loss = gan.hinge_g_loss(logits_fake.astype(jnp.float32))
  weight = gan.adopt_weight(loss_config.gan_weight, step, loss_config.gan_start_step)
  return weight * g_loss, dict(g_loss=g_loss, gan_weight=weight, disc_state=disc_state)


def discriminator_loss(disc_apply, disc_params, disc_state, real, fake, lecam_state, rng, step,
                       loss_config):
  """Discriminator loss (differentiate w.r.t. disc_params). Returns (loss, aux) with aux =
  dict(disc_state, lecam_state, hinge, lecam, consistency, logits_real, logits_fake (means))."""
  real = jax.lax.stop_gradient(real)
  fake = jax.lax.stop_gradient(fake)
  rngs = jax.random.split(rng, 8)
  logits_real, disc_state = disc_apply(disc_params, disc_state,
                                       _augment(rngs[0], real, loss_config.diff_augment), rngs[1])
  logits_fake, disc_state = disc_apply(disc_params, disc_state,
                                       _augment(rngs[2], fake, loss_config.diff_augment), rngs[3])
  logits_real = logits_real.astype(jnp.float32)
  logits_fake = logits_fake.astype(jnp.float32)
  hinge = gan.hinge_d_loss(logits_real, logits_fake)
  weight = gan.adopt_weight(loss_config.gan_weight, step, loss_config.gan_start_step)
  loss = hinge
  lecam = jnp.zeros((), jnp.float32)
  if loss_config.lecam_weight:
    # The reference updates the EMAs first, then regularises towards the updated values.
    lecam_state = gan.lecam_update(lecam_state, logits_real, logits_fake)
    lecam = gan.lecam_regularizer(logits_real, logits_fake, lecam_state)
    loss = loss + loss_config.lecam_weight * lecam
  loss = weight * loss
  consistency = jnp.zeros((), jnp.float32)
  if loss_config.consistency_weight:
    strong = lambda r, x: diffaug.diff_augment(r, x, diffaug.STRONG_POLICY, prob=1.0)
    logits_real_s, disc_state = disc_apply(disc_params, disc_state, strong(rngs[4], real), rngs[5])
    logits_fake_s, disc_state = disc_apply(disc_params, disc_state, strong(rngs[6], fake), rngs[7])
    consistency = gan.consistency_loss(logits_real, logits_fake,
                                       logits_real_s.astype(jnp.float32),
                                       logits_fake_s.astype(jnp.float32))
    loss = loss + gan.adopt_weight(loss_config.consistency_weight, step,
                                   loss_config.gan_start_step) * consistency
  aux = dict(disc_state=disc_state, lecam_state=lecam_state, hinge=hinge, lecam=lecam,
             consistency=consistency, gan_weight=weight,
             logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
  return loss, aux
