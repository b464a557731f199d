"""Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist` package, as 32x32 RGB.

28x28 grey images are padded by 2 px of background (0) on each side, so the side (32) divides
by the small patch sizes the tiny configs use, and repeated to 3 channels.
"""
import contextlib
import gzip
import pathlib
import struct
import threading

import numpy as np

from detailflow_jax.config.defaults import FASHION_MNIST_DIR as DEFAULT_DIR

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
PAD = 2
IMAGE_SIDE = 28 + 2 * PAD

_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type these files use


def read_idx_header(path):
  """The shape stored in a gzipped IDX file, reading only its header."""
  with _open_idx(path) as (_, shape):
    return shape


def read_idx(path):
  """The array stored in a gzipped IDX file (big-endian header, uint8 payload)."""
  with _open_idx(path) as (f, shape):
    payload = f.read()
  expected = int(np.prod(shape))
  if len(payload) != expected:
    raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                     f"{len(payload)} bytes; the file is truncated or corrupt")
  return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


@contextlib.contextmanager
def _open_idx(path):
  """Yields (open gzip file positioned at the payload, shape); bad files -> ValueError."""
  try:
    with gzip.open(path, "rb") as f:
      magic = f.read(4)
      if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] != _UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic!r})")
      dims = magic[3]
      shape = struct.unpack(f">{dims}I", f.read(4 * dims))
      yield f, shape
  except (OSError, EOFError, struct.error) as error:
    raise ValueError(f"{path} is not a readable gzipped IDX file: {error}") from error


class FashionMNISTSource:
  """Random-access source (grain-compatible): record i -> dict(image=(32, 32, 3) uint8, label=int).

  The files are decompressed on first access, not at construction, so the object stays cheap
  to pickle into grain worker processes.
  """

  num_classes = len(CLASS_NAMES)

  def __init__(self, directory=DEFAULT_DIR, split="train"):
    if split not in SPLIT_PREFIX:
      raise ValueError(f"Fashion-MNIST split={split!r} must be one of {sorted(SPLIT_PREFIX)}")
    directory = pathlib.Path(directory)
    prefix = SPLIT_PREFIX[split]
    self._image_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    self._label_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (self._image_path, self._label_path):
      if not path.is_file():
        raise ValueError(
            f"Fashion-MNIST file {path} not found (config key data.fashion_mnist_dir="
            f"'{directory}'). Install it with `apt-get install dataset-fashion-mnist` (files go to "
            f"{DEFAULT_DIR}) or point data.fashion_mnist_dir at a folder with "
            f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz.")
    image_shape = read_idx_header(self._image_path)
    label_shape = read_idx_header(self._label_path)
    if len(image_shape) != 3 or image_shape[1:] != (28, 28) or label_shape != image_shape[:1]:
      raise ValueError(f"{self._image_path} / {self._label_path}: shapes {image_shape} / "
                       f"{label_shape} are not (n, 28, 28) images with n labels")
    self._length = image_shape[0]
    self._arrays = None  # (images, labels), set once both are read
    self._lock = threading.Lock()  # grain reads from several threads
    self.split = split

  def _load(self):
    with self._lock:
      if self._arrays is None:
        self._arrays = (read_idx(self._image_path), read_idx(self._label_path))
    return self._arrays

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_arrays"] = None  # workers decompress their own copy
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    index = int(index)
    if not -self._length <= index < self._length:
      raise IndexError(f"index {index} out of range for {self._length} records")
    images, labels = self._arrays or self._load()
    grey = np.pad(images[index], PAD)
    return dict(image=np.repeat(grey[:, :, None], 3, axis=2), label=int(labels[index]))

  def __repr__(self):
    return f"FashionMNISTSource(split={self.split!r}, len={self._length})"
