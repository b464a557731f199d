"""Classifier FD (eval/classifier_fd.py), the judge's features (eval/judge_classifier.py) and the
judge job (jobs/judge.py), on random or fake Fashion-MNIST data (tests/fake_fashion_mnist.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from detailflow_jax.eval import classifier_fd
from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import judge_classifier
from detailflow_jax.jobs import judge as judge_job
from fake_fashion_mnist import write_fake_fashion_mnist

# Fewer images than feature dimensions give singular covariances, which the FD code handles
# (ADM's eps retry) after scipy warns.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


@pytest.fixture(scope="module")
def random_params():
  return judge_classifier.JudgeCNN().init(jax.random.PRNGKey(0),
                                          jnp.zeros((1, 32, 32, 1)))["params"]


def textured_images(count, seed, scale=1.0):
  """uint8 images of one distribution: blurred noise around a grey level."""
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(count, 8, 8, 1)).repeat(4, axis=1).repeat(4, axis=2)
  return np.clip(128 + 60 * scale * noise, 0, 255).astype(np.uint8)


def judge_from(params, reference_images):
  """A FixedJudge whose test statistics are those of reference_images."""
  features = judge_classifier.features(params, reference_images)
  return classifier_fd.FixedJudge(params, fid_lib.statistics(features), 0.0,
                                  len(reference_images), 1, 0, "")


def test_features_shape_padding_and_predict(random_params):
  images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  preds, feats = judge_classifier.predict_and_features(random_params, images, batch_size=4)
  assert feats.shape == (7, judge_classifier.FEATURE_DIM) == (7, 128)
  assert feats.dtype == np.float32 and (feats >= 0).all() and feats.std() > 0  # after the ReLU
  model = judge_classifier.JudgeCNN()
  x = images.astype(np.float32) / 127.5 - 1.0
  logits, direct = model.apply({"params": random_params}, x, return_features=True)
  # The padded last batch (3 images + 1 zero image) changes nothing.
  np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(preds, np.argmax(logits, -1))
  np.testing.assert_allclose(model.apply({"params": random_params}, x), logits, rtol=1e-6)
  np.testing.assert_array_equal(judge_classifier.predict(random_params, images, 4), preds)
  np.testing.assert_array_equal(judge_classifier.features(random_params, images, 4), feats)
  labels = np.asarray(preds)
  labels[0] = (labels[0] + 1) % 10
  assert judge_classifier.accuracy(random_params, images, labels) == pytest.approx(6 / 7)


def test_classifier_fd_of_a_set_against_itself_is_zero(random_params):
  images = textured_images(300, seed=1)
  judge = judge_from(random_params, images)
  labels = np.arange(300) % 10
  # In batches (as read from a samples .npz) or as one array: the same figures.
  batched = classifier_fd.score_samples(judge, (images[i:i + 64] for i in range(0, 300, 64)),
                                        labels)
  whole = classifier_fd.score_samples(judge, images, labels)
  assert batched["classifier_fd"] == pytest.approx(0.0, abs=1e-6)
  assert whole["classifier_fd"] == pytest.approx(batched["classifier_fd"], abs=1e-9)
  assert batched["num_images"] == 300
  predictions = judge_classifier.predict(random_params, images)
  assert batched["classifier_in_class_fraction"] == pytest.approx(np.mean(predictions == labels))
  assert sorted(batched["classifier_per_class_accuracy"]) == list(range(10))
  assert batched["classifier_per_class_accuracy"][3] == pytest.approx(
      np.mean(predictions[labels == 3] == 3))


def test_classifier_fd_separates_different_sets(random_params):
  reference = textured_images(300, seed=1)
  judge = judge_from(random_params, reference)
  same = classifier_fd.frechet_to_test(
      judge, judge_classifier.features(random_params, textured_images(300, seed=2)))
  different = classifier_fd.frechet_to_test(
      judge, judge_classifier.features(random_params, textured_images(300, seed=2, scale=0.2)))
  assert 0 < same < different
  assert different > 10 * same
  # Images of another side are resized to the judge's 32 x 32 first.
  small = classifier_fd.score_samples(judge, textured_images(20, seed=3)[:, ::2, ::2],
                                      np.zeros(20, int))
  assert small["num_images"] == 20 and np.isfinite(small["classifier_fd"])


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fashion")
  write_fake_fashion_mnist(directory, num_train=40, num_test=30)
  return directory


def flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def test_fixed_judge_cache_round_trip(tmp_path, fashion_dir, monkeypatch):
  judge = classifier_fd.fixed_judge(fashion_dir, epochs=1, seed=0, cache_dir=str(tmp_path))
  path = classifier_fd.cache_path(fashion_dir, 1, 0, str(tmp_path))
  assert judge.path == str(path) and path.is_file()
  assert path.name.startswith("judge-fashion_mnist-32px-1ep-seed0-")
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
  loaded = classifier_fd.load_judge(path)
  assert flat(loaded.params).keys() == flat(judge.params).keys()
  for key, value in flat(judge.params).items():
    np.testing.assert_array_equal(flat(loaded.params)[key], value, err_msg=key)
  np.testing.assert_array_equal(loaded.test_statistics.mu, judge.test_statistics.mu)
  np.testing.assert_array_equal(loaded.test_statistics.sigma, judge.test_statistics.sigma)
  assert loaded.test_statistics.mu.shape == (128,)
  assert (loaded.test_accuracy, loaded.num_test_images, loaded.epochs) == (
      judge.test_accuracy, 30, 1)
  # The cached statistics are the test split's features under the cached params.
  test_images, test_labels = classifier_fd.fashion_mnist_arrays(fashion_dir, "test")
  recomputed = fid_lib.statistics(judge_classifier.features(loaded.params, test_images))
  np.testing.assert_allclose(recomputed.mu, loaded.test_statistics.mu, rtol=1e-6, atol=1e-9)
  assert loaded.test_accuracy == judge_classifier.accuracy(loaded.params, test_images, test_labels)
  # A second call reads the cache (the environment variable names the folder) without training.
  monkeypatch.setattr(judge_classifier, "train_judge", lambda *a, **k: pytest.fail("retrained"))
  monkeypatch.setenv(classifier_fd.CACHE_DIR_ENV, str(tmp_path))
  again = classifier_fd.fixed_judge(fashion_dir, epochs=1, seed=0)
  np.testing.assert_array_equal(flat(again.params)["Dense_1/kernel"],
                                flat(judge.params)["Dense_1/kernel"])
  # Another seed, epoch count or data set is another cache file.
  assert classifier_fd.cache_path(fashion_dir, 1, 1, str(tmp_path)) != path
  assert classifier_fd.cache_path(fashion_dir, 3, 0, str(tmp_path)) != path
  other = tmp_path / "other"
  other.mkdir()
  write_fake_fashion_mnist(other, num_train=40, num_test=30, seed=1)
  assert classifier_fd.cache_path(other, 1, 0).name != path.name


def test_fixed_judge_training_is_deterministic(tmp_path, fashion_dir):
  first = classifier_fd.fixed_judge(fashion_dir, epochs=1, seed=0, cache_dir=str(tmp_path / "a"))
  second = classifier_fd.fixed_judge(fashion_dir, epochs=1, seed=0, cache_dir=str(tmp_path / "b"))
  for key, value in flat(first.params).items():
    np.testing.assert_array_equal(flat(second.params)[key], value, err_msg=key)


def test_judge_job_report_and_real_vs_real(tmp_path, fashion_dir):
  test_images, test_labels = classifier_fd.fashion_mnist_arrays(fashion_dir, "test")
  report = judge_job.judge_samples(tmp_path / "judge", np.repeat(test_images, 3, axis=-1),
                                   test_labels, fashion_dir, epochs=1,
                                   cache_dir=str(tmp_path / "cache"))
  written = json.loads((tmp_path / "judge" / "judge_report.json").read_text())
  assert set(written) >= {"judge_test_accuracy", "sample_class_accuracy", "per_class_accuracy",
                          "num_samples", "classifier_fd"}
  # The samples are the test split itself: the judge's test figures, and a distance of ~0.
  assert report["sample_class_accuracy"] == report["judge_test_accuracy"]
  assert report["classifier_fd"] == pytest.approx(0.0, abs=1e-6)
  assert report["num_samples"] == 30 and sorted(written["per_class_accuracy"]) == [
      str(c) for c in range(10)]
  judge = classifier_fd.fixed_judge(fashion_dir, epochs=1, cache_dir=str(tmp_path / "cache"))
  floor = classifier_fd.real_vs_real(judge, fashion_dir)
  assert floor["num_images"] == [15, 15] and floor["classifier_fd"] > 0
