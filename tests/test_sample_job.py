"""The sample job's PNGs (jobs/sample.py, labelled_grid.py): class names left of the grid rows,
"n=..." and R(n) above the coarse-to-fine columns, cells upscaled x3 with nearest neighbour."""
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from detailflow_jax import api
from detailflow_jax.config import files
from detailflow_jax import detail
from detailflow_jax import images as image_io
from detailflow_jax import labelled_grid
from detailflow_jax import workdir_io
from detailflow_jax.data import fashion_mnist
from detailflow_jax.jobs import sample
from detailflow_jax.models import tokenizer as tokenizer_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDE = 32


def grid_size(rows, cols, scale=labelled_grid.SCALE, pad=2):
  """(width, height) of an unlabelled images.grid of rows x cols upscaled cells."""
  return cols * (SIDE * scale + pad) + pad, rows * (SIDE * scale + pad) + pad


def random_images(count, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, SIDE, SIDE, 3), dtype=np.uint8)


def test_upscale_is_nearest_neighbour():
  image = random_images(1)[0]
  big = labelled_grid.upscale(image, 3)
  assert big.shape == (96, 96, 3)
  np.testing.assert_array_equal(big[::3, ::3], image)
  np.testing.assert_array_equal(big[2::3, 1::3], image)


def test_labelled_grid_adds_the_label_margin():
  names = list(fashion_mnist.CLASS_NAMES)
  images = random_images(30)
  plain = labelled_grid.labelled_grid(images, 10, 3)
  labelled = labelled_grid.labelled_grid(images, 10, 3, row_labels=names)
  width, height = grid_size(10, 3)
  assert plain.shape == (height, width, 3)
  margin = labelled_grid.left_margin(names)
  assert margin > 2 * labelled_grid.LABEL_GAP  # the widest name takes room
  assert labelled.shape == (height, width + margin, 3)
  np.testing.assert_array_equal(labelled[:, margin:], plain)  # the images are untouched
  column = labelled[:, :margin]
  assert (column < 128).any()  # text was drawn left of the rows
  # Each row's label sits beside its row: dark pixels in every row's band of the margin.
  band = SIDE * labelled_grid.SCALE + 2
  for r in range(10):
    assert (column[2 + r * band:2 + (r + 1) * band] < 128).any(), r
  with pytest.raises(ValueError, match="3 row labels for 10 rows"):
    labelled_grid.labelled_grid(images, 10, 3, row_labels=names[:3])


def test_labelled_strip_has_a_header():
  rows = [[random_images(1, seed=r * 10 + c)[0][:s, :s] for c, s in enumerate((4, 8, 32))]
          for r in range(2)]
  strip = labelled_grid.labelled_strip(rows, SIDE, ["a", "b"], ["n=1\nR(n)=4", "n=2\nR(n)=8",
                                                                "n=8\nR(n)=32"])
  width, height = grid_size(2, 3)
  top = labelled_grid.top_margin(["n=1\nR(n)=4"])
  assert top == 2 * labelled_grid.LINE_HEIGHT + labelled_grid.LABEL_GAP
  assert strip.shape == (height + top, width + labelled_grid.left_margin(["a", "b"]), 3)
  assert (strip[:top] < 128).any()
  # The coarse 4 x 4 cell is still blocky: nearest neighbour to 32, then x3.
  left = labelled_grid.left_margin(["a", "b"])
  cell = strip[top + 2:top + 2 + 96, left + 2:left + 2 + 96]
  np.testing.assert_array_equal(cell[::24, ::24], rows[0][0])


def test_class_names():
  assert sample.class_names("fashion_mnist", 10) == list(fashion_mnist.CLASS_NAMES)
  assert sample.class_names("tfds", 3) == ["0", "1", "2"]
  assert sample.class_names("fashion_mnist", 4) == ["0", "1", "2", "3"]


def test_tokenizer_data_source(tmp_path):
  config = files.load_config_file(str(REPO_ROOT / "configs" / "tokenizer_tiny.py:smoke"))
  workdir_io.save_workdir_config(config, tmp_path)
  assert sample.tokenizer_data_source(tmp_path) == "fashion_mnist"
  assert sample.tokenizer_data_source(tmp_path / "missing") == ""


