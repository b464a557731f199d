"""One device mesh from the config, one rules table from logical axes to mesh axes.

The models declare the logical axes of their params (`nn.with_logical_partitioning`) and of
their key activations (`models/partitioning.constrain`); LOGICAL_AXIS_RULES maps both to the
mesh axes (data, fsdp, tensor), as maxtext's `logical_axis_rules`:

  - batch activations over data x fsdp;
  - weights: `embed` over fsdp (ZeRO-3: XLA gathers a layer's weights where it uses them);
  - tensor (Megatron): heads and `mlp` over tensor, so q/k/v, w1, w3 and fc1 are
    column-parallel, the attention output projection, w2 and fc2 row-parallel (their input
    dimension is split), two all-reduces per layer forward and two backward; `vocab` over
    tensor (the GPT's output is vocab-parallel);
  - everything else (norms, biases of row-parallel layers, the codebook, class and special
    tokens, conv kernels of the discriminators) replicated.

A dimension its mesh axes do not divide stays replicated, with a logged note, so any mesh runs
any model. Train-state leaves that mirror a param (optimizer moments, EMA) take that param's
sharding: they are matched by their path ending in the param's path.
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from detailflow_jax.models import partitioning

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes), first match wins (flax's convention). Names not listed here
# (norm, bias, position, patch, latents, codebook, codebook_dim, classes, special, qkv,
# features, conv_*) map to no mesh axis.
LOGICAL_AXIS_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


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


def dcn_shape(mesh_config):
  """The (data, fsdp, tensor) sizes across slices / hosts (mesh.dcn_*; all 1: one slice)."""
  get = mesh_config.get if hasattr(mesh_config, "get") else lambda k, d: d
  sizes = tuple(int(get(f"dcn_{a}", 1)) for a in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise ValueError(f"mesh.dcn_*: sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}")
  return sizes


def build_mesh(mesh_config, devices=None):
  """The (data, fsdp, tensor) mesh with Auto axes (the partitioner places what the rules leave
  open; jax.make_mesh's default, Explicit, turns every constraint into an assert).

  One slice: `jax.make_mesh` (orders devices by the physical topology). Several slices or
  hosts (mesh.dcn_* > 1): `mesh_utils.create_hybrid_device_mesh`, the dcn sizes across slices
  (or processes, where devices carry no slice index, as on GPU clusters) and the rest within.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  types = (AxisType.Auto,) * len(MESH_AXES)
  dcn = dcn_shape(mesh_config)
  if dcn == (1,) * len(MESH_AXES):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  uneven = [a for a, s, d in zip(MESH_AXES, shape, dcn) if s % d]
  if uneven:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} is not divisible by mesh.dcn_* "
                     f"{dict(zip(MESH_AXES, dcn))} on axes {uneven}; each mesh.<axis> must be "
                     "a multiple of mesh.dcn_<axis>")
  ici = tuple(s // d for s, d in zip(shape, dcn))
  by_process = not hasattr(devices[0], "slice_index")
  try:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  except ValueError as error:
    granules = "processes" if by_process else "slices"
    raise ValueError(f"mesh.dcn_* {dict(zip(MESH_AXES, dcn))} must multiply to the number of "
                     f"{granules} ({jax.process_count() if by_process else 'slices'}): "
                     f"{error}") from None
  return Mesh(grid, MESH_AXES, axis_types=types)


@contextlib.contextmanager
def use_mesh(mesh):
  """The ambient mesh and the logical rules: trace, lower and call sharded programs inside it
  (the models' activation constraints are no-ops outside)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh


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


def _key_name(entry):
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path(path):
  return tuple(_key_name(p) for p in path)


def _axes_by_path(logical_axes):
  """{param path: logical names} from pytrees of PartitionSpecs of logical names."""
  table = {}
  for tree in logical_axes:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    for path, spec in leaves:
      if len(spec):
        table[_path(path)] = tuple(spec)
  return table


def state_shardings(abstract_state, mesh, logical_axes):
  """NamedShardings for a train-state pytree (arrays or ShapeDtypeStructs).

  logical_axes: one or more pytrees of PartitionSpecs of logical axis names (the models'
  `param_logical_axes`). A state leaf whose path ends with a param's path and has its rank
  (the param itself, its Adam moments, its EMA) gets that param's sharding; any other leaf
  (step, rng, counters, BatchNorm statistics, frozen feature models) is replicated.
  """
  if isinstance(logical_axes, dict) or not isinstance(logical_axes, (list, tuple)):
    logical_axes = [logical_axes]
  table = _axes_by_path(logical_axes)
  longest = max((len(k) for k in table), default=0)
  sizes = dict(mesh.shape)
  noted = set()

  def one(path, leaf):
    shape = np.shape(leaf)
    names = _path(path)
    for start in range(max(0, len(names) - longest), len(names)):
      axes = table.get(names[start:])
      if axes is not None and len(axes) == len(shape):
        def note(position, name, dim, mesh_axes, key=names[start:]):
          if (key, position) not in noted:
            noted.add((key, position))
            logging.info("sharding: %s dimension %d (%s, size %d) is not divisible by mesh axes "
                         "%s (size %d); kept replicated", "/".join(key), position, name, dim,
                         mesh_axes, math.prod(sizes[a] for a in mesh_axes))
        spec = partitioning.mesh_axes_for(axes, shape, sizes, LOGICAL_AXIS_RULES, note)
        return NamedSharding(mesh, spec)
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh, ndim):
  """Leading (batch) dim over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh):
  return NamedSharding(mesh, P())


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
