"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) in JAX, as the reference uses it.

A policy is a comma-separated list of augmentations, e.g. "color,translation,cutout_0.2". Each
item is applied to the whole batch with probability `prob` (one coin per item and call, as the
reference); the random parameters inside an item (brightness, shift, cutout box) are drawn per
image. All randomness comes from the explicit `rng`. Images are NHWC, any value range (the
reference applies it to [-1, 1] images); shapes stay static under jit.
"""
import jax
import jax.numpy as jnp

# What the reference feeds the discriminator (prob 0.5) and its consistency term (prob 1.0).
WEAK_POLICY = "color,translation,cutout_0.2"
STRONG_POLICY = "color,translation,cutout_0.5"
TRANSLATION_RATIO = 0.125


def _uniform_per_image(rng, images):
  return jax.random.uniform(rng, (images.shape[0], 1, 1, 1), images.dtype)


def rand_brightness(rng, x):
  """Adds U[-0.5, 0.5) per image."""
  return x + (_uniform_per_image(rng, x) - 0.5)


def rand_saturation(rng, x):
  """Scales the deviation from the per-pixel channel mean by U[0, 2) per image."""
  mean = x.mean(axis=-1, keepdims=True)
  return (x - mean) * (_uniform_per_image(rng, x) * 2) + mean


def rand_contrast(rng, x):
  """Scales the deviation from the per-image mean by U[0.5, 1.5) per image."""
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_uniform_per_image(rng, x) + 0.5) + mean


def _shift_axis(x, shift, axis):
  """out[i] = x[i + shift] along `axis` (1 or 2, per image), zero where i + shift is outside."""
  size = x.shape[axis]
  idx = jnp.arange(size)[None, :] + shift[:, None]                      # (B, size)
  valid = (idx >= 0) & (idx < size)
  shape = [x.shape[0], 1, 1, 1]
  shape[axis] = size
  idx = jnp.broadcast_to(jnp.clip(idx, 0, size - 1).reshape(shape),
                         x.shape[:axis] + (size,) + x.shape[axis + 1:])
  return jnp.where(valid.reshape(shape), jnp.take_along_axis(x, idx, axis=axis), 0)


def rand_translation(rng, x, ratio=TRANSLATION_RATIO):
  """Shifts each image by up to round(ratio * side) pixels per axis, filling with zeros."""
  b, h, w, _ = x.shape
  max_h, max_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
  rng_h, rng_w = jax.random.split(rng)
  shift_h = jax.random.randint(rng_h, (b,), -max_h, max_h + 1)
  shift_w = jax.random.randint(rng_w, (b,), -max_w, max_w + 1)
  return _shift_axis(_shift_axis(x, shift_h, 1), shift_w, 2)


def rand_cutout(rng, x, ratio):
  """Zeroes one box of round(ratio * side) pixels per image at a random centre.

  The reference clamps box rows/columns into the image; the box always overlaps the image, so
  that equals cutting the part of the box inside the image, which is what is done here.
  """
  b, h, w, _ = x.shape
  size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
  rng_h, rng_w = jax.random.split(rng)
  centre_h = jax.random.randint(rng_h, (b, 1), 0, h + (1 - size_h % 2))
  centre_w = jax.random.randint(rng_w, (b, 1), 0, w + (1 - size_w % 2))
  start_h, start_w = centre_h - size_h // 2, centre_w - size_w // 2
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_h = (rows >= start_h) & (rows < start_h + size_h)                 # (B, H)
  in_w = (cols >= start_w) & (cols < start_w + size_w)                 # (B, W)
  keep = ~(in_h[:, :, None] & in_w[:, None, :])
  return x * keep[..., None].astype(x.dtype)


def _color(rng, x):
  r1, r2, r3 = jax.random.split(rng, 3)
  return rand_contrast(r3, rand_saturation(r2, rand_brightness(r1, x)))


def _policy_fn(name):
  if name == "color":
    return _color
  if name == "translation":
    return rand_translation
  if name.startswith("cutout"):
    ratio = 0.5 if name == "cutout" else float(name.split("_", 1)[1])
    return lambda rng, x: rand_cutout(rng, x, ratio)
  raise ValueError(f"unknown DiffAugment policy item {name!r}; use color, translation or "
                   "cutout_<ratio> (e.g. 'color,translation,cutout_0.2')")


def diff_augment(rng, images, policy=WEAK_POLICY, prob=0.5):
  """Applies each item of `policy` (in order) with probability `prob`; see the module doc."""
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC, got shape {images.shape}")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob must be in [0, 1], got {prob}")
  x = images
  for name in [p.strip() for p in policy.split(",") if p.strip()]:
    fn = _policy_fn(name)
    rng, coin_rng, aug_rng = jax.random.split(rng, 3)
    if prob >= 1.0:
      x = fn(aug_rng, x)
    elif prob > 0.0:
      x = jnp.where(jax.random.bernoulli(coin_rng, prob), fn(aug_rng, x), x)
  return x
