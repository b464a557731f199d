"""The class-conditional group-parallel GPT of DetailFlow (a LlamaGen-style decoder).

Weight-compatible with the official `Transformer` (see interop/gpt_state_dict.py). Sequence
layout for n codes z_0..z_{n-1} with g = group_size, c = causal_num:

  n <  c:  [class, z_0 .. z_{n-1}]                                  (length n + 1)
  n >= c:  [class, z_0 .. z_{c-1}, s_0 .. s_{g-2}, z_c .. z_{n-1}]  (length n + g)

where s_i are g-1 learned special tokens. With that layout the logits at position k predict
code k, so training feeds n = N - g codes and gets exactly N predictions. Attention uses the
group-causal mask of `detail.gpt_attention_mask`; positions carry a 2D rotary embedding.

Two entry points share every weight:
  * `__call__(codes, labels, train)`: the training path (whole sequence, dropout when train).
  * `decode_step(embeddings, start, cache)`: a block of q new positions against a KV cache,
    used by the sampler (sampling.py); it gives the same logits as `__call__` on the prefix.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax import detail
from detailflow_jax.models import linear
from detailflow_jax.models.partitioning import BHDL, BHLD, BLE, BLF, BLHD, BLV, constrain
# Re-exported: the config is part of this module's public surface.
from detailflow_jax.models.gpt_config import (  # noqa: F401
    GPT_SIZES, GPTConfig, ffn_hidden_size, gpt_model_config, sequence_length)


@functools.lru_cache(maxsize=None)
def rotary_table(block_size, group_size, head_dim, base=10000.0):
  """The official 2D rotary table `freqs_cis`: (block_size + 1, head_dim // 2, 2) float32.

  [p, i, 0] = cos, [p, i, 1] = sin. Row 0 (class token) is all zero, which zeroes the class
  token's query and key (LlamaGen quirk the trained weights depend on). Row p >= 1 is grid cell
  ((p - 1) // g, (p - 1) % g): the first head_dim/4 pairs rotate by the row, the rest by the column.
  """
  quarter = head_dim // 4
  # float32 throughout, as torch computes it, so the table matches the official bit for bit.
  exponents = np.arange(0, head_dim // 2, 2, dtype=np.float32)[:quarter] / np.float32(head_dim // 2)
  inv_freq = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
  cell = np.arange(block_size)
  rows = (cell // group_size).astype(np.float32)
  cols = (cell % group_size).astype(np.float32)
  angles = np.concatenate([np.outer(rows, inv_freq), np.outer(cols, inv_freq)], axis=-1)
  angles = angles.astype(np.float32)
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
  return np.concatenate([np.zeros((1, head_dim // 2, 2), np.float32), table])


def apply_rotary(x, table):
  """Rotates adjacent pairs (x[2i], x[2i+1]) of x (B, L, H, D) by table (L, D/2, 2), in float32."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = table[None, :, None, :, 0]
  sin = table[None, :, None, :, 1]
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def masked_attention(q, k_t, v, mask):
  """softmax(q k^T / sqrt(d)) v per head. q (B, Q, H, D); k_t (B, H, D, K) and v (B, H, K, D),
  the layout of the KV cache (kv_cache.py); mask (Q, K) bool, True = may attend.
  Returns (B, Q, H, D)."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  # Both products heads-first, moving q and the result instead: XLA:CPU multiplies the
  # (b, h) batches of a decode step 1.6x faster than with q and the output positions-first.
  scores = jnp.einsum("bhqd,bhdk->bhqk", _heads_first(q), k_t,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return _heads_first(jnp.einsum("bhqk,bhkd->bhqd", weights, v))


def sequence_attention(q, k, v, mask):
  """masked_attention for the training path, with q, k, v all (B, T, H, D) as the projection
  gives them: the same sums without moving k and v to heads-first first."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class PackedDropout(nn.Module):
  """Element-wise dropout drawing `bits` random bits per decision, 32 // bits decisions from
  each 32-bit word (see GPTConfig.dropout_bits); same scaling as nn.Dropout."""
  rate: float
  bits: int

  @nn.compact
  def __call__(self, x, deterministic):
    if deterministic or self.rate == 0.0:
      return x
    per_word = 32 // self.bits
    words = jax.random.bits(self.make_rng("dropout"), (-(-x.size // per_word),), jnp.uint32)
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(self.bits)
    draws = (words[:, None] >> shifts) & jnp.uint32((1 << self.bits) - 1)
    draws = draws.reshape(-1)[:x.size].reshape(x.shape)
    keep_prob = 1.0 - self.rate
    keep = draws < jnp.uint32(round(keep_prob * (1 << self.bits)))
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def _dropout(rate, bits):
  """nn.Dropout (32 bits per decision) or PackedDropout: both called (x, deterministic)."""
  return nn.Dropout(rate) if bits == 32 else PackedDropout(rate, bits)


def _heads_first(x):
  return x.transpose(0, 2, 1, 3)


def _dot_general(dtype, dot_general=jax.lax.dot_general):
  """The contraction of the projections for compute dtype `dtype`. Below float32 the products
  accumulate in float32 and the sum is cast back: XLA:CPU reaches its fast bfloat16 matmul
  kernels only for a float32 result (with a bfloat16 result, bfloat16 sampling at batch 8 was
  no faster than float32; with this, 1.46x faster, docs/performance.md), and TPUs accumulate in
  float32 anyway. In float32 it is `dot_general` itself (jax.lax.dot_general unless given)."""
  if jnp.dtype(dtype) == jnp.float32:
    return dot_general
  def summed_in_float32(*args, **kwargs):
    return dot_general(*args, preferred_element_type=jnp.float32, **kwargs).astype(dtype)
  return summed_in_float32


class Projection(nn.Module):
  """A bias-free linear layer: nn.Dense's `kernel` (in, out), init and sums, which also runs
  from `kernel_t`, the same matrix stored transposed (out, in) as PyTorch stores it (see
  to_decoding_layout). With `kernel_t` the product is computed as kernel_t . x^T, the weight
  matrix on the left: on CPU, XLA's kernels multiply a few rows by a matrix 1.7-3x faster in
  that form (docs/performance.md), which is what a decode step does."""
  features: int
  names: tuple
  dtype: Any = jnp.float32
  init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x):
    dot_general = _dot_general(self.dtype)
    if self.has_variable("params", "kernel_t"):
      x, kernel_t = nn.dtypes.promote_dtype(x, self.get_variable("params", "kernel_t"),
                                            dtype=self.dtype)
      return jnp.moveaxis(dot_general(kernel_t, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.init, self.names),
                        (x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    # linear.dense_dot_general: the same product, a faster weight gradient on CPU.
    return _dot_general(self.dtype, linear.dense_dot_general)(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense(features, names, dtype, init=nn.initializers.normal(0.02)):
  return Projection(features, names, dtype, init)


def _embed(rows, dim, names, dtype, init=nn.initializers.normal(0.02)):
  return nn.Embed(rows, dim, dtype=dtype, embedding_init=nn.with_logical_partitioning(init, names))


def _lookup(embed, ids, rows):
  """nn.Embed's lookup, with the table gathered over `fsdp` first (its rows keep their
  sharding, e.g. vocab over `tensor`): a gather from a feature-sharded table makes XLA
  replicate the batch-sharded gradient before its scatter ("Involuntary full
  rematerialization")."""
  table = constrain(embed.embedding, (rows, None)).astype(embed.dtype)
  return jnp.take(table, ids, axis=0)


class QKVProjection(nn.Module):
  """x (B, L, E) -> q, k, v (B, L, H, D) from the official fused (E, 3E) `kernel`.

  The kernel keeps the official layout (its columns are all q heads, then all k heads, then all
  v heads), so the param tree and checkpoints stay those of the PyTorch weights. A contiguous
  split of that dimension over `tensor` cannot give each rank whole heads (with 2 ranks one
  would hold all of q), so the stored kernel names it "qkv", which maps to no mesh axis: it is
  only FSDP-sharded. Viewed as (E, 3, H, D) and constrained to heads, each tensor rank still
  multiplies only its own heads (column-parallel compute, no communication in the forward);
  the price is that the kernel and its optimizer moments are replicated over `tensor` and its
  gradient is gathered over `tensor` once per step. Same init and sums as nn.Dense.
  """
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, d = self.num_heads, self.head_dim
    if self.has_variable("params", "kernel_t"):  # to_decoding_layout: (3E, E), as Projection
      x, kernel_t = nn.dtypes.promote_dtype(x, self.get_variable("params", "kernel_t"),
                                            dtype=self.dtype)
      qkv = jax.lax.dot_general(kernel_t, x, (((1,), (x.ndim - 1,)), ((), ())),
                                preferred_element_type=jnp.float32).astype(self.dtype)
      qkv = jnp.moveaxis(qkv.reshape(3, h, d, *x.shape[:-1]), (0, 1, 2), (-3, -2, -1))
      return tuple(constrain(qkv[:, :, i], BLHD) for i in range(3))
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               ("embed", "qkv")),
                        (x.shape[-1], 3 * h * d), jnp.float32)
    # Gathered over fsdp as a matrix first: reshaping the fsdp-sharded (E, 3E) matrix into
    # (E, 3, H, D) directly makes XLA reshuffle it (an all-to-all and a permute per layer).
    kernel = constrain(constrain(kernel, (None, None)).reshape(x.shape[-1], 3, h, d),
                       (None, None, "heads", None))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    # Float32 accumulation below float32, as _dot_general.
    qkv = jnp.einsum("ble,eshd->blshd", x, kernel,
                     preferred_element_type=jnp.float32).astype(self.dtype)
    return tuple(constrain(qkv[:, :, i], BLHD) for i in range(3))


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed.astype(self.dtype) * scale).astype(self.dtype)


class Attention(nn.Module):
  config: GPTConfig

  def setup(self):
    c = self.config
    self.wqkv = QKVProjection(c.num_heads, c.head_dim, c.compute_dtype)
    # Row-parallel: its input (the heads, head-major) is split over `tensor` as the heads are.
    self.wo = _dense(c.dim, ("heads", "embed"), c.compute_dtype)
    self.resid_dropout = _dropout(c.resid_dropout, c.dropout_bits)

  def _project(self, x, rope):
    q, k, v = self.wqkv(x)
    return apply_rotary(q, rope), apply_rotary(k, rope), v

  def _output(self, attended, deterministic):
    attended = constrain(attended, BLHD)
    out = constrain(self.wo(attended.reshape(*attended.shape[:2], self.config.dim)), BLE)
    return self.resid_dropout(out, deterministic=deterministic)

  def __call__(self, x, rope, mask, deterministic):
    q, k, v = self._project(x, rope)
    return self._output(sequence_attention(q, k, v, mask), deterministic)

  def extend(self, x, rope, start, cache_k, cache_v):
    """Attention of q new positions (start..start+q-1) that see every cached position < start
    and each other, which is what the group-causal mask allows for the blocks the sampler feeds
    (one token in the causal region, one whole group after it). cache_k (B, H, D, S), cache_v
    (B, H, S, D) (kv_cache.py). Returns out, updated cache k/v."""
    q, k, v = self._project(x, rope)
    write = lambda cache, new, axis: jax.lax.dynamic_update_slice_in_dim(
        cache, new.astype(cache.dtype), start, axis=axis)
    cache_k = constrain(write(cache_k, k.transpose(0, 2, 3, 1), 3), BHDL)
    cache_v = constrain(write(cache_v, _heads_first(v), 2), BHLD)
    visible = jnp.arange(cache_v.shape[2]) < start + x.shape[1]
    attended = masked_attention(q, cache_k, cache_v, visible[None, :])
    return self._output(attended, True), cache_k, cache_v


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x), names as the official module."""
  config: GPTConfig

  def setup(self):
    c = self.config
    self.w1 = _dense(c.ffn_hidden, ("embed", "mlp"), c.compute_dtype)
    self.w3 = _dense(c.ffn_hidden, ("embed", "mlp"), c.compute_dtype)
    self.w2 = _dense(c.dim, ("mlp", "embed"), c.compute_dtype)
    self.ffn_dropout = _dropout(c.ffn_dropout, c.dropout_bits)

  def __call__(self, x, deterministic):
    hidden = constrain(nn.silu(constrain(self.w1(x), BLF)) * constrain(self.w3(x), BLF), BLF)
    out = constrain(self.w2(hidden), BLE)
    return self.ffn_dropout(out, deterministic=deterministic)


class GPTBlock(nn.Module):
  """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""
  config: GPTConfig

  def setup(self):
    c = self.config
    self.attention_norm = RMSNorm(c.norm_eps, c.compute_dtype)
    self.attention = Attention(c)
    self.ffn_norm = RMSNorm(c.norm_eps, c.compute_dtype)
    self.feed_forward = FeedForward(c)

  def __call__(self, x, rope, mask, deterministic):
    x = constrain(x, BLE)
    h = constrain(x + self.attention(self.attention_norm(x), rope, mask, deterministic), BLE)
    return constrain(h + self.feed_forward(self.ffn_norm(h), deterministic), BLE)

  def extend(self, x, rope, start, cache_k, cache_v):
    x = constrain(x, BLE)
    attended, cache_k, cache_v = self.attention.extend(
        self.attention_norm(x), rope, start, cache_k, cache_v)
    h = constrain(x + attended, BLE)
    return constrain(h + self.feed_forward(self.ffn_norm(h), True), BLE), cache_k, cache_v


class GPT(nn.Module):
  """The official `Transformer` (model_type c2i). See the module docstring for the layout."""
  config: GPTConfig

  def setup(self):
    c = self.config
    dt = c.compute_dtype
    self.cls_embedding = _embed(c.num_class_rows, c.dim, ("classes", "embed"), dt)
    self.tok_embeddings = _embed(c.vocab_size, c.dim, ("vocab", "embed"), dt)
    # The official special embeddings are created after its weight init, so they keep
    # torch's default N(0, 1).
    if c.group_size > 1:  # g = 1 (plain next-token prediction) has no special tokens
      self.spe_tok_embeddings = _embed(c.group_size - 1, c.dim, ("special", "embed"), dt,
                                       nn.initializers.normal(1.0))
    self.token_dropout = _dropout(c.token_dropout, c.dropout_bits)
    self.layers = [GPTBlock(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.norm_eps, dt)
    # Zero-initialised head, as the official initialize_weights.
    self.output = _dense(c.vocab_size, ("embed", "vocab"), dt, nn.initializers.zeros)

  def embed_classes(self, labels):
    """(B,) int labels -> (B, 1, dim); label num_classes is the null (unconditional) class."""
    return _lookup(self.cls_embedding, labels, "classes")[:, None]

  def embed_codes(self, codes):
    return _lookup(self.tok_embeddings, codes, "vocab")

  def special_embeddings(self):
    """(g - 1, dim): the learned tokens inserted after the first causal_num codes."""
    c = self.config
    if c.group_size == 1:  # no param: orbax cannot save a zero-size array
      return jnp.zeros((0, c.dim), c.compute_dtype)
    table = constrain(self.spe_tok_embeddings.embedding, ("special", None))
    return table.astype(c.compute_dtype)

  def logits(self, h):
    """Vocab-parallel head: the logits stay split over `tensor` along the vocabulary."""
    return constrain(self.output(self.norm(h)), BLV).astype(jnp.float32)

  def __call__(self, codes, labels, train=False):
    """Training-path forward. codes (B, n) int, labels (B,) int -> logits (B, L, V) float32,
    L = sequence_length(n); logits[:, k] predict code k. With train=True, dropout and label
    dropout use the 'dropout' rng."""
    c = self.config
    if train and c.class_dropout_prob > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), c.class_dropout_prob, labels.shape)
      labels = jnp.where(drop, c.num_classes, labels)
    cls = self.embed_classes(labels)
    tokens = self.embed_codes(codes)
    n = codes.shape[1]
    if n >= c.causal_num:
      special = jnp.broadcast_to(self.special_embeddings()[None], (codes.shape[0], c.group_size - 1, c.dim))
      parts = [cls, tokens[:, :c.causal_num], special, tokens[:, c.causal_num:]]
    else:
      parts = [cls, tokens]
    h = self.token_dropout(jnp.concatenate(parts, axis=1), deterministic=not train)
    length = h.shape[1]
    if length > c.block_size:
      raise ValueError(f"codes has {n} codes, giving a sequence of {length} > block_size="
                       f"{c.block_size}; feed at most {c.block_size - c.group_size} codes")
    rope = jnp.asarray(rotary_table(c.block_size, c.group_size, c.head_dim, c.rope_base)[:length])
    mask = jnp.asarray(detail.gpt_attention_mask(length, c.group_size, c.causal_num))
    for layer in self.layers:
      h = layer(h, rope, mask, not train)
    return self.logits(h)

  def decode_step(self, embeddings, start, cache):
    """Runs q new positions start..start+q-1 (embeddings (B, q, dim)) against `cache`.

    `cache` is {'k': [...], 'v': [...]}, one buffer per layer (kv_cache.py), holding the
    keys/values of positions < start (see kv_cache.init_kv_cache). The new keys/values are
    written at `start` and every new position attends to all positions < start + q: valid for
    a single token in the causal region or for one whole group. Returns (logits (B, q, V)
    float32, updated cache)."""
    c = self.config
    table = jnp.asarray(rotary_table(c.block_size, c.group_size, c.head_dim, c.rope_base))
    rope = jax.lax.dynamic_slice_in_dim(table, start, embeddings.shape[1], axis=0)
    h = embeddings.astype(c.compute_dtype)
    new_k, new_v = [], []
    for layer, k, v in zip(self.layers, cache["k"], cache["v"]):
      h, k, v = layer.extend(h, rope, start, k, v)
      new_k.append(k)
      new_v.append(v)
    return self.logits(h), {"k": new_k, "v": new_v}


def next_code_loss(logits, targets, valid=None):
  """Official training loss: mean cross-entropy of logits (B, N, V) against targets (B, N);
  with `valid` (B,) only valid samples count (sum over valid positions / their count).

  Computed as logsumexp(logits) - logits[target]: the float32 logits are the only (B, N, V)
  array of the forward (no log-probabilities beside them), and the backward is one fused
  softmax - one_hot over them."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  if valid is None:
    return nll.mean()
  weights = jnp.broadcast_to(valid.astype(jnp.float32)[:, None], nll.shape)
  return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def init_params(config, rng):
  """Freshly initialised parameters (plain arrays) as the official init: N(0, 0.02) linears and
  embeddings, zero output head, unit norms, N(0, 1) special tokens."""
  model = GPT(config)
  codes = jnp.zeros((1, config.block_size - config.group_size), jnp.int32)
  variables = jax.jit(model.init)(rng, codes, jnp.zeros((1,), jnp.int32))
  return nn.unbox(variables["params"])


def param_logical_axes(config):
  """Pytree (same structure as the params) of PartitionSpecs of logical axis names:
  embed, qkv, heads, mlp, vocab, classes, special, norm; train/sharding.py maps them to mesh
  axes."""
  model = GPT(config)
  codes = jnp.zeros((1, config.block_size - config.group_size), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), codes, jnp.zeros((1,), jnp.int32))
  return nn.get_partition_spec(abstract["params"])


def _transpose_kernels(tree, name, new_name):
  """tree with every 2-D leaf `name` replaced by its transpose under `new_name`."""
  if name in tree and not isinstance(tree[name], dict):
    rest = {k: v for k, v in tree.items() if k != name}
    return {**rest, new_name: jnp.asarray(tree[name]).T}
  return {k: _transpose_kernels(v, name, new_name) if isinstance(v, dict) else v
          for k, v in tree.items()}


def to_decoding_layout(params):
  """params with every projection's `kernel` (in, out) stored transposed as `kernel_t`
  (out, in), which the model reads as well (Projection, QKVProjection): the same products,
  computed weight-matrix-first, which makes the CPU sampler faster (docs/performance.md).
  For inference only: training, checkpoints, sharding rules and conversion use `kernel`, and
  from_decoding_layout undoes it. Params already in this layout come back unchanged."""
  return _transpose_kernels(dict(params), "kernel", "kernel_t")


def from_decoding_layout(params):
  """The inverse of to_decoding_layout: every `kernel_t` back to `kernel` (in, out)."""
  return _transpose_kernels(dict(params), "kernel_t", "kernel")
