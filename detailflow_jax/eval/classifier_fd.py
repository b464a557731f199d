"""Classifier FD: the Frechet distance of Fashion-MNIST images in a fixed classifier's features.

A cheap domain metric beside (never instead of) Inception FID. Inception costs ~0.2 s per image on
a 2-core CPU; the judge CNN (eval/judge_classifier.py) costs ~4 MFLOP per image, so the 128-d
penultimate features of 10,000 samples take seconds. It says how far samples are from the test
split as a Fashion-MNIST classifier sees them; Inception FID stays the standard figure.

Figures are comparable across runs only in one feature space, so the judge is *fixed*: trained
once per dataset by train_judge's recipe (3 epochs, seed 0) and cached with the test split's
feature mean and covariance, in one .npz keyed by dataset, input side, epochs, seed and a
fingerprint of the data files (a different folder, e.g. test data, gets its own judge). The cache
folder is $DETAILFLOW_JUDGE_CACHE or ~/.cache/detailflow_jax/judge (the Inception weights' folder;
config key eval.judge_cache_dir). The distance itself is eval/fid.py's frechet_distance.

  python -m detailflow_jax.eval.classifier_fd [--samples=samples.npz] [--fashion_mnist_dir=DIR]

trains or loads the judge, prints the real-vs-real floor (two halves of the test split, 5,000
vs 5,000) and the classifier FD of an ADM-layout sample .npz.
"""
import argparse
import functools
import hashlib
import os
import pathlib
import warnings
from typing import NamedTuple

import numpy as np
from flax import traverse_util
from scipy import linalg

from detailflow_jax.config.defaults import FASHION_MNIST_DIR
from detailflow_jax.data import degrade
from detailflow_jax.data import fashion_mnist
from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import inputs
from detailflow_jax.eval import judge_classifier

DATASET = "fashion_mnist"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "detailflow_jax", "judge")
CACHE_DIR_ENV = "DETAILFLOW_JUDGE_CACHE"
FORMAT_VERSION = "fixed_judge_v1"
DEFAULT_EPOCHS = 3
DEFAULT_SEED = 0


def default_cache_dir():
  """$DETAILFLOW_JUDGE_CACHE or DEFAULT_CACHE_DIR (beside the Inception weights)."""
  return os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def fashion_mnist_arrays(directory, split):
  """uint8 (n, 32, 32, 1) padded images and int labels of a Fashion-MNIST split."""
  source = fashion_mnist.FashionMNISTSource(directory, split)
  images, labels = source._load()  # pylint: disable=protected-access
  pad = fashion_mnist.PAD
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
  return padded[..., None], np.asarray(labels, np.int64)


def data_fingerprint(directory):
  """First 10 hex digits of the sha1 of the split files (both splits, images and labels)."""
  digest = hashlib.sha1()
  for split, prefix in sorted(fashion_mnist.SPLIT_PREFIX.items()):
    for kind in ("images-idx3", "labels-idx1"):
      path = pathlib.Path(directory) / f"{prefix}-{kind}-ubyte.gz"
      if not path.is_file():
        fashion_mnist.FashionMNISTSource(directory, split)  # raises naming the file and key
      digest.update(path.read_bytes())
  return digest.hexdigest()[:10]


def cache_path(fashion_mnist_dir, epochs=DEFAULT_EPOCHS, seed=DEFAULT_SEED, cache_dir=""):
  """The judge's cache file: <cache_dir>/judge-fashion_mnist-32px-3ep-seed0-<data sha1>.npz."""
  name = (f"judge-{DATASET}-{fashion_mnist.IMAGE_SIDE}px-{epochs}ep-seed{seed}-"
          f"{data_fingerprint(fashion_mnist_dir)}.npz")
  return pathlib.Path(os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()) / name


class FixedJudge(NamedTuple):
  params: dict                           # JudgeCNN params (numpy)
  test_statistics: fid_lib.FIDStatistics  # features of the test split: mean [128], cov [128, 128]
  test_accuracy: float
  num_test_images: int
  epochs: int
  seed: int
  path: str

  def describe(self):
    """What a results file records about the feature space."""
    return dict(network="judge CNN penultimate layer (128-d)", cache=self.path,
                dataset=DATASET, image_side=fashion_mnist.IMAGE_SIDE, epochs=self.epochs,
                seed=self.seed, test_accuracy=self.test_accuracy,
                reference=f"{DATASET} test split ({self.num_test_images} images)")


