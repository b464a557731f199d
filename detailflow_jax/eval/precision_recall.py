"""Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's k-NN manifolds.

Each feature set defines a manifold: the union of balls around its points, each ball's squared
radius being the squared distance to the point's k-th nearest neighbour in its own set (the point
itself counts as the 0-th, as in ADM, so k=3 means the third other point). Precision is the
fraction of generated samples inside the real manifold, recall the fraction of real samples
inside the generated one.

Distances are squared Euclidean in float32 (ADM tries float16 first and falls back to float32
only on overflow; float32 is the more exact of the two and differs only for near-ties).
Work is done in row blocks so 50k x 50k never sits in memory.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_ROWS = 1024


def squared_distances(rows, columns):
  """[R, D] x [C, D] -> [R, C] squared Euclidean distances, clipped at 0 (float32)."""
  rows = rows.astype(jnp.float32)
  columns = columns.astype(jnp.float32)
  cross = jnp.matmul(rows, columns.T, precision=jax.lax.Precision.HIGHEST)
  norms_r = jnp.sum(rows * rows, axis=1)[:, None]
  norms_c = jnp.sum(columns * columns, axis=1)[None, :]
  return jnp.maximum(norms_r - 2.0 * cross + norms_c, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_block(rows, features, k):
  distances = squared_distances(rows, features)
  smallest = -jax.lax.top_k(-distances, k + 1)[0]  # ascending; column 0 is the point itself
  return smallest[:, k]


@jax.jit
def _covered_block(rows, centres, radii):
  return jnp.any(squared_distances(rows, centres) <= radii[None, :], axis=1)


def _row_blocks(array, block_rows):
  """Yields (start, padded block) so every jitted call sees the same shape."""
  for start in range(0, len(array), block_rows):
    block = array[start:start + block_rows]
    if len(block) < block_rows and len(array) > block_rows:
      block = np.concatenate([block, np.zeros((block_rows - len(block),) + block.shape[1:],
                                              block.dtype)])
    yield start, block


def _check_features(name, features, k=None):
  features = np.asarray(features, np.float32)
  if features.ndim != 2:
    raise ValueError(f"{name} must be [N, D] features, got shape {features.shape}")
  if k is not None and len(features) <= k:
    raise ValueError(f"{name} needs more than k={k} points to define k-NN radii, got "
                     f"{len(features)}")
  return features


def manifold_radii(features, k=3, block_rows=DEFAULT_BLOCK_ROWS):
  """[N] squared distance of each point to its k-th nearest neighbour within features."""
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  features = _check_features("features", features, k)
  on_device = jnp.asarray(features)
  radii = np.empty(len(features), np.float32)
  for start, block in _row_blocks(features, block_rows):
    count = min(block_rows, len(features) - start)
    radii[start:start + count] = np.asarray(_kth_neighbour_block(block, on_device, k))[:count]
  return radii


def fraction_covered(queries, centres, radii, block_rows=DEFAULT_BLOCK_ROWS):
  """Fraction of query points within some centre's ball (squared distance <= its radius)."""
  queries = _check_features("queries", queries)
  centres_on_device = jnp.asarray(_check_features("centres", centres))
  radii_on_device = jnp.asarray(np.asarray(radii, np.float32))
  covered = 0
  for start, block in _row_blocks(queries, block_rows):
    count = min(block_rows, len(queries) - start)
    covered += int(np.sum(np.asarray(_covered_block(block, centres_on_device,
                                                    radii_on_device))[:count]))
  return covered / len(queries)


def precision_recall(feats_real, feats_fake, k=3, block_rows=DEFAULT_BLOCK_ROWS):
  """(precision, recall) of generated features against real ones, ADM's method (k=3)."""
  feats_real = _check_features("feats_real", feats_real, k)
  feats_fake = _check_features("feats_fake", feats_fake, k)
  if feats_real.shape[1] != feats_fake.shape[1]:
    raise ValueError(f"feature dimensions differ: real {feats_real.shape[1]}, "
                     f"fake {feats_fake.shape[1]}")
  radii_real = manifold_radii(feats_real, k, block_rows)
  radii_fake = manifold_radii(feats_fake, k, block_rows)
  precision = fraction_covered(feats_fake, feats_real, radii_real, block_rows)
  recall = fraction_covered(feats_real, feats_fake, radii_fake, block_rows)
  return precision, recall