@pytest.fixture(scope="module")
def tiny_tokenizer():
  config = files.load_config_file(str(REPO_ROOT / "configs" / "tokenizer_tiny.py:smoke"))
  config.tokenizer.num_tokens = 8  # prefix lengths 1, 2, 3, 4, 8: few compiled decodes
  params = tokenizer_model.init_params(config.tokenizer, jax.random.PRNGKey(0))
  return api.tokenizer_params(params, config.tokenizer)


def test_write_outputs_labels_rows_and_columns(tmp_path, tiny_tokenizer):
  num_classes, per_class = 10, 1
  labels = sample.class_labels(num_classes, per_class)
  codes = np.random.default_rng(0).integers(
      0, tiny_tokenizer.config.codebook_size, (len(labels), tiny_tokenizer.config.num_tokens))
  names = sample.class_names("fashion_mnist", num_classes)
  images = sample.write_outputs(tmp_path, tiny_tokenizer, codes, labels, num_classes, per_class,
                                names)
  assert images.shape == (10, SIDE, SIDE, 3) and images.dtype == np.uint8
  margin = labelled_grid.left_margin(names)
  width, height = grid_size(num_classes, per_class)
  with Image.open(tmp_path / "grid.png") as grid:
    assert grid.size == (width + margin, height)
    pixels = np.asarray(grid.convert("RGB"))
  # The cells hold the samples, x3 nearest neighbour.
  np.testing.assert_array_equal(pixels[2:2 + 96:3, margin + 2:margin + 2 + 96:3], images[0])
  token_counts = api.decodable_token_counts(tiny_tokenizer.config)
  assert token_counts == (1, 2, 3, 4, 8)
  schedule = detail.resolution_schedule(tiny_tokenizer.config)
  columns = sample.strip_column_labels(tiny_tokenizer.config, token_counts)
  assert columns[-1] == f"n=8\nR(n)={schedule.content_resolution(8)}"
  strip_width, strip_height = grid_size(num_classes, len(token_counts))
  with Image.open(tmp_path / "coarse_to_fine.png") as strip:
    assert strip.size == (strip_width + margin, strip_height + labelled_grid.top_margin(columns))
  with np.load(tmp_path / "samples.npz") as npz:
    np.testing.assert_array_equal(npz["arr_0"], images)
    np.testing.assert_array_equal(npz["arr_1"], labels)


def test_write_outputs_at_a_chosen_size(tmp_path, tiny_tokenizer):
  # An any-resolution version of the fixture's tokenizer (N = 8 at 32 px): sides 20 and 32, with
  # 4 and 8 codes. Samples of a 20 px image are its 4 codes decoded at 20 px; the strip shows
  # prefixes up to 4 codes in 20 px cells.
  config = tiny_tokenizer.config.to_dict()
  config["min_image_size"] = 20
  tokenizer = api.tokenizer_params(tiny_tokenizer.params, config)
  assert api.supported_image_sizes(tokenizer.config) == (20, 32)
  assert api.token_count_for_size(tokenizer.config, 20) == 4
  num_classes, per_class, side = 10, 1, 20
  labels = sample.class_labels(num_classes, per_class)
  codes = np.random.default_rng(0).integers(0, tokenizer.config.codebook_size, (len(labels), 4))
  names = sample.class_names("", num_classes)
  images = sample.write_outputs(tmp_path, tokenizer, codes, labels, num_classes, per_class, names,
                                image_size=side)
  assert images.shape == (10, side, side, 3)
  expected = np.clip(np.asarray(api.decode(tokenizer, codes, image_size=side)), -1, 1)
  np.testing.assert_array_equal(images, image_io.to_uint8(expected))
  columns = sample.strip_column_labels(tokenizer.config, (1, 2, 3, 4))
  margin, cell = labelled_grid.left_margin(names), side * labelled_grid.SCALE + 2
  with Image.open(tmp_path / "coarse_to_fine.png") as strip:
    assert strip.size == (4 * cell + 2 + margin,
                          num_classes * cell + 2 + labelled_grid.top_margin(columns))
