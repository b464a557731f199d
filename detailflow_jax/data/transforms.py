"""Per-example image transforms: uint8 HWC RGB records in, float32 HWC in [-1, 1] out.

Training follows the official augmentation: the shorter side is resized to s ~ U{resize_min ..
resize_max} (halving with a box filter while the image is at least twice s, then bicubic, as
the ADM random_crop_arr that the reference uses), a random image_size crop is taken, and the
crop is flipped horizontally with probability 1/2. When the stored shorter side already equals
s (Fashion-MNIST at 32 px with resize_min = resize_max = 32) no resampling happens.
Evaluation uses the ADM center crop: shorter side to image_size, then the central square.
"""
import dataclasses

import grain
import numpy as np
from PIL import Image


def to_float_image(image_uint8):
  """uint8 [0, 255] -> float32 [-1, 1] (the reference's ToTensor + Normalize(0.5, 0.5))."""
  return np.asarray(image_uint8, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def resize_shorter_side(image, side):
  """Resizes so the shorter side is `side` (aspect kept, other side rounded), like ADM."""
  height, width = image.shape[:2]
  if min(height, width) == side:
    return image
  pil = Image.fromarray(image)
  # Box-filter halving first keeps large downscales from aliasing (bicubic alone would).
  while min(*pil.size) >= 2 * side:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = side / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  return np.asarray(pil)


def center_crop(image, image_size):
  """ADM center_crop_arr: shorter side to image_size, then the central image_size square."""
  image = resize_shorter_side(image, image_size)
  top = (image.shape[0] - image_size) // 2
  left = (image.shape[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def check_augment_sizes(image_size, resize_min, resize_max):
  if not image_size <= resize_min <= resize_max:
    raise ValueError(f"need image_size <= data.resize_min <= data.resize_max, got image_size="
                     f"{image_size}, resize_min={resize_min}, resize_max={resize_max} (the "
                     "shorter side is resized into [resize_min, resize_max], then cropped)")


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
  """Random shorter-side resize, random crop, random horizontal flip -> float32 [-1, 1]."""
  image_size: int
  resize_min: int
  resize_max: int
  random_flip: bool = True

  def __post_init__(self):
    check_augment_sizes(self.image_size, self.resize_min, self.resize_max)

  def random_map(self, element, rng):
    image = np.asarray(element["image"])
    side = int(rng.integers(self.resize_min, self.resize_max + 1))
    image = resize_shorter_side(image, side)
    top = int(rng.integers(0, image.shape[0] - self.image_size + 1))
    left = int(rng.integers(0, image.shape[1] - self.image_size + 1))
    image = image[top:top + self.image_size, left:left + self.image_size]
    if self.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return dict(image=to_float_image(image), label=np.int32(element["label"]))


@dataclasses.dataclass(frozen=True)
class EvalCrop(grain.transforms.Map):
  """Deterministic ADM center crop -> float32 [-1, 1]."""
  image_size: int

  def map(self, element):
    image = center_crop(np.asarray(element["image"]), self.image_size)
    return dict(image=to_float_image(image), label=np.int32(element["label"]))
