"""PSNR / SSIM against closed forms, an explicit scipy computation and recorded skimage values."""
import math

import numpy as np
import pytest
from scipy import ndimage

from detailflow_jax.eval import recon_metrics

# scikit-image 0.26 structural_similarity / peak_signal_noise_ratio on _skimage_inputs(), per
# example: gaussian_weights=True, sigma=1.5 with use_sample_covariance False / True; skimage's
# defaults (7x7 uniform window); and the official call (defaults, data_range=2.0).
SKIMAGE_GAUSSIAN = [0.9434232711791992, 0.942466676235199]
SKIMAGE_GAUSSIAN_SAMPLE_COV = [0.9434205889701843, 0.9424638748168945]
SKIMAGE_DEFAULT = [0.943549394607544, 0.9462029933929443]
SKIMAGE_OFFICIAL_RANGE_2 = [0.9444783329963684, 0.9470643997192383]
SKIMAGE_PSNR = [20.38831501420814, 20.559334441100003]


def _skimage_inputs():
  rng = np.random.default_rng(0)
  a = rng.random((2, 24, 20, 3)).astype(np.float32)
  b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  return a, b


def explicit_ssim(a, b, data_range, weights, sample_covariance):
  """float64 SSIM of one HWC image pair: scipy separable filtering, valid region, channel mean."""
  size = len(weights)
  pad = (size - 1) // 2
  norm = size * size / (size * size - 1) if sample_covariance else 1.0
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  values = []
  for ch in range(a.shape[-1]):
    x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
    def smooth(z):
      z = ndimage.correlate1d(z, weights, axis=0, mode="reflect")
      return ndimage.correlate1d(z, weights, axis=1, mode="reflect")
    mx, my = smooth(x), smooth(y)
    vx, vy = norm * (smooth(x * x) - mx * mx), norm * (smooth(y * y) - my * my)
    vxy = norm * (smooth(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    values.append(s[pad:-pad, pad:-pad].mean())
  return float(np.mean(values))


def test_psnr_closed_form_and_identity():
  a = np.zeros((2, 8, 8, 3), np.float32)
  b = np.full_like(a, 0.1)
  np.testing.assert_allclose(recon_metrics.psnr(a, b, 1.0), [20.0, 20.0], rtol=1e-6)
  np.testing.assert_allclose(recon_metrics.psnr(a * 255, b * 255, 255.0), [20.0, 20.0], rtol=1e-5)
  assert math.isinf(float(recon_metrics.psnr(a[0], a[0], 1.0)))


def test_psnr_matches_skimage():
  a, b = _skimage_inputs()
  np.testing.assert_allclose(recon_metrics.psnr(a, b, 1.0), SKIMAGE_PSNR, rtol=1e-6)


def test_ssim_identity_and_constant_images():
  rng = np.random.default_rng(1)
  a = rng.random((16, 16, 3)).astype(np.float32)
  assert float(recon_metrics.ssim(a, a, 1.0)) == pytest.approx(1.0, abs=1e-6)
  # Two flat images: no variance, so SSIM is the luminance term alone.
  flat_a, flat_b = np.full((12, 12, 1), 0.5), np.full((12, 12, 1), 0.6)
  c1 = 0.01 ** 2
  expected = (2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1)
  assert float(recon_metrics.ssim(flat_a, flat_b, 1.0)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("window,sample_cov", [("gaussian", False), ("gaussian", True),
                                               ("uniform", True)])
def test_ssim_matches_explicit_computation(window, sample_cov):
  rng = np.random.default_rng(2)
  a = rng.integers(0, 256, (2, 19, 23, 3)).astype(np.uint8)
  b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
  ours = recon_metrics.ssim(a, b, 255.0, window=window, use_sample_covariance=sample_cov)
  weights = recon_metrics.ssim_window(window).astype(np.float64)
  expected = [explicit_ssim(a[i], b[i], 255.0, weights, sample_cov) for i in range(2)]
  np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_ssim_matches_skimage_values():
  a, b = _skimage_inputs()
  np.testing.assert_allclose(recon_metrics.ssim(a, b, 1.0), SKIMAGE_GAUSSIAN, rtol=1e-5)
  np.testing.assert_allclose(recon_metrics.ssim(a, b, 1.0, use_sample_covariance=True),
                             SKIMAGE_GAUSSIAN_SAMPLE_COV, rtol=1e-5)
  np.testing.assert_allclose(
      recon_metrics.ssim(a, b, 1.0, window="uniform", use_sample_covariance=True),
      SKIMAGE_DEFAULT, rtol=1e-5)
  # The official evaluation's data_range=2.0 on [0, 1] images reads higher than the true range.
  official = recon_metrics.ssim(a, b, 2.0, window="uniform", use_sample_covariance=True)
  np.testing.assert_allclose(official, SKIMAGE_OFFICIAL_RANGE_2, rtol=1e-5)
  assert np.all(official > np.asarray(SKIMAGE_DEFAULT))


def test_gaussian_window_is_skimage_11_tap():
  weights = recon_metrics.ssim_window("gaussian")
  assert len(weights) == 11 and weights.sum() == pytest.approx(1.0)
  np.testing.assert_allclose(weights[5] / weights[4], math.exp(0.5 / 1.5 ** 2), rtol=1e-6)


def test_metric_errors():
  a = np.zeros((8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="same shape"):
    recon_metrics.psnr(a, a[:4], 1.0)
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    recon_metrics.ssim(a, a, 1.0)
  with pytest.raises(ValueError, match="'gaussian' or 'uniform'"):
    recon_metrics.ssim_window("box")
