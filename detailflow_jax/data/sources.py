"""Picks the image source named by config.data.source.

Every source is grain-compatible random access (__len__, __getitem__ -> dict(image=uint8 HWC
RGB, label=int)) and has `num_classes`.
"""
from detailflow_jax.data import fashion_mnist
from detailflow_jax.data import image_folder
from detailflow_jax.data import tfds_source

IMAGE_SOURCES = ("fashion_mnist", "folder", "tfds")


def make_source(data_cfg, split):
  """The source for `split` of the dataset that the `data` ConfigDict names."""
  kind = data_cfg.source
  if kind == "fashion_mnist":
    return fashion_mnist.FashionMNISTSource(data_cfg.fashion_mnist_dir, split)
  if kind == "folder":
    return image_folder.ImageFolderSource(data_cfg.folder, split,
                                          skip_corrupt=data_cfg.skip_corrupt_images)
  if kind == "tfds":
    return tfds_source.TFDSSource(data_cfg.tfds_name, split, data_dir=data_cfg.tfds_data_dir)
  raise ValueError(f"data.source={kind!r} is not an image source; use one of {IMAGE_SOURCES} "
                   "('codes' is the AR model's input, read by the code pipeline)")


def num_classes(data_cfg, split=None):
  """Number of classes of the configured dataset (label values are 0 .. num_classes - 1)."""
  return make_source(data_cfg, split or data_cfg.train_split).num_classes
