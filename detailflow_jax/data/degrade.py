"""Degraded training targets: what the first n tokens should decode to, on the host, in numpy.

The target for a prefix of n tokens is the image area-downsampled to R(n) pixels, then
bicubic-upsampled to the decoder's output side. Both resamplers are separable, and each output
pixel reads a few input pixels (a bin for area, 4 taps for bicubic), so each axis is applied as
a sum over "taps" of (index, weight) pairs: O(output pixels x taps), no dense matrices.

Numerics follow torch.nn.functional.interpolate exactly:
  - 'area' == adaptive average pooling: output i averages inputs
    [floor(i * in / out), ceil((i + 1) * in / out)).
  - 'bicubic', align_corners=False: source coordinate (i + 0.5) * in/out - 0.5, not clamped;
    Keys cubic with A = -0.75; the 4 neighbour indices are clamped to the border; no antialias.
"""
import functools

import numpy as np

_CUBIC_A = -0.75


@functools.lru_cache(maxsize=256)
def area_taps(in_size, out_size):
  """(index, weight) arrays of shape (out_size, taps) for adaptive average pooling."""
  _check_sizes(in_size, out_size)
  out = np.arange(out_size)
  start = (out * in_size) // out_size
  end = -((-(out + 1) * in_size) // out_size)  # ceil division
  width = end - start
  taps = int(width.max())
  offsets = np.arange(taps)
  index = np.minimum(start[:, None] + offsets[None, :], in_size - 1)
  weight = np.where(offsets[None, :] < width[:, None], 1.0 / width[:, None], 0.0)
  return index, weight.astype(np.float32)


def _cubic_weights(t):
  """Keys cubic convolution weights for the 4 neighbours at fractional offset t in [0, 1)."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def bicubic_taps(in_size, out_size):
  """(index, weight) arrays of shape (out_size, 4) for bicubic resampling (align_corners=False)."""
  _check_sizes(in_size, out_size)
  scale = np.float32(in_size / out_size)
  # float32 like the reference kernel, so floor() lands on the same neighbour.
  source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(source)
  frac = source - base
  index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
  return index, _cubic_weights(frac).astype(np.float32)


def _check_sizes(in_size, out_size):
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got in_size={in_size}, out_size={out_size}")


def _resample_rows(images, index, weight):
  """out[:, o] = sum_k weight[o, k] * images[:, index[o, k]] (resampling along axis 1).

  Axis 1 of NHWC gathers whole contiguous rows, which numpy does at memory speed (gathering
  along W moves 3-float chunks and is ~7x slower, so W is resampled after a transpose).
  """
  shape = (1, -1) + (1,) * (images.ndim - 2)
  out = images[:, index[:, 0]]
  out *= weight[:, 0].reshape(shape)
  for k in range(1, index.shape[1]):
    term = images[:, index[:, k]]
    term *= weight[:, k].reshape(shape)
    out += term
  return out


def _taps_chain(in_size, sizes):
  """Tap tables that take a side of in_size through `sizes` with the reference's rule per step."""
  chain = []
  for size in sizes:
    if size != in_size:
      chain.append((area_taps if in_size > size else bicubic_taps)(in_size, size))
    in_size = size
  return chain


def _resize_chain(images, sizes):
  """Resizes square NHWC images through the sides in `sizes` (each step as resize_images).

  All H steps run first, then one transpose, then the W steps: the separable steps commute, so
  this equals the step-by-step result up to float rounding (~1e-7) at a third of the copies.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be square NHWC (b, side, side, c), got shape {images.shape}")
  chain = _taps_chain(images.shape[1], sizes)
  if not chain:
    return images
  out = images.astype(np.float32, copy=False)
  for index, weight in chain:
    out = _resample_rows(out, index, weight)
  out = np.ascontiguousarray(out.transpose(0, 2, 1, 3))
  for index, weight in chain:
    out = _resample_rows(out, index, weight)
  return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


def resize_images(images, size):
  """Resizes square NHWC images to size x size like the reference resize_imgs.

  Larger input: area (adaptive average pooling). Equal: returned unchanged. Smaller: bicubic.
  """
  return _resize_chain(images, [size])


def degraded_target(images_nhwc, content_res, decoder_size):
  """The decoder target for a prefix whose content side is `content_res`.

  images_nhwc: (b, H, H, C) float32 in [-1, 1]. Area-downsamples to content_res, then resizes
  (bicubic up) to decoder_size. content_res == H gives the image itself at decoder_size.
  """
  images_nhwc = np.asarray(images_nhwc)
  if images_nhwc.ndim != 4:
    raise ValueError(f"images_nhwc must be (b, H, W, C), got shape {images_nhwc.shape}")
  side = images_nhwc.shape[1]
  if not 1 <= content_res <= side:
    raise ValueError(f"content_res={content_res} must be in [1, image side {side}]")
  if decoder_size < 1:
    raise ValueError(f"decoder_size={decoder_size} must be >= 1")
  return _resize_chain(images_nhwc, [content_res, decoder_size])
