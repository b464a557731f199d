"""Image sources for evaluation: each yields uint8 NHWC numpy batches.

Sources: a folder of images, an ADM-style .npz (`arr_0`: uint8 NHWC, streamed so that 50k
images never sit in memory twice), a TFDS split (random-access `tfds.data_source`, no
TensorFlow needed), or any iterator of uint8 batches the caller builds.
"""
import os
import zipfile

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(images):
  """Model outputs in [-1, 1] -> uint8 in [0, 255], rounding to nearest.

  floor(127.5 x + 128) is round-to-nearest of 127.5 (x + 1): the official DetailFlow saves
  reconstructions this way (ADM's own sampler truncates instead, half a level lower on average).
  """
  x = np.floor(127.5 * np.asarray(images, np.float32) + 128.0)
  return np.clip(x, 0, 255).astype(np.uint8)


def center_crop_resize(image, size):
  """ADM's reference-batch crop: halve with a box filter while the short side is >= 2*size,
  bicubic-resize the short side to size, then take the centre size x size square (uint8 HWC)."""
  pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).squeeze())
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
  array = np.asarray(pil)
  top = (array.shape[0] - size) // 2
  left = (array.shape[1] - size) // 2
  array = array[top:top + size, left:left + size]
  return array[..., None] if array.ndim == 2 else array


def batch_images(images, batch_size):
  """Groups single HWC images into NHWC batches; a change of image shape starts a new batch."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  pending = []
  for image in images:
    image = np.asarray(image)
    if pending and image.shape != pending[0].shape:
      yield np.stack(pending)
      pending = []
    pending.append(image)
    if len(pending) == batch_size:
      yield np.stack(pending)
      pending = []
  if pending:
    yield np.stack(pending)


def list_image_files(folder, extensions=IMAGE_EXTENSIONS):
  """Sorted paths of the image files under folder (recursively)."""
  if not os.path.isdir(folder):
    raise ValueError(f"image folder {folder!r} does not exist or is not a directory")
  paths = []
  for root, _, files in os.walk(folder):
    paths.extend(os.path.join(root, f) for f in files if f.lower().endswith(extensions))
  if not paths:
    raise ValueError(f"no image files ({', '.join(extensions)}) under {folder!r}")
  return sorted(paths)


def iterate_image_folder(folder, batch_size, image_size=None, extensions=IMAGE_EXTENSIONS):
  """uint8 NHWC batches of the folder's images (RGB), in sorted path order.

  image_size: if set, each image is centre-cropped and resized to it (center_crop_resize);
  otherwise images keep their size and a size change starts a new batch.
  """
  def images():
    for path in list_image_files(folder, extensions):
      with Image.open(path) as pil:
        pil = pil.convert("RGB")
        yield center_crop_resize(pil, image_size) if image_size else np.asarray(pil)
  return batch_images(images(), batch_size)


def _open_npy_member(npz_path, key):
  archive = zipfile.ZipFile(npz_path)
  member = f"{key}.npy"
  if member not in archive.namelist():
    names = [n[:-4] for n in archive.namelist()]
    archive.close()
    raise ValueError(f"{npz_path} has no array {key!r}; it has {names}")
  return archive, archive.open(member)


def npz_array_keys(npz_path):
  with zipfile.ZipFile(npz_path) as archive:
    return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def iterate_npz_images(npz_path, batch_size, key="arr_0", max_images=None):
  """Streams uint8 NHWC batches from an .npz array (ADM sample / reference batch layout).

  The array is read batch by batch from the zip member, so memory stays at one batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  archive, f = _open_npy_member(npz_path, key)
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"{npz_path}:{key} uses .npy format {version}; expected 1.0 or 2.0")
    if fortran_order or dtype.hasobject:
      raise ValueError(f"{npz_path}:{key} must be a C-ordered numeric array")
    if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8:
      raise ValueError(f"{npz_path}:{key} must be uint8 [N, H, W, 1 or 3], got {dtype} {shape}")
    total = shape[0] if max_images is None else min(shape[0], max_images)
    per_image = int(np.prod(shape[1:]))
    for start in range(0, total, batch_size):
      count = min(batch_size, total - start)
      raw = f.read(count * per_image)
      if len(raw) != count * per_image:
        raise ValueError(f"{npz_path}:{key} is truncated at image {start}")
      yield np.frombuffer(raw, np.uint8).reshape(count, *shape[1:])
  finally:
    f.close()
    archive.close()


def iterate_tfds(name, split, batch_size, data_dir=None, image_size=None, image_key="image",
                 max_images=None):
  """uint8 NHWC batches from a TFDS split through tfds.data_source (array_record format).

  image_size: centre-crop/resize each image to it (ADM's reference preprocessing); needed when
  the split's images differ in size (ImageNet). Grayscale datasets keep one channel (the
  Inception preprocessing repeats it to RGB).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  total = len(source) if max_images is None else min(len(source), max_images)

  def images():
    for index in range(total):
      example = source[index]
      if image_key not in example:
        raise ValueError(f"TFDS {name}:{split} examples have no {image_key!r} feature; "
                         f"features are {sorted(example)}")
      image = np.asarray(example[image_key], np.uint8)
      yield center_crop_resize(image, image_size) if image_size else image
  return batch_images(images(), batch_size)
