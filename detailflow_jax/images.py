"""PNG writing: image grids and coarse-to-fine strips."""
import os
import pathlib

import numpy as np
from PIL import Image


def to_uint8(images):
  """float images in [-1, 1] (any leading dims, ...HWC) -> uint8 [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_nearest(image, size):
  """uint8 HWC -> size x size, nearest neighbour (keeps coarse pixels visible in strips)."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


def grid(images, rows, cols, pad=2):
  """uint8 (rows*cols, H, W, C) -> one uint8 image."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  if n > rows * cols:
    raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return out


def coarse_to_fine_strip(rows_of_images, size):
  """rows_of_images: list over examples of lists over prefix lengths of uint8 HWC images of
  varying size; each is shown at `size` so every row reads coarse (left) to fine (right)."""
  rows = [[resize_nearest(im, size) for im in row] for row in rows_of_images]
  flat = [im for row in rows for im in row]
  return grid(np.stack(flat), len(rows), len(rows[0]))


def save_png(image, path):
  """Writes a PNG through a temporary file and a rename: a killed job leaves no half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path
