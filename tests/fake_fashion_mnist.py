"""Writes a small Fashion-MNIST-format folder (gzipped IDX) so data tests need no system package."""
import gzip
import struct

import numpy as np


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def write_fake_fashion_mnist(directory, num_train=40, num_test=10, seed=0):
  """Random 28x28 images; label i % 10. Returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, prefix, count in (("train", "train", num_train), ("test", "t10k", num_test)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    written[split] = (images, labels)
  return written
