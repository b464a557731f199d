"""Judging class-conditional samples with a classifier trained on the real data."""
import functools
import json
import pathlib
import pickle

import numpy as np

from detailflow_jax.data import fashion_mnist
from detailflow_jax.eval import judge_classifier


def fashion_mnist_arrays(directory, split):
  """uint8 (n, 32, 32, 1) padded images and int labels of a Fashion-MNIST split."""
  source = fashion_mnist.FashionMNISTSource(directory, split)
  images, labels = source._load()  # pylint: disable=protected-access
  pad = fashion_mnist.PAD
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
  return padded[..., None], np.asarray(labels, np.int64)


def trained_judge(workdir, fashion_mnist_dir, epochs, log=None):
  """Judge params, trained once and cached in WORKDIR/judge_params.pkl; with its test accuracy."""
  workdir = pathlib.Path(workdir)
  cache = workdir / "judge_params.pkl"
  test_images, test_labels = fashion_mnist_arrays(fashion_mnist_dir, "test")
  if cache.is_file():
    params = pickle.loads(cache.read_bytes())
  else:
    train_images, train_labels = fashion_mnist_arrays(fashion_mnist_dir, "train")
    params = judge_classifier.train_judge(train_images, train_labels, epochs=epochs, log=log)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(jax_to_numpy(params)))
    tmp.replace(cache)
  return params, judge_classifier.accuracy(params, test_images, test_labels)


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(np.asarray, tree)


def judge_samples(workdir, samples_uint8, labels, fashion_mnist_dir, epochs=3, log=None):
  """Trains (or reuses) the judge and reports how many samples land in their class."""
  log = log or functools.partial(print, flush=True)
  params, test_accuracy = trained_judge(workdir, fashion_mnist_dir, epochs, log)
  predictions = judge_classifier.predict(params, samples_uint8)
  labels = np.asarray(labels)
  per_class = {int(c): float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)}
  report = dict(judge_test_accuracy=test_accuracy,
                sample_class_accuracy=float(np.mean(predictions == labels)),
                per_class_accuracy=per_class, num_samples=int(len(labels)))
  path = pathlib.Path(workdir) / "judge_report.json"
  path.write_text(json.dumps(report, indent=2))
  log(f"judge: test accuracy {test_accuracy:.4f}; samples in their conditioning class: "
      f"{report['sample_class_accuracy']:.4f} of {len(labels)} ({path})")
  return report
