"""Logical axis names -> mesh axes, for params and activations, with uneven dims left whole.

The models name the dimensions of their params (`nn.with_logical_partitioning` in their
initialisers) and of their key activations (`constrain` below). The one rules table that maps
those names to mesh axes lives in train/sharding.py; it is set, together with the mesh, by
`sharding.use_mesh`. Outside that context (one device, the sampler on a laptop, a parity test)
`constrain` does nothing.

Unlike flax's `nn.with_logical_constraint`, a dimension that its mesh axes do not divide is
left unsharded (XLA would otherwise pad it, or a jit boundary would reject it), so any model
runs on any mesh.
"""
import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

# Activation names (weights use their own names, so `embed` can be FSDP-sharded on weights
# without also sharding activations; maxtext's convention).
BLE = ("activation_batch", "activation_length", "activation_embed")
BLHD = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BLF = ("activation_batch", "activation_length", "activation_mlp")
BLV = ("activation_batch", "activation_length", "activation_vocab")
BHLD = ("activation_batch", "activation_heads", "activation_length", "activation_kv")
BHDL = ("activation_batch", "activation_heads", "activation_kv", "activation_length")


def mesh_axes_for(names, shape, axis_sizes, rules, on_uneven=None):
  """PartitionSpec of mesh axes for logical `names` of an array of `shape`.

  axis_sizes: {mesh axis: size}. A dimension whose mesh axes' total size does not divide it
  stays replicated; `on_uneven(position, name, dim, mesh_axes)` is told about it (the trainers
  log a note)."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not fit an array of shape {tuple(shape)}")
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  entries = []
  for position, (entry, dim, name) in enumerate(zip(spec, shape, names)):
    if entry is None:
      entries.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a in axis_sizes)
    size = math.prod(axis_sizes[a] for a in axes)
    if size == 1:
      entries.append(None)
    elif dim % size:
      if on_uneven is not None:
        on_uneven(position, name, dim, axes)
      entries.append(None)
    else:
      entries.append(axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def constrain(x, names):
  """`x` constrained to the mesh axes of its logical `names` under the current mesh and rules
  (sharding.use_mesh); unchanged when either is missing."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = mesh_axes_for(names, x.shape, dict(mesh.shape), rules)
  return jax.lax.with_sharding_constraint(x, spec)
