"""Picks the image source named by config.data.source.

Every source is grain-compatible random access (__len__, __getitem__ -> dict(image=uint8 HWC
RGB, label=int)) and has `num_classes`. A split may name a contiguous part of itself as
"train[58000:]" or "train[:58000]" (TFDS's slice syntax), so a recipe search can train on one
part of the training images and score on the rest without touching the test split.
"""
import re

from detailflow_jax.data import fashion_mnist
from detailflow_jax.data import image_folder
from detailflow_jax.data import tfds_source

IMAGE_SOURCES = ("fashion_mnist", "folder", "tfds")
_SLICED_SPLIT = re.compile(r"^(?P<split>[^\[\]]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


class SplitSlice:
  """Records start .. stop - 1 of a random-access source, renumbered from 0."""

  def __init__(self, source, start, stop, name):
    self.source = source
    self.range = range(len(source))[slice(start, stop)]
    if not self.range:
      raise ValueError(f"split {name!r} selects no records of the {len(source)} in "
                       f"{source!r}; give start < stop within 0 .. {len(source)}")
    self.num_classes = source.num_classes
    self.split = name

  def __len__(self):
    return len(self.range)

  def __getitem__(self, index):
    return self.source[self.range[index]]

  def __repr__(self):
    return f"{self.source!r}[{self.range.start}:{self.range.stop}]"


def parse_split(split):
  """'train[a:b]' -> ('train', a, b) with None for an empty bound; 'train' -> ('train', None,
  None). Anything else with brackets is an error naming the syntax."""
  if "[" not in split and "]" not in split:
    return split, None, None
  match = _SLICED_SPLIT.match(split)
  if not match:
    raise ValueError(f"split {split!r}: a part of a split is written NAME[START:STOP] with "
                     "integer bounds, either of which may be empty, e.g. 'train[58000:]'")
  bound = lambda text: int(text) if text else None  # pylint: disable=unnecessary-lambda-assignment
  return match["split"], bound(match["start"]), bound(match["stop"])


def make_source(data_cfg, split):
  """The source for `split` (a split name, or a part of one: 'train[:58000]') of the dataset
  that the `data` ConfigDict names."""
  kind = data_cfg.source
  if kind == "tfds":   # TFDS reads its own slice syntax
    return tfds_source.TFDSSource(data_cfg.tfds_name, split, data_dir=data_cfg.tfds_data_dir)
  name, start, stop = parse_split(split)
  source = _make_whole_split(data_cfg, kind, name)
  if start is None and stop is None:
    return source
  return SplitSlice(source, start, stop, split)


def _make_whole_split(data_cfg, kind, split):
  if kind == "fashion_mnist":
    return fashion_mnist.FashionMNISTSource(data_cfg.fashion_mnist_dir, split)
  if kind == "folder":
    return image_folder.ImageFolderSource(data_cfg.folder, split,
                                          skip_corrupt=data_cfg.skip_corrupt_images)
  raise ValueError(f"data.source={kind!r} is not an image source; use one of {IMAGE_SOURCES} "
                   "('codes' is the AR model's input, read by the code pipeline)")


def num_classes(data_cfg, split=None):
  """Number of classes of the configured dataset (label values are 0 .. num_classes - 1)."""
  return make_source(data_cfg, split or data_cfg.train_split).num_classes
