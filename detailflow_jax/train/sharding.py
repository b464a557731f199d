"""One device mesh from the config, logical axis names for params, one rules table.

Params carry no annotations in the modules; their logical axes are derived here from the param
path and shape (kernels are (in, out), embeddings are (rows, features)). The rules map logical
axes to mesh axes; a dimension the mesh axis does not divide stays replicated, so any mesh shape
works for any model and small models on big meshes do not fail.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (maxtext-style single table).
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "vocab": "tensor",
    None: None,
}


def mesh_shape(mesh_config, num_devices):
  """Resolves the -1 entry of the (data, fsdp, tensor) config against the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available; set mesh.data/fsdp/tensor so their product is "
        f"{num_devices} (or use -1 for one axis)")
  return tuple(sizes)


def build_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_axes_size(mesh):
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size, mesh, name="data.batch_size"):
  size = batch_axes_size(mesh)
  if batch_size % size:
    raise ValueError(
        f"{name}={batch_size} is not divisible by the data x fsdp mesh size {size} "
        f"(mesh {dict(mesh.shape)}); pick a multiple of {size}")
  if batch_size % jax.process_count():
    raise ValueError(f"{name}={batch_size} is not divisible by {jax.process_count()} processes")


def logical_axes(path, shape):
  """Logical axis names of one param from its path (a tuple of keys) and shape."""
  name = path[-1] if path else ""
  if len(shape) == 2 and name in ("embedding", "embedding_table"):
    return ("vocab", "embed")
  if len(shape) == 2:
    return ("embed", "mlp")
  if len(shape) >= 3:
    # Conv kernels (h, w, in, out) and stacked tables: shard the last dim like an output.
    return (None,) * (len(shape) - 1) + ("mlp",)
  return (None,) * len(shape)


def spec_for(axes, shape, mesh):
  """PartitionSpec from logical axes, replicating dims the mesh axis does not divide."""
  entries = []
  for axis, dim in zip(axes, shape):
    mesh_axes = LOGICAL_RULES.get(axis)
    if mesh_axes is None:
      entries.append(None)
      continue
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    size = math.prod(mesh.shape[n] for n in names)
    entries.append(mesh_axes if size > 1 and dim % size == 0 else None)
  return P(*entries)


def _key_name(entry):
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_shardings(params, mesh):
  """NamedShardings for a param pytree (also used for optimizer states shaped like params)."""
  def one(path, leaf):
    shape = np.shape(leaf)
    names = tuple(_key_name(p) for p in path)
    return NamedSharding(mesh, spec_for(logical_axes(names, shape), shape, mesh))
  return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh, ndim):
  """Leading (batch) dim over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh):
  return NamedSharding(mesh, P())


def state_shardings(state, mesh):
  """Shardings for any train-state pytree: arrays shaped like params get param rules,
  scalars (step, counters) are replicated."""
  def one(path, leaf):
    shape = np.shape(leaf)
    if len(shape) == 0:
      return replicated(mesh)
    names = tuple(_key_name(p) for p in path)
    return NamedSharding(mesh, spec_for(logical_axes(names, shape), shape, mesh))
  return jax.tree_util.tree_map_with_path(one, state)


def shard_batch(batch, mesh):
  """Process-local numpy batch -> global jax.Arrays sharded over data x fsdp.

  Arrays with a batch dim are assembled from every process's rows; scalars (the batch's prefix
  length and noise position) are the same on every process and are replicated.
  """
  def one(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, replicated(mesh))
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree_util.tree_map(one, batch)
