"""Differentiable image resizing that matches PyTorch's F.interpolate, for jit-compiled losses.

The discriminators resize their input (reconstructions at any decoder size) to one fixed size.
Each resize is a pair of small constant matrices (built in numpy at trace time, since sizes are
static) applied along height and width, so it is exact, differentiable and cheap to compile.
"""
import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of PyTorch's mode='area' (adaptive average pooling).

  Output i averages inputs [floor(i*in/out), ceil((i+1)*in/out)), PyTorch's bin edges.
  """
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m.astype(np.float32)


def _cubic(t, a=-0.75):
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of PyTorch's mode='bicubic', align_corners=False, no antialias.

  Source coordinate (i + 0.5) * in/out - 0.5 (not clamped, as PyTorch's cubic path), the
  Keys kernel with A = -0.75 on the 4 nearest taps, tap indices clamped to the border.
  """
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    frac = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), in_size - 1)] += _cubic(k - frac)
  return m.astype(np.float32)


def torch_resize(images, height: int, width: int, mode=None):
  """NHWC images -> (B, height, width, C), as PyTorch's F.interpolate with `mode`.

  mode: 'area' or 'bicubic'; None picks the reference discriminator's rule: 'area' when the
  height shrinks, else 'bicubic' (bicubic at equal size is the identity). Like PyTorch, one mode
  serves both sides.
  """
  _, h, w, _ = images.shape
  if mode is None:
    mode = "area" if h > height else "bicubic"
  if mode not in ("area", "bicubic"):
    raise ValueError(f"mode must be 'area', 'bicubic' or None, got {mode!r}")
  matrix = area_matrix if mode == "area" else bicubic_matrix
  rows = jnp.asarray(matrix(h, height), images.dtype)
  cols = jnp.asarray(matrix(w, width), images.dtype)
  out = jnp.einsum("oh,bhwc->bowc", rows, images, precision="highest")
  return jnp.einsum("pw,bowc->bopc", cols, out, precision="highest")
