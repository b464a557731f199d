"""The GPT's key/value cache: a plain pytree of preallocated buffers.

{'k': [layer 0 .. L-1], 'v': [...]}, each buffer (batch, length, heads, head_dim) in the
model's compute dtype. GPT.decode_step writes the new positions with dynamic_update_slice and
returns the updated pytree; under jit inside a loop the update happens in place.

One buffer per layer rather than one stacked [layers, ...] array: the decoder's layers are
unrolled, and a per-layer buffer is read by the attention without first slicing a copy out
of the stack.
"""
import jax.numpy as jnp


def init_kv_cache(config, batch, length, dtype=None):
  """Zero cache for `batch` rows and positions 0..length-1."""
  shape = (batch, length, config.num_heads, config.head_dim)
  dtype = config.compute_dtype if dtype is None else dtype
  return {name: [jnp.zeros(shape, dtype) for _ in range(config.num_layers)] for name in ("k", "v")}


def grow_kv_cache(cache, length):
  """Pads every buffer with empty positions up to `length` (kept entries unchanged)."""
  def grow(buffer):
    extra = length - buffer.shape[1]
    if extra < 0:
      raise ValueError(f"cannot shrink a cache of length {buffer.shape[1]} to {length}")
    return jnp.pad(buffer, ((0, 0), (0, extra), (0, 0), (0, 0)))
  return {name: [grow(b) for b in buffers] for name, buffers in cache.items()}


def cache_length(cache):
  return cache["k"][0].shape[1]
