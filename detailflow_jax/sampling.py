"""Group-parallel decoding of the GPT (the paper's next-detail prediction), jit-compiled.

One compiled program per static setting runs the whole decode:
  1. causal phase: the class token (position 0) gives code 0; codes 1..c-1 follow one per step,
     each step feeding the previous code (query length 1);
  2. group phase: each step feeds one whole group (query length g) and samples the next g codes
     together: the first group step feeds [z_{c-1}, s_0..s_{g-2}], later ones the codes of the
     previous group.
Steps: c + (N - c) / g (23 for N = 128, g = c = 8). Both phases are lax.fori_loops over a state
dataclass; keys and values live in a preallocated cache (kv_cache.py) written with
dynamic_update_slice, so every step costs only its new positions. The official sampler re-runs
the whole prefix at every step; this one gives the same logits up to float rounding.
`generate_codes_stepwise` runs the same steps as separate programs and returns to Python after
each one (progressive previews, api.sample_progressive).

Classifier-free guidance doubles the batch ([labels; null class]) and mixes the logits as
u + (c - u) * scale. Sampling draws one uniform per code from the row's own key (row i depends
only on rng[i]) and inverts the CDF blockwise, which avoids sorting the vocabulary.
"""
import dataclasses
import functools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax import kv_cache
from detailflow_jax.models.gpt import GPT, GPTConfig


def decodable_token_counts(config):
  """Token counts a decode can stop at: 1..causal_num, then every group end up to block_size."""
  c, g, n = config.causal_num, config.group_size, config.block_size
  return list(range(1, c + 1)) + list(range(c + g, n + 1, g))


def gradual_cfg_scale(cfg_scale, group_index, config):
  """The official gradual_cfg schedule: group j (j >= c/g) uses scale * (G - j + 1) / (G + 1),
  G = block_size / g. Counted over the full block, so a shorter decode is a prefix of a full one."""
  groups = config.block_size // config.group_size
  return cfg_scale * (groups - group_index + 1) / (groups + 1)


def group_segments(config, num_tokens, min_window=32):
  """Splits the group steps into runs that share a cache length: [(first_group, end_group,
  cache_length)]. Step j fills positions up to (j + 1) * g, so early steps attend over a short
  cache (the next power of two, at least `min_window`) and the cache grows between runs. Each
  run is one more copy of the step in the compiled program, hence powers of two."""
  g = config.group_size
  segments = []
  for j in range(config.causal_num // g, num_tokens // g):
    needed = (j + 1) * g
    window = min(num_tokens, max(min_window, 1 << (needed - 1).bit_length()))
    if segments and segments[-1][2] == window:
      segments[-1][1] = j + 1
    else:
      segments.append([j, j + 1, window])
  return [tuple(s) for s in segments]


@flax.struct.dataclass
class DecodeState:
  """Carried through the decoding loops."""
  codes: jax.Array          # (B, num_tokens) int32; filled up to the current step
  cache: dict               # kv_cache pytree for the model batch (2B with guidance)
  logits_cond: jax.Array    # (B, num_tokens, V) float32 if recording, else (0,)
  logits_uncond: jax.Array  # same for the null-class half


def _validate(config, labels, num_tokens, cfg_scale, top_k, top_p, temperature):
  counts = decodable_token_counts(config)
  if num_tokens not in counts:
    raise ValueError(f"num_tokens={num_tokens} is not a decodable token count; valid: {counts}")
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    if values.ndim != 1 or values.size == 0:
      raise ValueError(f"labels must be a non-empty 1-D array of class ids, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"labels must be integers, got dtype {values.dtype}")
    bad = values[(values < 0) | (values >= config.num_classes)]
    if bad.size:
      raise ValueError(f"labels {bad.tolist()} outside the valid range [0, {config.num_classes})")
  if cfg_scale != 1.0 and config.class_dropout_prob <= 0:
    raise ValueError(f"cfg_scale={cfg_scale} needs the null-class embedding, which this model "
                     "lacks (class_dropout_prob=0); use cfg_scale=1.0")
  if not 0 <= top_k <= config.vocab_size:
    raise ValueError(f"top_k={top_k} must be in [0, {config.vocab_size}] (0: no top-k filter)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus filter)")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")


def _row_keys(rng, batch):
  """One PRNG key per row: a single key is split, a batch of keys is used as given."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  single_ndim = 0 if typed else 1
  if rng.ndim == single_ndim:
    return jax.random.split(rng, batch)
  if rng.ndim == single_ndim + 1 and rng.shape[0] == batch:
    return rng
  raise ValueError(f"rng must be one PRNG key or one key per label ({batch}), got shape {rng.shape}")


def filter_logits(logits, top_k, top_p=None):
  """Official top-k then top-p filtering on (R, V) float32 logits: dropped entries -> -inf.

  top_k (static int, 0 = off) keeps values >= the k-th largest. top_p (traced scalar, None =
  off) keeps the smallest prefix of the sorted distribution whose mass before the last kept
  entry is <= top_p (so the most likely entry always stays)."""
  if top_k:
    kth = (jnp.max(logits, axis=-1, keepdims=True) if top_k == 1
           else jax.lax.top_k(logits, top_k)[0][:, -1:])
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    ordered = -jnp.sort(-logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    keep = 1 + jnp.sum(cumulative[:, :-1] <= top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _inclusive_cumsum(x):
  """Cumulative sum over the last axis of a short axis as one matmul with a triangular matrix
  (XLA's CPU cumsum is a long chain of small ops: slower to run and to compile)."""
  n = x.shape[-1]
  upper = jnp.triu(jnp.ones((n, n), x.dtype))
  return jnp.matmul(x, upper, precision=jax.lax.Precision.HIGHEST)


def _last_positive(x):
  return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1]), 0), axis=-1)


