"""FID / sFID statistics, precision-recall, image sources and the batched feature extractor."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image
from scipy import linalg

from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import inputs
from detailflow_jax.eval import precision_recall as pr_lib
from detailflow_jax.eval import reference as ref_lib
from test_inception import features_of_reference_images, params_or_skip, reference_images


@pytest.fixture
def inception_params():
  return params_or_skip()


@pytest.fixture
def reference_features(inception_params):  # pylint: disable=redefined-outer-name,unused-argument
  return features_of_reference_images()


def _features(n, d, seed, scale=1.0, shift=0.0):
  rng = np.random.default_rng(seed)
  mixing = rng.standard_normal((d, d)) / np.sqrt(d)
  return (rng.standard_normal((n, d)) @ mixing) * scale + shift


def independent_fid(x, y):
  """FID by eigendecomposition: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x.T), np.cov(y.T)
  w, v = linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = linalg.eigvalsh(root1 @ s2 @ root1)
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(
      np.sqrt(np.clip(inner, 0, None)))


# ---------------------------------------------------------------- FID


def test_statistics_is_mean_and_unbiased_covariance():
  x = _features(50, 4, 0)
  stats = fid_lib.statistics(x)
  np.testing.assert_allclose(stats.mu, x.mean(0))
  np.testing.assert_allclose(stats.sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 49)
  with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
    fid_lib.statistics(x[:1])


def test_fid_of_identical_sets_is_zero():
  stats = fid_lib.statistics(_features(300, 16, 1))
  assert abs(fid_lib.fid(stats, stats)) < 1e-8


@pytest.mark.parametrize("method", ["sqrtm", "eigvals"])
def test_fid_matches_independent_computation(method):
  x = _features(400, 32, 2)
  y = _features(300, 32, 3, scale=1.3, shift=0.2)
  ours = fid_lib.fid(fid_lib.statistics(x), fid_lib.statistics(y), method=method)
  expected = independent_fid(x, y)
  assert ours == pytest.approx(expected, rel=1e-3)
  assert ours == pytest.approx(expected, rel=1e-9)  # in fact to float64 rounding


def test_fid_closed_form_for_diagonal_gaussians():
  a = fid_lib.FIDStatistics(np.array([0.0, 1.0]), np.diag([4.0, 1.0]))
  b = fid_lib.FIDStatistics(np.array([1.0, 1.0]), np.diag([1.0, 9.0]))
  # |mu diff|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 = 1 + (2-1)^2 + (1-3)^2
  assert fid_lib.fid(a, b) == pytest.approx(6.0)
  assert fid_lib.sfid(a, b) == pytest.approx(6.0)


def test_fid_rank_deficient_statistics_stay_real():
  x, y = _features(5, 12, 4), _features(6, 12, 5)  # fewer samples than dimensions
  value = fid_lib.fid(fid_lib.statistics(x), fid_lib.statistics(y))
  assert np.isfinite(value) and value > 0


def test_fid_rejects_mismatched_dimensions_and_method():
  a = fid_lib.statistics(_features(10, 3, 6))
  b = fid_lib.statistics(_features(10, 4, 7))
  with pytest.raises(ValueError, match="differ in dimension"):
    fid_lib.fid(a, b)
  with pytest.raises(ValueError, match="'sqrtm' or 'eigvals'"):
    fid_lib.fid(a, a, method="svd")


# ---------------------------------------------------------------- precision / recall


