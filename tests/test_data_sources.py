"""Image sources: Fashion-MNIST IDX parsing, image folders (with corrupt files), TFDS errors."""
import io
import logging
import pathlib

import numpy as np
import pytest
from fake_fashion_mnist import write_fake_fashion_mnist
from PIL import Image

from detailflow_jax.config import defaults
from detailflow_jax.data import fashion_mnist
from detailflow_jax.data import image_folder
from detailflow_jax.data import sources
from detailflow_jax.data import tfds_source


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fmnist")
  return directory, write_fake_fashion_mnist(directory)


def test_fashion_mnist_parse_pad_rgb(fake_fmnist):
  directory, written = fake_fmnist
  for split in ("train", "test"):
    images, labels = written[split]
    source = fashion_mnist.FashionMNISTSource(directory, split)
    assert len(source) == len(labels) and source.num_classes == 10
    record = source[3]
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    np.testing.assert_array_equal(record["image"][2:30, 2:30, 1], images[3])
    assert record["image"][:2].max() == 0 and record["image"][:, 30:].max() == 0
    np.testing.assert_array_equal(record["image"][..., 0], record["image"][..., 2])
    assert record["label"] == labels[3]
    assert source[-1]["label"] == labels[-1]
  with pytest.raises(IndexError):
    source[len(source)]


def test_fashion_mnist_pickles_without_arrays(fake_fmnist):
  import pickle  # pylint: disable=g-import-not-at-top
  source = fashion_mnist.FashionMNISTSource(fake_fmnist[0], "train")
  first = source[0]
  clone = pickle.loads(pickle.dumps(source))
  assert clone._arrays is None  # pylint: disable=protected-access
  np.testing.assert_array_equal(clone[0]["image"], first["image"])


@pytest.mark.skipif(not pathlib.Path(defaults.FASHION_MNIST_DIR).is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
  train = fashion_mnist.FashionMNISTSource(split="train")
  test = fashion_mnist.FashionMNISTSource(split="test")
  assert (len(train), len(test)) == (60000, 10000)
  assert train[0]["label"] == 9 and test[0]["label"] == 9  # both start with an ankle boot
  assert train[0]["image"].shape == (32, 32, 3)


def test_fashion_mnist_errors(tmp_path):
  with pytest.raises(ValueError) as error:
    fashion_mnist.FashionMNISTSource(tmp_path / "missing", "train")
  for part in (str(tmp_path / "missing"), "data.fashion_mnist_dir",
               "apt-get install dataset-fashion-mnist"):
    assert part in str(error.value)
  with pytest.raises(ValueError, match="split='val' must be one of"):
    fashion_mnist.FashionMNISTSource(tmp_path, "val")
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    (bad / name).write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is not a readable gzipped IDX"):
    fashion_mnist.FashionMNISTSource(bad, "train")


def _png_bytes(shape, value):
  buffer = io.BytesIO()
  Image.fromarray(np.full(shape, value, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture()
def folder(tmp_path):
  """train/{cat,dog}: cat has a good PNG, a corrupt .jpg and a truncated PNG; dog two grey PNGs."""
  cat, dog = tmp_path / "train" / "cat", tmp_path / "train" / "dog"
  cat.mkdir(parents=True)
  dog.mkdir(parents=True)
  (cat / "a.png").write_bytes(_png_bytes((10, 12, 3), 50))
  (cat / "b.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
  (cat / "c.png").write_bytes(_png_bytes((40, 40, 3), 70)[:60])
  (dog / "d.png").write_bytes(_png_bytes((8, 9), 100))  # grey -> RGB
  (dog / "e.png").write_bytes(_png_bytes((8, 9), 120))
  (dog / "notes.txt").write_text("not an image")
  return tmp_path


def test_image_folder_layout_and_skip(folder, caplog):
  source = image_folder.ImageFolderSource(folder, "train", skip_corrupt=True)
  assert source.classes == ("cat", "dog") and source.num_classes == 2 and len(source) == 5
  first = source[0]
  assert first["image"].shape == (10, 12, 3) and first["label"] == 0
  with caplog.at_level(logging.WARNING):
    replaced = source[1]  # b.jpg and c.png are unreadable -> next readable file, d.png
  assert replaced["label"] == 1 and replaced["image"].shape == (8, 9, 3)
  assert int(replaced["image"].max()) == 100
  assert source.num_skipped == 2
  assert "b.jpg" in caplog.text and "c.png" in caplog.text


def test_image_folder_errors(folder, tmp_path_factory):
  strict = image_folder.ImageFolderSource(folder, "train", skip_corrupt=False)
  with pytest.raises(ValueError, match=r"cannot read image .*b\.jpg"):
    strict[1]
  with pytest.raises(ValueError, match="data.folder"):
    image_folder.ImageFolderSource(folder, "val")
  with pytest.raises(ValueError, match="data.folder is empty"):
    image_folder.ImageFolderSource("", "train")
  empty = tmp_path_factory.mktemp("empty")
  (empty / "train").mkdir()
  with pytest.raises(ValueError, match="no class subfolders"):
    image_folder.ImageFolderSource(empty, "train")


def test_make_source_dispatch(fake_fmnist, folder):
  data = defaults.data_config()
  data.fashion_mnist_dir = str(fake_fmnist[0])
  assert isinstance(sources.make_source(data, "test"), fashion_mnist.FashionMNISTSource)
  assert sources.num_classes(data) == 10
  data.source, data.folder = "folder", str(folder)
  assert sources.num_classes(data) == 2
  data.source = "codes"
  with pytest.raises(ValueError, match="data.source='codes' is not an image source"):
    sources.make_source(data, "train")


def test_a_part_of_a_split_is_its_records_renumbered(fake_fmnist):
  data = defaults.data_config()
  data.fashion_mnist_dir = str(fake_fmnist[0])
  _, labels = fake_fmnist[1]["train"]
  n = len(labels)
  whole = sources.make_source(data, "train")
  tail = sources.make_source(data, f"train[{n - 3}:]")
  head = sources.make_source(data, "train[:-3]")
  assert (len(tail), len(head), tail.num_classes) == (3, n - 3, 10)
  for i in range(3):
    np.testing.assert_array_equal(tail[i]["image"], whole[n - 3 + i]["image"])
    assert tail[i]["label"] == labels[n - 3 + i]
  assert head[n - 4]["label"] == labels[n - 4]
  with pytest.raises(IndexError):
    tail[3]
  with pytest.raises(ValueError, match=r"NAME\[START:STOP\]"):
    sources.make_source(data, "train[5]")
  with pytest.raises(ValueError, match=r"'train\[5:5\]' selects no records"):
    sources.make_source(data, "train[5:5]")


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError) as error:
    tfds_source.TFDSSource("imagenet2012", "train", data_dir=str(tmp_path))
  message = str(error.value)
  for part in ("not prepared", "tfds build imagenet2012", "--file_format=array_record",
               "manual", "data.tfds_name", str(tmp_path)):
    assert part in message
  with pytest.raises(ValueError, match="TFDS has no dataset named 'no_such_dataset_xyz'"):
    tfds_source.TFDSSource("no_such_dataset_xyz", "train", data_dir=str(tmp_path))


def test_tfds_source_records():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=4):
    source = tfds_source.TFDSSource("mnist", "train")
    assert len(source) == 4 and source.num_classes == 10
    record = source[2]
  assert record["image"].shape == (28, 28, 3) and record["image"].dtype == np.uint8
  assert 0 <= record["label"] < 10