def categorical_from_uniform(logits, uniforms, block=128):
  """Draws index ~ softmax(logits) per row from one uniform per row, without a sort or a
  full-vocabulary cumsum: pick a block of `block` entries by the CDF of block masses, then the
  entry inside it. Entries at -inf are never drawn. logits (R, V), uniforms (R,) -> (R,) int32."""
  rows, vocab = logits.shape
  block = min(block, vocab)
  padded = -(-vocab // block) * block
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.pad(weights, ((0, 0), (0, padded - vocab))).reshape(rows, padded // block, block)
  block_mass = weights.sum(-1)
  block_cdf = _inclusive_cumsum(block_mass)
  target = uniforms * block_cdf[:, -1]
  # Clamping to the last block / entry with mass guards against float rounding at the top end.
  chosen = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_positive(block_mass))
  # Selecting by comparison rather than gather: cheaper to compile and no slower here.
  is_chosen = jnp.arange(block_mass.shape[1]) == chosen[:, None]
  inside = jnp.sum(jnp.where(is_chosen[:, :, None], weights, 0.0), axis=1)
  before = jnp.sum(jnp.where(is_chosen, block_cdf - block_mass, 0.0), axis=1)
  inner_cdf = _inclusive_cumsum(inside)
  offset = jnp.minimum(jnp.sum(inner_cdf <= (target - before)[:, None], axis=-1), _last_positive(inside))
  return (chosen * block + offset).astype(jnp.int32)


def code_uniforms(keys, num_tokens):
  """(B, num_tokens) uniforms, entry [i, k] from fold_in(keys[i], k): row i depends only on its
  key, and a shorter decode sees the same numbers as a longer one."""
  per_code = lambda key: jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(key, k)))(
      jnp.arange(num_tokens))
  return jax.vmap(per_code)(keys)


def _draw(logits, uniforms, temperature, top_k, top_p):
  """Codes for logits (B, q, V) with their uniforms (B, q) -> (B, q) int32."""
  batch, q, vocab = logits.shape
  flat = logits.reshape(batch * q, vocab) / jnp.maximum(temperature, 1e-5)
  flat = filter_logits(flat, top_k, top_p)
  return categorical_from_uniform(flat, uniforms.reshape(-1)).reshape(batch, q)


@dataclasses.dataclass(frozen=True)
class DecodeSteps:
  """The pieces of one decode, closed over the model and the sampling settings: the state
  before the first step, the causal step i (code i) and the group step j (codes j*g..j*g+g-1).
  `_decode` runs them in lax loops inside one program; `generate_codes_stepwise` jits them
  separately and returns to Python after each step."""
  initial: DecodeState
  causal_step: Callable[[jax.Array, DecodeState], DecodeState]
  group_step: Callable[[jax.Array, DecodeState], DecodeState]


