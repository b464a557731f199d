"""The FID floor of a dataset (job=eval_fid_reference): real images against real images.

The evaluation split (Fashion-MNIST: test, 10,000 images) is compared with each half of the
training split, and the two halves with each other. Two samples of the same distribution are as
close as FID can say; a generator's FID against the same split is read against these figures,
at the same image count (FID is biased upward for small counts).

Each FID is also recomputed by `independent_fid`: numpy only, a different route to the same
number (explicit mean/covariance, tr sqrt(A B) from the eigenvalues of the symmetric
A^1/2 B A^1/2) than the evaluator's np.cov + scipy.linalg.sqrtm(A B). They must agree to 1e-3.

Features are cached in chunks under WORKDIR/eval_fid_reference/features, so a larger
max_images_per_set (or a restarted run) reuses what is done.
"""
import json
import os
import pathlib
import time

import numpy as np
from absl import logging

from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.jobs import eval_common

OUTPUT_DIR = "eval_fid_reference"
AGREEMENT_TOLERANCE = 1e-3


def independent_fid(features_a, features_b):
  """Frechet distance of two [N, D] feature sets computed without np.cov or scipy.sqrtm."""
  stats = []
  for features in (features_a, features_b):
    x = np.asarray(features, np.float64)
    mean = x.sum(axis=0) / len(x)
    centred = x - mean
    stats.append((mean, centred.T @ centred / (len(x) - 1)))
  (mu_a, cov_a), (mu_b, cov_b) = stats
  eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
  root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
  product = root_a @ cov_b @ root_a
  # A^1/2 B A^1/2 is symmetric PSD and similar to A B: same eigenvalues, real and >= 0.
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def reference_sets(eval_cfg, data_cfg):
  """{name: (split, record indices)}: the eval split and the two halves of the halves split."""
  cap = eval_cfg.max_images_per_set or None
  num_eval = eval_common.source_length(data_cfg, eval_cfg.reference_split)
  num_halves = eval_common.source_length(data_cfg, eval_cfg.halves_split)
  half = num_halves // 2
  if half < 2:
    raise ValueError(f"split {eval_cfg.halves_split!r} has {num_halves} images: too few to halve")
  sets = {
      eval_cfg.reference_split: (eval_cfg.reference_split, np.arange(num_eval)[:cap]),
      f"{eval_cfg.halves_split}_first_half": (eval_cfg.halves_split, np.arange(half)[:cap]),
      f"{eval_cfg.halves_split}_second_half": (eval_cfg.halves_split,
                                                np.arange(half, 2 * half)[:cap]),
  }
  return sets


def _check_cache_manifest(directory, manifest):
  path = directory / "manifest.json"
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored != manifest:
      raise ValueError(f"{directory} holds features of other settings ({stored}); now {manifest}. "
                       f"Use another workdir or delete {directory}.")
  else:
    eval_common.write_json(path, manifest)


def _chunk_features(name, split, part, extractor, data_cfg, image_size, directory):
  """Features of one chunk of record indices, read from or written to the cache."""
  path = directory / f"{name}_{int(part[0]):06d}_{int(part[-1]) + 1:06d}.npz"
  if path.is_file():
    with np.load(path) as cached:
      return fid_lib.InceptionFeatures(cached["pool"], cached["spatial"])
  began = time.time()
  features = extractor(eval_common.source_batches(data_cfg, split, image_size,
                                                  extractor.batch_size, part))
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, pool=features.pool, spatial=features.spatial)
  os.replace(tmp, path)
  logging.info("%s: images %d-%d in %.0f s", name, part[0], part[-1], time.time() - began)
  return features


def cached_features(sets, extractor, data_cfg, image_size, directory, chunk):
  """{name: InceptionFeatures} of every set, extracted chunk by chunk and cached.

  Chunks are taken round-robin over the sets, so an interrupted run leaves every set with
  about as many cached images: its figures at that count come back without new extraction.
  """
  parts = {name: [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
           for name, (_, indices) in sets.items()}
  done = {name: [] for name in sets}
  for round_index in range(max(len(p) for p in parts.values())):
    for name, (split, indices) in sets.items():
      if round_index < len(parts[name]):
        part = parts[name][round_index]
        done[name].append(_chunk_features(name, split, part, extractor, data_cfg, image_size,
                                          directory))
        count = sum(len(f.pool) for f in done[name])
        print(f"{name}: features of {count}/{len(indices)} images", flush=True)
  return {name: fid_lib.InceptionFeatures(np.concatenate([f.pool for f in features]),
                                          np.concatenate([f.spatial for f in features]))
          for name, features in done.items()}


def pair_metrics(features_a, features_b, fid_method):
  fid_value = fid_lib.fid(fid_lib.statistics(features_a.pool), fid_lib.statistics(features_b.pool),
                          fid_method)
  check = independent_fid(features_a.pool, features_b.pool)
  return dict(
      fid=fid_value,
      sfid=fid_lib.sfid(fid_lib.statistics(features_a.spatial),
                        fid_lib.statistics(features_b.spatial), fid_method),
      fid_independent=check, fid_abs_difference=abs(fid_value - check),
      fid_agrees=abs(fid_value - check) <= AGREEMENT_TOLERANCE)


def evaluate_fid_reference(config, workdir):
  """Job eval_fid_reference: writes WORKDIR/eval_fid_reference/metrics.json."""
  eval_common.check_single_process("eval_fid_reference")
  e = config.eval
  if e.chunk_size < 1 or e.max_images_per_set < 0:
    raise ValueError(f"eval.chunk_size={e.chunk_size} must be >= 1 and eval.max_images_per_set="
                     f"{e.max_images_per_set} >= 0 (0: every image)")
  mesh = eval_common.build_mesh(config.mesh, e.batch_size, "eval.batch_size")
  extractor = eval_common.make_feature_extractor(e.inception_weights, e.batch_size, mesh)
  out_dir = pathlib.Path(workdir) / OUTPUT_DIR
  feature_dir = out_dir / "features"
  feature_dir.mkdir(parents=True, exist_ok=True)
  data = config.data
  _check_cache_manifest(feature_dir, dict(
      source=data.source, fashion_mnist_dir=data.fashion_mnist_dir, tfds_name=data.tfds_name,
      folder=data.folder, image_size=e.image_size, features=extractor.describe()))

  began = time.time()
  sets = reference_sets(e, data)
  features = cached_features(sets, extractor, data, e.image_size, feature_dir, e.chunk_size)
  names = list(sets)
  pairs = [(names[0], names[1]), (names[0], names[2]), (names[1], names[2])]
  results = {}
  for a, b in pairs:
    results[f"{a}__vs__{b}"] = dict(pair_metrics(features[a], features[b], e.fid_method),
                                    num_images=[len(features[a].pool), len(features[b].pool)])
    logging.info("FID %s vs %s: %s", a, b, results[f"{a}__vs__{b}"])
  payload = dict(
      metrics=results,
      sets={name: dict(split=split, first_index=int(idx[0]), last_index=int(idx[-1]),
                       num_images=len(idx)) for name, (split, idx) in sets.items()},
      settings=dict(eval_common.run_record(config), features=extractor.describe(),
                    agreement_tolerance=AGREEMENT_TOLERANCE),
      seconds=time.time() - began)
  path = eval_common.write_json(out_dir / "metrics.json", payload)
  for pair, values in results.items():
    print(f"{pair}: FID {values['fid']:.4f} (independent {values['fid_independent']:.4f}), "
          f"sFID {values['sfid']:.4f}, images {values['num_images']}", flush=True)
  print(f"wrote {path}", flush=True)
  return payload
