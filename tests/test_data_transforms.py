"""Per-example transforms: official augmentation, ADM center crop, [-1, 1] scaling."""
import numpy as np
import pytest
from PIL import Image

from detailflow_jax.data import transforms


def test_to_float_image_range():
  out = transforms.to_float_image(np.array([0, 255, 128], np.uint8))
  np.testing.assert_allclose(out, [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
  assert out.dtype == np.float32


def test_same_size_is_flip_only():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  augment = transforms.TrainAugment(image_size=32, resize_min=32, resize_max=32)
  flips = 0
  for seed in range(200):
    out = augment.random_map(dict(image=image, label=3), np.random.default_rng(seed))
    plain = np.array_equal(out["image"], transforms.to_float_image(image))
    flipped = np.array_equal(out["image"], transforms.to_float_image(image[:, ::-1]))
    assert plain or flipped
    flips += flipped
    assert out["label"] == 3 and out["label"].dtype == np.int32
  assert 70 < flips < 130
  no_flip = transforms.TrainAugment(32, 32, 32, random_flip=False)
  out = no_flip.random_map(dict(image=image, label=0), np.random.default_rng(1))
  np.testing.assert_array_equal(out["image"], transforms.to_float_image(image))


def test_resize_and_crop_like_adm():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)
  resized = transforms.resize_shorter_side(image, 20)
  # 60 >= 2*20: one box halving to 30x45, then bicubic to 20x30 (round(45 * 20/30) = 30).
  pil = Image.fromarray(image).resize((30, 45), Image.BOX).resize((20, 30), Image.BICUBIC)
  np.testing.assert_array_equal(resized, np.asarray(pil))
  augment = transforms.TrainAugment(image_size=16, resize_min=16, resize_max=20)
  sides = set()
  for seed in range(30):
    out = augment.random_map(dict(image=image, label=1), np.random.default_rng(seed))
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    sides.add(int(np.random.default_rng(seed).integers(16, 21)))
  assert len(sides) > 2


def test_center_crop_is_deterministic_adm():
  image = np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3)
  out = transforms.center_crop(image, 40)
  np.testing.assert_array_equal(out, image[:, 5:45])
  crop = transforms.EvalCrop(20)
  a = crop.map(dict(image=image, label=2))
  b = crop.map(dict(image=image, label=2))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (20, 20, 3)


def test_augment_size_validation():
  with pytest.raises(ValueError, match="image_size <= data.resize_min <= data.resize_max"):
    transforms.TrainAugment(image_size=256, resize_min=224, resize_max=320)
  with pytest.raises(ValueError, match="resize_min=330, resize_max=320"):
    transforms.TrainAugment(image_size=256, resize_min=330, resize_max=320)