def _decode_steps(params, labels, keys, cfg_scale, temperature, top_p, gradual, *, config,
                  num_tokens, top_k, use_top_p, guided, record_logits):
  c = config
  model = GPT(c)
  variables = {"params": params}
  batch = labels.shape[0]
  model_labels = jnp.concatenate([labels, jnp.full_like(labels, c.num_classes)]) if guided else labels
  copies = 2 if guided else 1
  class_emb = model.apply(variables, model_labels, method=GPT.embed_classes)
  special = model.apply(variables, method=GPT.special_embeddings)
  log_shape = (batch, num_tokens, c.vocab_size) if record_logits else (0,)
  all_uniforms = code_uniforms(keys, num_tokens)

  def run_model(embeddings, start, cache):
    return model.apply(variables, embeddings, start, cache, method=GPT.decode_step)

  def embed(codes):
    return model.apply(variables, jnp.tile(codes, (copies, 1)), method=GPT.embed_codes)

  def guide(logits, scale):
    if not guided:
      return logits, logits, logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + (cond - uncond) * scale, cond, uncond

  def record(state, cond, uncond, first_code):
    if not record_logits:
      return state
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, first_code, axis=1)
    return state.replace(logits_cond=put(state.logits_cond, cond),
                         logits_uncond=put(state.logits_uncond, uncond))

  def sample_block(state, logits, scale, first_code):
    guided_logits, cond, uncond = guide(logits, scale)
    uniforms = jax.lax.dynamic_slice_in_dim(all_uniforms, first_code, logits.shape[1], axis=1)
    new = _draw(guided_logits, uniforms, temperature, top_k, top_p if use_top_p else None)
    codes = jax.lax.dynamic_update_slice_in_dim(state.codes, new, first_code, axis=1)
    return record(state.replace(codes=codes), cond, uncond, first_code)

  def causal_step(i, state):
    previous = jax.lax.dynamic_slice_in_dim(state.codes, jnp.maximum(i - 1, 0), 1, axis=1)
    embeddings = jnp.where(i == 0, class_emb, embed(previous))
    logits, cache = run_model(embeddings, i, state.cache)
    return sample_block(state.replace(cache=cache), logits, cfg_scale, i)

  # Group j (code indices j*g .. j*g+g-1) comes from sequence positions j*g .. j*g+g-1, which
  # hold the previous group (or z_{c-1} and the special tokens).
  g = c.group_size
  first_group = c.causal_num // g

  def group_step(j, state):
    previous = embed(jax.lax.dynamic_slice_in_dim(state.codes, (j - 1) * g, g, axis=1))
    opening = jnp.concatenate(
        [previous[:, -1:], jnp.broadcast_to(special[None], (previous.shape[0],) + special.shape)], 1)
    embeddings = jnp.where(j == first_group, opening, previous)
    logits, cache = run_model(embeddings, j * g, state.cache)
    scale = jnp.where(gradual, gradual_cfg_scale(cfg_scale, j, c), cfg_scale)
    return sample_block(state.replace(cache=cache), logits, scale, j * g)

  # The causal phase's cache only needs the positions that phase writes.
  initial = DecodeState(
      codes=jnp.zeros((batch, num_tokens), jnp.int32),
      cache=kv_cache.init_kv_cache(c, copies * batch, min(num_tokens, c.causal_num)),
      logits_cond=jnp.zeros(log_shape, jnp.float32),
      logits_uncond=jnp.zeros(log_shape, jnp.float32))
  return DecodeSteps(initial=initial, causal_step=causal_step, group_step=group_step)


_STATIC = ("config", "num_tokens", "top_k", "use_top_p", "guided", "record_logits")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(params, labels, keys, cfg_scale, temperature, top_p, gradual, **static):
  c, num_tokens = static["config"], static["num_tokens"]
  steps = _decode_steps(params, labels, keys, cfg_scale, temperature, top_p, gradual, **static)
  state = jax.lax.fori_loop(0, min(num_tokens, c.causal_num), steps.causal_step, steps.initial)
  for first, end, window in group_segments(c, num_tokens) if num_tokens > c.causal_num else []:
    state = state.replace(cache=kv_cache.grow_kv_cache(state.cache, window))
    state = jax.lax.fori_loop(first, end, steps.group_step, state)
  return state.codes, state.logits_cond, state.logits_uncond


# The same pieces as separate programs, for a caller that wants the codes after every step.
# Each returns the new state; `index` (the step) is traced, so one program serves every step of
# a phase (the group step compiles once per cache window, as the segments of `_decode`).
@functools.partial(jax.jit, static_argnames=_STATIC)
def _initial_state(params, labels, keys, cfg_scale, temperature, top_p, gradual, **static):
  return _decode_steps(params, labels, keys, cfg_scale, temperature, top_p, gradual,
                       **static).initial


@functools.partial(jax.jit, static_argnames=_STATIC + ("phase",), donate_argnames=("state",))
def _one_step(params, labels, keys, cfg_scale, temperature, top_p, gradual, state, index, *,
              phase, **static):
  steps = _decode_steps(params, labels, keys, cfg_scale, temperature, top_p, gradual, **static)
  step = steps.causal_step if phase == "causal" else steps.group_step
  return step(index, state)


@functools.partial(jax.jit, static_argnames=("length",))
def _grow(state, length):
  return state.replace(cache=kv_cache.grow_kv_cache(state.cache, length))


