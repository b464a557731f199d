"""Reconstruction metrics: PSNR and SSIM, per example, jitted, for [H, W, C] or [B, H, W, C].

`data_range` is the span of the pixel values: 1.0 for images in [0, 1], 255 for uint8, 2.0 for
[-1, 1]. (The official DetailFlow evaluation passes data_range=2.0 with [0, 1] images, which
inflates SSIM; here the caller states the true range.)

SSIM follows Wang et al. 2004 as scikit-image's structural_similarity computes it: local means,
variances and covariance under a window, averaged over the pixels whose window lies fully inside
the image and over channels. Defaults are the paper's (and torchmetrics') 11x11 Gaussian,
sigma 1.5, population covariance: skimage's `gaussian_weights=True, sigma=1.5,
use_sample_covariance=False`. skimage's own defaults (7x7 uniform window, sample covariance),
which the official evaluation used, are window="uniform", use_sample_covariance=True.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _as_batch(a, b, name):
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"{name}: images must have the same shape, got {a.shape} and {b.shape}")
  if a.ndim not in (3, 4):
    raise ValueError(f"{name}: images must be [H, W, C] or [B, H, W, C], got shape {a.shape}")
  single = a.ndim == 3
  if single:
    a, b = a[None], b[None]
  return a.astype(jnp.float32), b.astype(jnp.float32), single


@jax.jit
def psnr(a, b, data_range):
  """Peak signal-to-noise ratio in dB per example: 10 log10(data_range^2 / MSE) ([B] or scalar);
  identical images give inf."""
  a, b, single = _as_batch(a, b, "psnr")
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  value = 10.0 * jnp.log10(jnp.square(jnp.asarray(data_range, jnp.float32)) / mse)
  return value[0] if single else value


def ssim_window(window="gaussian", win_size=None, sigma=1.5):
  """1D weights of the separable SSIM window (numpy, sums to 1)."""
  if window == "gaussian":
    # skimage: truncate 3.5 sigma -> radius int(3.5 * sigma + 0.5); 11 taps at sigma 1.5.
    size = win_size or 2 * int(3.5 * sigma + 0.5) + 1
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-0.5 * np.square(offsets / sigma))
  elif window == "uniform":
    size = win_size or 7
    weights = np.ones(size)
  else:
    raise ValueError(f"window must be 'gaussian' or 'uniform', got {window!r}")
  if size < 3 or size % 2 == 0:
    raise ValueError(f"win_size must be odd and >= 3, got {size}")
  return (weights / weights.sum()).astype(np.float32)


def _filter_valid(x, weights):
  """Separable filter of [N, H, W, C] images, each channel alone, 'valid' region only."""
  n, h, w, c = x.shape
  planes = x.transpose(0, 3, 1, 2).reshape(n * c, h, w, 1)
  taps = jnp.asarray(weights)
  dims = ("NHWC", "HWIO", "NHWC")
  planes = jax.lax.conv_general_dilated(planes, taps.reshape(-1, 1, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=dims, precision=_HIGHEST)
  planes = jax.lax.conv_general_dilated(planes, taps.reshape(1, -1, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=dims, precision=_HIGHEST)
  return planes.reshape(n, c, planes.shape[1], planes.shape[2])


@functools.partial(jax.jit, static_argnames=("window", "win_size", "sigma",
                                              "use_sample_covariance", "k1", "k2"))
def ssim(a, b, data_range, window="gaussian", win_size=None, sigma=1.5,
         use_sample_covariance=False, k1=0.01, k2=0.03):
  """Mean structural similarity per example ([B] or scalar), channels averaged."""
  a, b, single = _as_batch(a, b, "ssim")
  weights = ssim_window(window, win_size, sigma)
  size = len(weights)
  if min(a.shape[1:3]) < size:
    raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the "
                     f"{size}x{size} window; use a smaller win_size")
  # Work in units of data_range so float32 keeps precision for any pixel scale.
  scale = 1.0 / jnp.asarray(data_range, jnp.float32)
  a, b = a * scale, b * scale
  # (Co)variances are shift invariant: take them on images centred per channel, so that
  # E[x^2] - E[x]^2 does not cancel catastrophically in float32 on bright, flat regions.
  offset_a = jnp.mean(a, axis=(1, 2), keepdims=True)
  offset_b = jnp.mean(b, axis=(1, 2), keepdims=True)
  a, b = a - offset_a, b - offset_b
  mean_a, mean_b = _filter_valid(a, weights), _filter_valid(b, weights)
  mean_aa, mean_bb = _filter_valid(a * a, weights), _filter_valid(b * b, weights)
  mean_ab = _filter_valid(a * b, weights)
  cov_norm = size * size / (size * size - 1.0) if use_sample_covariance else 1.0
  var_a = cov_norm * (mean_aa - mean_a * mean_a)
  var_b = cov_norm * (mean_bb - mean_b * mean_b)
  cov_ab = cov_norm * (mean_ab - mean_a * mean_b)
  # Back to the true local means for the luminance term ([N, C, h, w] vs [N, 1, 1, C] offsets).
  mean_a = mean_a + offset_a.reshape(offset_a.shape[0], -1)[:, :, None, None]
  mean_b = mean_b + offset_b.reshape(offset_b.shape[0], -1)[:, :, None, None]
  c1, c2 = k1 * k1, k2 * k2
  ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov_ab + c2) /
              ((mean_a * mean_a + mean_b * mean_b + c1) * (var_a + var_b + c2)))
  value = jnp.mean(ssim_map, axis=(1, 2, 3))
  return value[0] if single else value