def save_judge(path, judge: FixedJudge):
  """One .npz (params under params/..., test statistics, metadata), written atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {f"params/{k}": np.asarray(v)
            for k, v in traverse_util.flatten_dict(judge.params, sep="/").items()}
  arrays.update(test_mu=judge.test_statistics.mu, test_sigma=judge.test_statistics.sigma,
                test_accuracy=np.array(judge.test_accuracy),
                num_test_images=np.array(judge.num_test_images), epochs=np.array(judge.epochs),
                seed=np.array(judge.seed), __format__=np.array(FORMAT_VERSION))
  tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_judge(path) -> FixedJudge:
  with np.load(path) as data:
    if "__format__" not in data.files or str(data["__format__"]) != FORMAT_VERSION:
      raise ValueError(f"{path} is not a {FORMAT_VERSION} judge cache; delete it to retrain")
    flat = {k[len("params/"):]: data[k] for k in data.files if k.startswith("params/")}
    return FixedJudge(
        params=traverse_util.unflatten_dict(flat, sep="/"),
        test_statistics=fid_lib.FIDStatistics(data["test_mu"], data["test_sigma"]),
        test_accuracy=float(data["test_accuracy"]), num_test_images=int(data["num_test_images"]),
        epochs=int(data["epochs"]), seed=int(data["seed"]), path=str(path))


def fixed_judge(fashion_mnist_dir=FASHION_MNIST_DIR, epochs=DEFAULT_EPOCHS, seed=DEFAULT_SEED,
                cache_dir="", log=None) -> FixedJudge:
  """The cached judge of these data files, epochs and seed; trained and cached on first use."""
  log = log or functools.partial(print, flush=True)
  path = cache_path(fashion_mnist_dir, epochs, seed, cache_dir)
  if path.is_file():
    return load_judge(path)
  log(f"judge: training the fixed judge ({epochs} epochs, seed {seed}); cached in {path}")
  train_images, train_labels = fashion_mnist_arrays(fashion_mnist_dir, "train")
  params = judge_classifier.train_judge(train_images, train_labels, epochs=epochs, seed=seed,
                                        log=log)
  params = traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()})
  test_images, test_labels = fashion_mnist_arrays(fashion_mnist_dir, "test")
  predictions, features = judge_classifier.predict_and_features(params, test_images)
  judge = FixedJudge(params, fid_lib.statistics(features),
                     float(np.mean(predictions == test_labels)), len(test_images), int(epochs),
                     int(seed), str(path))
  save_judge(path, judge)
  return judge


def _at_judge_side(batch):
  """uint8 NHWC at the judge's 32 x 32 (other sides resized as the tokenizer's targets are)."""
  batch = np.asarray(batch)
  if batch.ndim == 3:
    batch = batch[None]
  if batch.dtype != np.uint8:
    raise ValueError(f"images must be uint8 in [0, 255], got {batch.dtype}")
  side = fashion_mnist.IMAGE_SIDE
  if batch.shape[1:3] == (side, side):
    return batch
  return inputs.to_uint8(degrade.resize_images(batch.astype(np.float32) / 127.5 - 1.0, side))


def predict_and_features(judge: FixedJudge, batches):
  """(predictions [N], features [N, 128]) of an iterable of uint8 NHWC batches (or one array)."""
  if isinstance(batches, np.ndarray):
    batches = [batches]
  preds, feats = [], []
  for batch in batches:
    p, f = judge_classifier.predict_and_features(judge.params, _at_judge_side(batch))
    preds.append(p)
    feats.append(f)
  if not preds:
    raise ValueError("no images to score")
  return np.concatenate(preds), np.concatenate(feats)


def _frechet(stats_a, stats_b, method):
  # ReLU units that never fire (43 of 128 in the Fashion-MNIST judge) make every covariance
  # singular, so scipy's sqrtm warns on each call; its value agrees with the eigenvalue route
  # and with eval_fid_reference.independent_fid to ~2e-6 there.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    return fid_lib.frechet_distance(stats_a, stats_b, method=method)


def frechet_to_test(judge: FixedJudge, features, method="sqrtm"):
  """Classifier FD of features [N >= 2, 128] against the judge's test-split statistics."""
  return _frechet(fid_lib.statistics(features), judge.test_statistics, method)


def score_samples(judge: FixedJudge, batches, labels, method="sqrtm"):
  """Classifier FD against the test split and the judge's class scores of labelled samples.

  batches: uint8 NHWC batches (e.g. inputs.iterate_npz_images of a samples.npz) or one array;
  labels: the conditioning class of each image, in order.
  """
  predictions, features = predict_and_features(judge, batches)
  labels = np.asarray(labels)
  if len(labels) != len(predictions):
    raise ValueError(f"{len(predictions)} images but {len(labels)} labels")
  return dict(
      classifier_fd=frechet_to_test(judge, features, method),
      classifier_in_class_fraction=float(np.mean(predictions == labels)),
      classifier_per_class_accuracy={int(c): float(np.mean(predictions[labels == c] == c))
                                     for c in np.unique(labels)},
      num_images=int(len(labels)))


def real_vs_real(judge: FixedJudge, fashion_mnist_dir=FASHION_MNIST_DIR, seed=0,
                 method="sqrtm"):
  """The floor: classifier FD between two halves (a seeded random split) of the test split."""
  images, _ = fashion_mnist_arrays(fashion_mnist_dir, "test")
  order = np.random.default_rng(seed).permutation(len(images))
  half = len(images) // 2
  _, features = predict_and_features(judge, images[order])
  first, second = features[:half], features[half:2 * half]
  return dict(classifier_fd=_frechet(fid_lib.statistics(first), fid_lib.statistics(second),
                                     method),
              num_images=[len(first), len(second)], split_seed=seed)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--fashion_mnist_dir", default=FASHION_MNIST_DIR)
  parser.add_argument("--cache_dir", default="", help=f"default: ${CACHE_DIR_ENV} or "
                      f"{DEFAULT_CACHE_DIR}")
  parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
  parser.add_argument("--samples", default="", help="ADM-layout .npz (arr_0 uint8 images, "
                      "arr_1 labels) to score")
  args = parser.parse_args(argv)
  judge = fixed_judge(args.fashion_mnist_dir, args.epochs, args.seed, args.cache_dir)
  print(f"judge {judge.path}: test accuracy {judge.test_accuracy:.4f}", flush=True)
  floor = real_vs_real(judge, args.fashion_mnist_dir)
  print(f"classifier FD, test split halves ({floor['num_images'][0]} vs "
        f"{floor['num_images'][1]}): {floor['classifier_fd']:.4f}", flush=True)
  if args.samples:
    with np.load(args.samples) as data:
      labels = data["arr_1"]
    scores = score_samples(judge, inputs.iterate_npz_images(args.samples, 500), labels)
    print(f"{args.samples}: classifier FD {scores['classifier_fd']:.4f}, in class "
          f"{scores['classifier_in_class_fraction']:.4f} of {scores['num_images']}", flush=True)


if __name__ == "__main__":
  main()
