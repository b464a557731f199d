"""Reference statistics (real images) for FID / sFID / precision-recall, cached to an .npz.

The cache uses the ADM reference-batch key names (mu, sigma, mu_s, sigma_s) plus the pool
features precision/recall needs, so an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`:
arr_0 images and precomputed mu/sigma/mu_s/sigma_s) and our own caches load the same way.
"""
import os
from typing import NamedTuple, Optional

import numpy as np

from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import inputs
from detailflow_jax.eval import precision_recall as pr_lib

CACHE_FORMAT = "detailflow_reference_v1"


class ReferenceStatistics(NamedTuple):
  pool: fid_lib.FIDStatistics                      # FID
  spatial: Optional[fid_lib.FIDStatistics]         # sFID
  pool_features: Optional[np.ndarray]              # [N, 2048] precision / recall
  num_images: int


def reference_from_features(features: fid_lib.InceptionFeatures) -> ReferenceStatistics:
  return ReferenceStatistics(fid_lib.statistics(features.pool),
                             fid_lib.statistics(features.spatial),
                             np.asarray(features.pool, np.float32), len(features.pool))


def save_reference(path, reference: ReferenceStatistics):
  path = os.path.expanduser(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {"mu": reference.pool.mu, "sigma": reference.pool.sigma,
            "num_images": np.array(reference.num_images), "__format__": np.array(CACHE_FORMAT)}
  if reference.spatial is not None:
    arrays.update(mu_s=reference.spatial.mu, sigma_s=reference.spatial.sigma)
  if reference.pool_features is not None:
    arrays["pool_features"] = reference.pool_features
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_reference(path) -> ReferenceStatistics:
  """Statistics stored in an .npz: our cache, or an ADM reference batch's precomputed ones."""
  with np.load(os.path.expanduser(path)) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"{path} has no precomputed statistics (mu, sigma); its arrays are "
                       f"{data.files}")
    spatial = None
    if "mu_s" in data.files:
      spatial = fid_lib.FIDStatistics(data["mu_s"].astype(np.float64),
                                      data["sigma_s"].astype(np.float64))
    features = data["pool_features"] if "pool_features" in data.files else None
    count = int(data["num_images"]) if "num_images" in data.files else -1
    return ReferenceStatistics(
        fid_lib.FIDStatistics(data["mu"].astype(np.float64), data["sigma"].astype(np.float64)),
        spatial, features, count)


def reference_statistics(source, params, batch_size, mesh=None, cache_path=None,
                         max_images=None) -> ReferenceStatistics:
  """Reference statistics from a source, read from / written to cache_path when given.

  source: a folder of images; an .npz with arr_0 (uint8 NHWC, ADM layout; when it also holds
    mu/sigma/mu_s/sigma_s those are used as they are and arr_0 only feeds precision/recall, as
    the ADM evaluator does); or a zero-argument callable returning an iterator of uint8 batches
    (e.g. lambda: inputs.iterate_tfds(...)).
  """
  if cache_path and os.path.isfile(os.path.expanduser(cache_path)):
    return load_reference(cache_path)
  if callable(source):
    batches = source()
  elif isinstance(source, str) and os.path.isdir(source):
    batches = inputs.iterate_image_folder(source, batch_size)
  elif isinstance(source, str) and source.endswith(".npz") and os.path.isfile(source):
    batches = inputs.iterate_npz_images(source, batch_size, max_images=max_images)
  else:
    raise ValueError(f"reference source {source!r} must be an image folder, an .npz with arr_0, "
                     f"or a callable returning uint8 batches")
  reference = reference_from_features(
      fid_lib.compute_features(params, batches, batch_size, mesh, max_images))
  if isinstance(source, str) and source.endswith(".npz"):
    keys = inputs.npz_array_keys(source)
    if {"mu", "sigma"} <= set(keys):
      given = load_reference(source)
      reference = reference._replace(pool=given.pool, spatial=given.spatial or reference.spatial)
  if cache_path:
    save_reference(cache_path, reference)
  return reference


def metrics_from_features(features: fid_lib.InceptionFeatures, reference: ReferenceStatistics,
                          k=3, fid_method="sqrtm"):
  """{'fid', 'sfid', 'precision', 'recall', 'num_images'} of sample features against a reference.

  sFID / precision-recall are left out when the reference lacks their data.
  """
  metrics = {"num_images": len(features.pool),
             "fid": fid_lib.fid(fid_lib.statistics(features.pool), reference.pool, fid_method)}
  if reference.spatial is not None:
    metrics["sfid"] = fid_lib.sfid(fid_lib.statistics(features.spatial), reference.spatial,
                                   fid_method)
  if reference.pool_features is not None:
    metrics["precision"], metrics["recall"] = pr_lib.precision_recall(
        reference.pool_features, features.pool, k)
  return metrics


def generation_metrics(params, sample_batches, reference: ReferenceStatistics, batch_size,
                       mesh=None, k=3, max_images=None, fid_method="sqrtm"):
  """Inception features of the samples (uint8 NHWC batches, e.g. inputs.iterate_npz_images on
  an ADM sample .npz), then metrics_from_features."""
  features = fid_lib.compute_features(params, sample_batches, batch_size, mesh, max_images)
  return metrics_from_features(features, reference, k, fid_method)