def brute_force_precision_recall(real, fake, k):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]
  def covered(q, c, r):
    d = ((q[:, None] - c[None]) ** 2).sum(-1)
    return np.mean((d <= r[None]).any(1))
  return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_identical_and_disjoint_sets():
  real = _features(60, 5, 8)
  assert pr_lib.precision_recall(real, real.copy()) == (1.0, 1.0)
  assert pr_lib.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_mode_collapse():
  """Samples packed inside the real cloud: all precise, but they cover little of it."""
  rng = np.random.default_rng(9)
  real = rng.standard_normal((200, 2))
  fake = 0.05 * rng.standard_normal((200, 2))
  precision, recall = pr_lib.precision_recall(real, fake, k=3)
  assert precision == 1.0
  assert recall < 0.2
  assert (precision, recall) == pytest.approx(brute_force_precision_recall(real, fake, 3))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_with_partial_blocks(k):
  real = _features(37, 3, 10)
  fake = _features(29, 3, 11, scale=1.5, shift=0.3)
  ours = pr_lib.precision_recall(real, fake, k=k, block_rows=8)
  assert ours == pytest.approx(brute_force_precision_recall(real, fake, k))


def test_manifold_radii_is_kth_neighbour_squared_distance():
  points = np.array([[0.0], [1.0], [3.0], [7.0]])
  np.testing.assert_allclose(pr_lib.manifold_radii(points, k=1), [1, 1, 4, 16])
  np.testing.assert_allclose(pr_lib.manifold_radii(points, k=2), [9, 4, 9, 36])
  with pytest.raises(ValueError, match="more than k=3"):
    pr_lib.manifold_radii(points[:3], k=3)


def test_metrics_from_features_small_dimension():
  rng = np.random.default_rng(12)
  real = fid_lib.InceptionFeatures(rng.standard_normal((40, 6)), rng.standard_normal((40, 5)))
  fake = fid_lib.InceptionFeatures(rng.standard_normal((30, 6)), rng.standard_normal((30, 5)))
  reference = ref_lib.reference_from_features(real)
  metrics = ref_lib.metrics_from_features(fake, reference)
  assert metrics["num_images"] == 30
  assert metrics["fid"] == pytest.approx(independent_fid(real.pool, fake.pool), rel=1e-6)
  assert metrics["sfid"] == pytest.approx(independent_fid(real.spatial, fake.spatial), rel=1e-6)
  assert (metrics["precision"], metrics["recall"]) == pytest.approx(
      brute_force_precision_recall(real.pool, fake.pool, 3))


# ---------------------------------------------------------------- image sources


def test_rebatch_makes_static_batches_and_splits_on_shape_change():
  a = np.zeros((3, 4, 4, 3), np.uint8)
  b = np.ones((2, 4, 4, 3), np.uint8)
  c = np.ones((1, 5, 5, 3), np.uint8)
  sizes = [x.shape for x in fid_lib._rebatch([a, b, c[0]], 2)]  # pylint: disable=protected-access
  assert sizes == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3), (1, 5, 5, 3)]
  with pytest.raises(ValueError, match="must be uint8"):
    list(fid_lib._rebatch([a.astype(np.float32)], 2))  # pylint: disable=protected-access


def test_to_uint8_rounds_to_nearest():
  np.testing.assert_array_equal(inputs.to_uint8([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]),
                                [0, 0, 128, 255, 255, 255])
  assert inputs.to_uint8(np.float32(-0.996))[()] == 1  # 127.5 * 0.004 = 0.51 -> 1


def test_npz_streaming_and_folder(tmp_path):
  images = np.random.default_rng(13).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  npz = tmp_path / "samples.npz"
  np.savez(npz, arr_0=images)
  batches = list(inputs.iterate_npz_images(str(npz), 2))
  assert [len(b) for b in batches] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(batches), images)
  assert sum(len(b) for b in inputs.iterate_npz_images(str(npz), 2, max_images=3)) == 3
  with pytest.raises(ValueError, match="no array 'images'"):
    list(inputs.iterate_npz_images(str(npz), 2, key="images"))
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
  folder = list(inputs.iterate_image_folder(str(tmp_path), 4))
  np.testing.assert_array_equal(np.concatenate(folder), images)
  with pytest.raises(ValueError, match="no image files"):
    inputs.list_image_files(str(tmp_path), extensions=(".tif",))


