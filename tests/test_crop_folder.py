"""crop_folder: held-out groups, crop sizes, determinism and its errors."""
import numpy as np
import pytest
from PIL import Image

from detailflow_jax.data import crop_folder, image_folder


def _write_pictures(root, groups, side=160):
  rng = np.random.default_rng(0)
  for group in groups:
    for variant in ("light", "dark"):
      folder = root / group
      folder.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, size=(side, side + 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"{variant}.png")


def _group_split(groups, fraction):
  return {g: "test" if crop_folder.is_test_group(g, fraction) else "train" for g in groups}


def _groups_with_both_splits(fraction=0.5):
  names = [f"g{i}" for i in range(40)]
  split = _group_split(names, fraction)
  return ([n for n in names if split[n] == "train"][:2] +
          [n for n in names if split[n] == "test"][:1])


def test_layout_counts_and_held_out_groups(tmp_path):
  groups = _groups_with_both_splits()
  _write_pictures(tmp_path / "src", groups)
  counts = crop_folder.write_crop_folder([tmp_path / "src"], tmp_path / "out", size=16,
                                         crops_per_picture=3, min_side=32, min_picture_side=64,
                                         test_fraction=0.5)
  assert counts == {"train": 2 * 2 * 3, "test": 1 * 2 * 3}
  train = image_folder.ImageFolderSource(tmp_path / "out", "train")
  test = image_folder.ImageFolderSource(tmp_path / "out", "test")
  assert set(train.classes) == set(groups[:2]) and test.classes == (groups[2],)
  assert len(train) == 12 and len(test) == 6
  assert train[0]["image"].shape == (16, 16, 3)


def test_deterministic_for_a_seed(tmp_path):
  groups = _groups_with_both_splits()
  _write_pictures(tmp_path / "src", groups)
  arrays = []
  for name in ("a", "b"):
    crop_folder.write_crop_folder([tmp_path / "src"], tmp_path / name, size=8,
                                  crops_per_picture=2, min_side=16, min_picture_side=64,
                                  test_fraction=0.5, seed=3)
    source = image_folder.ImageFolderSource(tmp_path / name, "train")
    arrays.append(np.stack([source[i]["image"] for i in range(len(source))]))
  np.testing.assert_array_equal(arrays[0], arrays[1])


def test_crops_span_the_side_range():
  rng = np.random.default_rng(0)
  picture = np.zeros((300, 400, 3), np.uint8)
  picture[:, :200] = 255          # a crop of the left half only is white, of both halves grey
  crops = crop_folder.random_crops(picture, 200, 8, 16, rng)
  means = np.array([c.mean() for c in crops])
  assert means.min() == 0 and means.max() == 255 and ((means > 0) & (means < 255)).any()


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="is not a folder"):
    crop_folder.write_crop_folder([tmp_path / "missing"], tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no pictures"):
    crop_folder.write_crop_folder([tmp_path / "empty"], tmp_path / "out")
  groups = _groups_with_both_splits()
  _write_pictures(tmp_path / "src", groups[:2])   # train groups only
  with pytest.raises(ValueError, match="one split is empty"):
    crop_folder.write_crop_folder([tmp_path / "src"], tmp_path / "out2", size=8,
                                  crops_per_picture=1, min_side=16, min_picture_side=64,
                                  test_fraction=0.5)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(ValueError, match="not empty"):
    crop_folder.write_crop_folder([tmp_path / "src"], tmp_path / "full")
