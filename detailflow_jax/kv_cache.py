"""The GPT's key/value cache: a plain pytree of preallocated buffers.

{'k': [layer 0 .. L-1], 'v': [...]}, each buffer (batch, heads, length, head_dim) in the
model's compute dtype. GPT.decode_step writes the new positions with dynamic_update_slice and
returns the updated pytree; under jit inside a loop the update happens in place.

Layout, chosen by measurement on CPU (benchmarks/sampler.py, docs/performance.md):
  * one buffer per layer, not one stacked [layers, ...] array: the decoder's layers are
    unrolled, and a per-layer buffer is read by the attention without slicing a copy out of
    the stack;
  * heads before positions: the attention contracts per (batch, head), and with this layout
    its batched matmuls read the cache as stored instead of transposing it every step
    (about 1.5x faster attention at 128 positions).
"""
import jax.numpy as jnp


def init_kv_cache(config, batch, length, dtype=None):
  """Zero cache for `batch` rows and positions 0..length-1."""
  shape = (batch, config.num_heads, length, config.head_dim)
  dtype = config.compute_dtype if dtype is None else dtype
  return {name: [jnp.zeros(shape, dtype) for _ in range(config.num_layers)] for name in ("k", "v")}


def grow_kv_cache(cache, length):
  """Pads every buffer with empty positions up to `length` (kept entries unchanged)."""
  def grow(buffer):
    extra = length - buffer.shape[2]
    if extra < 0:
      raise ValueError(f"cannot shrink a cache of length {buffer.shape[2]} to {length}")
    return jnp.pad(buffer, ((0, 0), (0, 0), (0, extra), (0, 0)))
  return {name: [grow(b) for b in buffers] for name, buffers in cache.items()}


def cache_length(cache):
  return cache["k"][0].shape[2]