def test_center_crop_resize_follows_adm():
  image = np.random.default_rng(14).integers(0, 256, (300, 520, 3), dtype=np.uint8)
  out = inputs.center_crop_resize(image, 64)
  # 300x520 -> box halvings to 150x260 -> 75x130 -> bicubic to 64x111 -> centre crop.
  pil = Image.fromarray(image).resize((260, 150), Image.BOX).resize((130, 75), Image.BOX)
  expected = np.asarray(pil.resize((111, 64), Image.BICUBIC))[:, 23:87]
  np.testing.assert_array_equal(out, expected)
  gray = inputs.center_crop_resize(image[..., :1], 64)
  assert gray.shape == (64, 64, 1)


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    batches = list(inputs.iterate_tfds("mnist", "train", 2, image_size=16))
  assert [b.shape for b in batches] == [(2, 16, 16, 1), (2, 16, 16, 1), (1, 16, 16, 1)]


# ---------------------------------------------------------------- with the real network


def test_compute_features_is_batching_invariant(inception_params, reference_features, capsys):
  images = np.concatenate([reference_images(), reference_images()[::-1]])
  images[3] = 255 - images[3]
  features = fid_lib.compute_features(inception_params, iter([images[:3], images[3:]]), 2,
                                      log_every_seconds=1e-9)
  progress = [l for l in capsys.readouterr().out.splitlines() if l.startswith("inception")]
  assert [l.split(" images,")[0] for l in progress] == [
      "inception features: 2", "inception features: 4"]
  assert features.pool.shape == (4, 2048)
  np.testing.assert_allclose(features.pool[:2], reference_features.pool, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(features.pool[2], reference_features.pool[1], rtol=1e-5, atol=1e-6)
  single = fid_lib.compute_features(inception_params, [images[3:4]], 2)
  np.testing.assert_allclose(single.spatial[0], features.spatial[3], rtol=1e-5, atol=1e-6)
  limited = fid_lib.compute_features(inception_params, [images], 2, max_images=3)
  assert len(limited.pool) == 3


def test_compute_features_on_a_mesh(inception_params, reference_features):
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  batch = 2 * len(devices)
  images = np.concatenate([reference_images()] * len(devices))
  features = fid_lib.compute_features(inception_params, [images], batch, mesh=mesh)
  np.testing.assert_allclose(features.pool[:2], reference_features.pool, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="positive multiple of the mesh"):
    fid_lib.compute_features(inception_params, [images], 0, mesh=mesh)


def test_reference_statistics_cache_and_adm_npz(inception_params, tmp_path):
  images = reference_images()
  cache = tmp_path / "ref.npz"
  reference = ref_lib.reference_statistics(lambda: iter([images]), inception_params, 2,
                                           cache_path=str(cache))
  assert reference.num_images == 2 and reference.pool_features.shape == (2, 2048)

  def must_not_run():
    raise AssertionError("cache ignored")
  cached = ref_lib.reference_statistics(must_not_run, inception_params, 2, cache_path=str(cache))
  np.testing.assert_array_equal(cached.pool.sigma, reference.pool.sigma)
  np.testing.assert_array_equal(cached.spatial.mu, reference.spatial.mu)
  # An ADM reference batch: images plus precomputed statistics, which are used as they are.
  adm = tmp_path / "VIRTUAL_ref.npz"
  given_mu = np.full(2048, 0.5)
  np.savez(adm, arr_0=images, mu=given_mu, sigma=np.eye(2048), mu_s=np.zeros(2023),
           sigma_s=np.eye(2023))
  from_adm = ref_lib.reference_statistics(str(adm), inception_params, 2)
  np.testing.assert_array_equal(from_adm.pool.mu, given_mu)
  np.testing.assert_array_equal(from_adm.spatial.sigma, np.eye(2023))
  np.testing.assert_allclose(from_adm.pool_features, reference.pool_features, rtol=1e-5,
                             atol=1e-6)