def _unwrap(params):
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def _prepare(gpt_params, gpt_config, labels, rng, cfg_scale, temperature, top_k, top_p,
             gradual_cfg, num_tokens, record_logits):
  """Validated (traced arguments, static arguments) of `_decode` and its pieces."""
  if not isinstance(gpt_config, GPTConfig):
    gpt_config = GPTConfig.from_dict(gpt_config)
  num_tokens = gpt_config.block_size if num_tokens is None else int(num_tokens)
  cfg_scale, temperature, top_p, top_k = float(cfg_scale), float(temperature), float(top_p), int(top_k)
  _validate(gpt_config, labels, num_tokens, cfg_scale, top_k, top_p, temperature)
  labels = jnp.asarray(labels, jnp.int32)
  keys = _row_keys(rng, labels.shape[0])
  args = (_unwrap(gpt_params), labels, keys, jnp.float32(cfg_scale), jnp.float32(temperature),
          jnp.float32(top_p), jnp.bool_(gradual_cfg))
  static = dict(config=gpt_config, num_tokens=num_tokens, top_k=top_k, use_top_p=top_p < 1.0,
                guided=cfg_scale != 1.0, record_logits=record_logits)
  return args, static


def generate_codes_with_logits(gpt_params, gpt_config, labels, *, rng, cfg_scale=1.5,
                               temperature=1.0, top_k=0, top_p=1.0, gradual_cfg=False,
                               num_tokens=None, record_logits=True):
  """`generate_codes`, also returning the logits that decided each code: (codes, cond, uncond)
  with cond/uncond (B, num_tokens, V) float32 (the same array twice without guidance)."""
  args, static = _prepare(gpt_params, gpt_config, labels, rng, cfg_scale, temperature, top_k,
                          top_p, gradual_cfg, num_tokens, record_logits)
  return _decode(*args, **static)


def generate_codes(gpt_params, gpt_config, labels, *, rng, cfg_scale=1.5, temperature=1.0,
                   top_k=0, top_p=1.0, gradual_cfg=False, num_tokens=None):
  """Samples code sequences with group-parallel decoding. Returns int32 (B, num_tokens).

  gpt_params: the GPT param tree (or {'params': tree}); gpt_config: GPTConfig or its dict.
  labels: (B,) ints in [0, num_classes). rng: one PRNG key (split per row) or one key per row
  (row i then depends only on rng[i]). cfg_scale 1.0 = no guidance (no batch doubling).
  top_k 0 and top_p 1.0 = no filtering. gradual_cfg: the official linear decay over groups.
  num_tokens: stop early at a decodable count (see decodable_token_counts); default block_size.
  Compiles once per (config, num_tokens, top_k, top_p < 1, guidance on/off, batch size)."""
  codes, _, _ = generate_codes_with_logits(
      gpt_params, gpt_config, labels, rng=rng, cfg_scale=cfg_scale, temperature=temperature,
      top_k=top_k, top_p=top_p, gradual_cfg=gradual_cfg, num_tokens=num_tokens,
      record_logits=False)
  return codes


def generate_codes_stepwise(gpt_params, gpt_config, labels, *, rng, cfg_scale=1.5,
                            temperature=1.0, top_k=0, top_p=1.0, gradual_cfg=False,
                            num_tokens=None):
  """`generate_codes` one decoding step at a time: an iterator of (n, codes (B, n) int32), one
  after each causal token and each group, n running over decodable_token_counts up to
  num_tokens.

  The steps are the functions `generate_codes` loops over inside one program, here each its own
  compiled program (one for the causal step, one per cache window for the group step), so the
  caller gets control back at every group boundary; the same key gives the same codes as
  `generate_codes`. Arguments are checked at the call; each next() dispatches one step."""
  args, static = _prepare(gpt_params, gpt_config, labels, rng, cfg_scale, temperature, top_k,
                          top_p, gradual_cfg, num_tokens, record_logits=False)
  return _stepwise(args, static)


def _stepwise(args, static):
  c, num_tokens = static["config"], static["num_tokens"]
  state = _initial_state(*args, **static)
  for i in range(min(num_tokens, c.causal_num)):
    state = _one_step(*args, state, jnp.int32(i), phase="causal", **static)
    yield i + 1, state.codes[:, :i + 1]
  for first, end, window in group_segments(c, num_tokens) if num_tokens > c.causal_num else []:
    state = _grow(state, window)
    for j in range(first, end):
      state = _one_step(*args, state, jnp.int32(j), phase="group", **static)
      yield (j + 1) * c.group_size, state.codes[:, :(j + 1) * c.group_size]
