"""Images in class subfolders (the ImageNet layout): <root>/<split>/<class>/<image file>.

Classes are the sorted subfolder names, so label i is the i-th class in sorted order (the same
numbering as torchvision's ImageFolder, which the official checkpoints were trained with).
"""
import os
import pathlib

import numpy as np
from absl import logging
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# A run of this many unreadable files in a row is a broken dataset, not a few bad files.
MAX_CONSECUTIVE_CORRUPT = 100


def decode_image_file(path):
  """The file as an (H, W, 3) uint8 RGB array; PIL errors propagate (OSError and subclasses)."""
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


class ImageFolderSource:
  """Random-access source (grain-compatible): record i -> dict(image=(H, W, 3) uint8, label=int).

  An unreadable file (corrupt or truncated) is, with skip_corrupt, replaced by the next readable
  file and counted in `num_skipped` with a warning; without skip_corrupt it raises a ValueError
  naming the file. Replacing keeps every batch full (static shapes) and the stream deterministic.
  """

  def __init__(self, root, split, skip_corrupt=True):
    if not root:
      raise ValueError("data.folder is empty: set it to a folder laid out as "
                       "<folder>/<split>/<class>/<image>")
    split_dir = pathlib.Path(root) / split
    if not split_dir.is_dir():
      raise ValueError(f"image folder split {split_dir} not found (config keys data.folder="
                       f"'{root}' and the split '{split}'); expected "
                       "<folder>/<split>/<class>/<image>")
    self.classes = tuple(sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir()))
    if not self.classes:
      raise ValueError(f"{split_dir} has no class subfolders; expected <split>/<class>/<image>")
    paths, labels = [], []
    for label, name in enumerate(self.classes):
      files = sorted(entry.name for entry in os.scandir(split_dir / name)
                     if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
      paths.extend(os.path.join(name, f) for f in files)
      labels.extend([label] * len(files))
    if not paths:
      raise ValueError(f"{split_dir} has no image files ({', '.join(IMAGE_EXTENSIONS)}) in its "
                       "class subfolders")
    self.split_dir = split_dir
    self.split = split
    self.skip_corrupt = skip_corrupt
    # numpy arrays, not lists: compact for 1.28M ImageNet paths and quick to pickle to workers.
    self._paths = np.asarray(paths)
    self._labels = np.asarray(labels, dtype=np.int32)
    self.num_skipped = 0

  @property
  def num_classes(self):
    return len(self.classes)

  def path(self, index):
    return self.split_dir / str(self._paths[index])

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, index):
    index = int(index)
    length = len(self._paths)
    if not -length <= index < length:
      raise IndexError(f"index {index} out of range for {length} records")
    index %= length
    for attempt in range(min(length, MAX_CONSECUTIVE_CORRUPT)):
      current = (index + attempt) % length
      try:
        return dict(image=decode_image_file(self.path(current)),
                    label=int(self._labels[current]))
      except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for bad files
        if not self.skip_corrupt:
          raise ValueError(f"cannot read image {self.path(current)}: {error} (set "
                           "data.skip_corrupt_images=True to skip unreadable files)") from error
        self.num_skipped += 1
        logging.warning("skipping unreadable image %s (%s); %d skipped so far in this process",
                        self.path(current), error, self.num_skipped)
    raise ValueError(f"{MAX_CONSECUTIVE_CORRUPT} consecutive unreadable images from "
                     f"{self.path(index)} on: is {self.split_dir} really an image folder?")

  def __repr__(self):
    return (f"ImageFolderSource({str(self.split_dir)!r}, len={len(self)}, "
            f"classes={self.num_classes})")
