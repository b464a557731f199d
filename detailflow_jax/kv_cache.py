"""The GPT's key/value cache: a plain pytree of preallocated buffers.

{'k': [layer 0 .. L-1], 'v': [...]}, one buffer per layer in the model's compute dtype: keys
(batch, heads, head_dim, length), values (batch, heads, length, head_dim). GPT.decode_step
writes the new positions with dynamic_update_slice and returns the updated pytree; under jit
inside a loop the update happens in place.

Layout, chosen by measurement on CPU (benchmarks/sampler.py, docs/performance.md):
  * one buffer per layer, not one stacked [layers, ...] array: the decoder's layers are
    unrolled, and a per-layer buffer is read by the attention without slicing a copy out of
    the stack;
  * heads before positions: the attention contracts per (batch, head), and with this layout
    its batched matmuls read the cache as stored instead of transposing it every step
    (about 1.5x faster attention at 128 positions);
  * keys stored transposed (head_dim before length), so the scores q . k are a plain
    (queries x head_dim) @ (head_dim x length) product per (batch, head): the attention of a
    batch-8 group step 1.5x faster again.
"""
import jax.numpy as jnp


def init_kv_cache(config, batch, length, dtype=None):
  """Zero cache for `batch` rows and positions 0..length-1."""
  dtype = config.compute_dtype if dtype is None else dtype
  keys = (batch, config.num_heads, config.head_dim, length)
  values = (batch, config.num_heads, length, config.head_dim)
  return {"k": [jnp.zeros(keys, dtype) for _ in range(config.num_layers)],
          "v": [jnp.zeros(values, dtype) for _ in range(config.num_layers)]}


POSITION_AXIS = {"k": 3, "v": 2}


def grow_kv_cache(cache, length):
  """Pads every buffer with empty positions up to `length` (kept entries unchanged)."""
  def grow(buffer, axis):
    extra = length - buffer.shape[axis]
    if extra < 0:
      raise ValueError(f"cannot shrink a cache of length {buffer.shape[axis]} to {length}")
    padding = [(0, 0)] * buffer.ndim
    padding[axis] = (0, extra)
    return jnp.pad(buffer, padding)
  return {name: [grow(b, POSITION_AXIS[name]) for b in buffers] for name, buffers in cache.items()}


def cache_length(cache):
  return cache["v"][0].shape[POSITION_AXIS["v"]]
