"""Inception features in batches under jit, and FID / sFID as the ADM evaluator computes them.

FID is the Frechet distance between Gaussians fitted to pool_3 features (2048-d); sFID the same on
the 2023-d mixed_6/conv spatial features. The formula follows ADM/pytorch-fid exactly: float64
statistics, np.cov (unbiased), scipy.linalg.sqrtm of sigma_a @ sigma_b, and the eps*I retry when
that product is singular.
"""
import functools
import time
import warnings
from typing import Iterable, NamedTuple, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import linalg

from detailflow_jax import preemption
from detailflow_jax.eval import inception


class InceptionFeatures(NamedTuple):
  pool: np.ndarray     # [N, 2048] float32, FID / precision / recall
  spatial: np.ndarray  # [N, 2023] float32, sFID


class FIDStatistics(NamedTuple):
  mu: np.ndarray     # [D] float64
  sigma: np.ndarray  # [D, D] float64


@functools.lru_cache(maxsize=None)
def _feature_fn(mesh):
  """One jitted feature function per mesh; the batch is split over every mesh axis."""
  def features(params, images, valid):
    out = inception.inception_features(params, images)
    return out.pool, out.spatial, valid
  options = inception.compiler_options()
  if mesh is None:
    return jax.jit(features, compiler_options=options)
  batch = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(features, in_shardings=(replicated, batch, batch),
                 out_shardings=(batch, batch, batch), compiler_options=options)


def _pad_to(batch, size):
  if len(batch) == size:
    return batch, np.ones(size, bool)
  pad = np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)
  valid = np.arange(size) < len(batch)
  return np.concatenate([batch, pad]), valid


def _rebatch(batches, size):
  """Re-chunks an iterator of NHWC batches (any sizes) into batches of exactly `size` images
  (the last one of each image shape may be shorter): static shapes for jit."""
  pending, count = [], 0
  for batch in batches:
    batch = np.asarray(batch)
    if batch.ndim == 3:
      batch = batch[None]
    if batch.dtype != np.uint8:
      raise ValueError(f"images must be uint8 in [0, 255], got {batch.dtype}; convert model "
                       f"outputs in [-1, 1] with detailflow_jax.eval.inputs.to_uint8")
    if pending and batch.shape[1:] != pending[0].shape[1:]:
      yield np.concatenate(pending)
      pending, count = [], 0
    while len(batch):
      take = batch[:size - count]
      batch = batch[size - count:]
      pending.append(take)
      count += len(take)
      if count == size:
        yield np.concatenate(pending)
        pending, count = [], 0
  if pending:
    yield np.concatenate(pending)


def compute_features(params, images_uint8_iter: Iterable[np.ndarray], batch_size: int,
                     mesh: Optional[Mesh] = None, max_images: Optional[int] = None,
                     log_every_seconds: float = 0.0):
  """Inception pool_3 and spatial features of every image the iterator yields.

  params: from inception_weights.load_inception().
  images_uint8_iter: uint8 [B, H, W, 1 or 3] batches (any B; images of one size per batch).
  batch_size: images per jitted call (global, over all processes); the last batch is padded and
    the padding dropped. With a mesh it must be a multiple of the mesh's device count.
  mesh: None (default device) or a Mesh; the batch is sharded over all its axes, params
    replicated. In a multi-process run every process must yield the same number of batches of
    batch_size / process_count images (its own share); all processes get all features back.
  max_images: stop after this many images.
  log_every_seconds: > 0 prints the image count and rate at most that often (long CPU passes).
  Returns InceptionFeatures(pool [N, 2048], spatial [N, 2023]) as float32 numpy.
  """
  num_processes = jax.process_count()
  num_devices = 1 if mesh is None else mesh.devices.size
  if batch_size < 1 or batch_size % num_devices or batch_size % num_processes:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of the mesh's "
                     f"{num_devices} devices and of the {num_processes} processes")
  if max_images is not None and max_images < 1:
    raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
  local_batch = batch_size // num_processes
  fn = _feature_fn(mesh)
  if mesh is not None:
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  pools, spatials, seen = [], [], 0
  began = last_log = time.perf_counter()
  for batch in _rebatch(images_uint8_iter, local_batch):
    if max_images is not None:
      batch = batch[:max_images - seen]
    images, valid = _pad_to(batch, local_batch)
    if mesh is not None:
      images, valid = (jax.make_array_from_process_local_data(batch_sharding, a)
                       for a in (images, valid))
    pool, spatial, valid = fn(params, images, valid)
    if num_processes > 1:
      pool, spatial, valid = multihost_utils.process_allgather((pool, spatial, valid), tiled=True)
    valid = np.asarray(valid)
    pools.append(np.asarray(pool)[valid])
    spatials.append(np.asarray(spatial)[valid])
    seen += len(batch)
    now = time.perf_counter()
    if log_every_seconds > 0 and now - last_log >= log_every_seconds:
      last_log = now
      print(f"inception features: {seen} images, {seen / (now - began):.1f} images/s", flush=True)
    if max_images is not None and seen >= max_images:
      break
    if preemption.reached("inception_batch"):  # nothing is written before the pass ends
      raise preemption.Preempted(f"SIGTERM: Inception features stopped after {seen} images; "
                                 "run the same command to compute them again.")
  if not pools:
    raise ValueError("the image iterator yielded no images")
  return InceptionFeatures(np.concatenate(pools), np.concatenate(spatials))


def statistics(features) -> FIDStatistics:
  """Mean and unbiased covariance (float64) of [N, D] features, N >= 2."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
  return FIDStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


def _trace_sqrt_product(sigma_a, sigma_b, eps):
  """tr(sqrtm(sigma_a @ sigma_b)) with ADM's handling of singular and complex results."""
  covmean = linalg.sqrtm(sigma_a.dot(sigma_b))
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
    offset = np.eye(sigma_a.shape[0]) * eps
    covmean = linalg.sqrtm((sigma_a + offset).dot(sigma_b + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return np.trace(covmean)


def frechet_distance(stats_a: FIDStatistics, stats_b: FIDStatistics, eps: float = 1e-6,
                     method: str = "sqrtm") -> float:
  """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b)).

  method "sqrtm": scipy.linalg.sqrtm of the product, exactly as ADM / pytorch-fid.
  method "eigvals": the trace as the sum of square roots of the product's eigenvalues (equal in
    exact arithmetic, as torchmetrics computes it; ~3x faster at 2048-d, where sqrtm takes
    tens of seconds on a small CPU).
  """
  mu_a, mu_b = np.atleast_1d(stats_a.mu), np.atleast_1d(stats_b.mu)
  sigma_a, sigma_b = np.atleast_2d(stats_a.sigma), np.atleast_2d(stats_b.sigma)
  if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
    raise ValueError(f"statistics differ in dimension: mu {mu_a.shape} vs {mu_b.shape}, "
                     f"sigma {sigma_a.shape} vs {sigma_b.shape}")
  diff = mu_a - mu_b
  if method == "sqrtm":
    trace_sqrt = _trace_sqrt_product(sigma_a, sigma_b, eps)
  elif method == "eigvals":
    eigenvalues = linalg.eigvals(sigma_a.dot(sigma_b))
    trace_sqrt = np.sum(np.sqrt(eigenvalues.astype(np.complex128)).real)
  else:
    raise ValueError(f"method must be 'sqrtm' or 'eigvals', got {method!r}")
  return float(diff.dot(diff) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


def fid(stats_a: FIDStatistics, stats_b: FIDStatistics, method: str = "sqrtm") -> float:
  """FID between two pool_3 statistics (statistics(features.pool))."""
  return frechet_distance(stats_a, stats_b, method=method)


def sfid(spatial_stats_a: FIDStatistics, spatial_stats_b: FIDStatistics,
         method: str = "sqrtm") -> float:
  """sFID: Frechet distance of mixed_6/conv spatial statistics (statistics(features.spatial))."""
  return frechet_distance(spatial_stats_a, spatial_stats_b, method=method)

