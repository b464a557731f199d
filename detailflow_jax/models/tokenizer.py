"""DetailFlow's 1D coarse-to-fine tokenizer (official VQModel with SigLIP2 encoder/decoder).

Images are NHWC float in [-1, 1]. Call the methods through
`DetailFlowTokenizer(config).apply({'params': params}, ..., method='encode')` etc.

Self-correction (official `encode_image(x, noise_idx=q)`): the clean codes of positions >= q are
replaced by a random one of their 50 nearest codes over a span (1 token if q < causal_num, else
the whole group starting at q), the prefix [clean < q, noisy span] is re-embedded by
`refine_conv` and replaces the latent queries there, `refined_tokens` fill the rest, and a second
encoder pass re-quantises the positions after the span. `noise_position` may be a traced scalar:
everything uses position masks, so one program serves every position.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from detailflow_jax import detail
from detailflow_jax.models import quantizer as vq
from detailflow_jax.models import vit
from detailflow_jax.models.tokenizer_towers import LatentDecoder, LatentEncoder


def _torch_dense(features, fan_in, dtype, precision, names, name=None):
  # Official quant_conv / post_quant_conv / refine_conv are default-initialised nn.Linear.
  return nn.Dense(features, dtype=dtype, precision=precision, name=name,
                  kernel_init=vit.logical(vit.torch_linear_kernel_init, names),
                  bias_init=vit.logical(vit.torch_linear_bias_init(fan_in), names[1:]))


def _is_static_int(x):
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def latent_mask(c):
  """The config's latent_mask ("group_causal" for configs saved before the key existed)."""
  return c.get("latent_mask", "group_causal")


def validate_tokenizer_config(c):
  """Raises ValueError for a `tokenizer` config the model cannot be built from."""
  if latent_mask(c) not in detail.LATENT_MASKS:
    raise ValueError(f"latent_mask={latent_mask(c)!r} must be one of {detail.LATENT_MASKS}")
  if c.num_tokens % c.group_size or c.causal_num % c.group_size:
    raise ValueError(f"num_tokens={c.num_tokens} and causal_num={c.causal_num} must be multiples "
                     f"of group_size={c.group_size}")
  if not c.group_size <= c.causal_num <= c.num_tokens:
    raise ValueError(f"causal_num={c.causal_num} must be in [group_size={c.group_size}, "
                     f"num_tokens={c.num_tokens}]")
  for tower in ("encoder", "decoder"):
    p = c[tower].patch_size
    if c.image_size % p:
      raise ValueError(f"image_size={c.image_size} is not a multiple of {tower}.patch_size={p}")
  if not 1 <= c.self_correction_top_k <= c.codebook_size:
    raise ValueError(f"self_correction_top_k={c.self_correction_top_k} must be in "
                     f"[1, codebook_size={c.codebook_size}]")


class DetailFlowTokenizer(nn.Module):
  """Encoder (latent queries) -> quant_conv -> l2 VQ -> post_quant_conv -> decoder.

  config: the `tokenizer` ConfigDict of config.defaults (frozen on construction).
  dtype: compute dtype of the towers (params stay float32; quantisation is always float32).
  precision: matmul precision of the towers (None = JAX default; HIGHEST for parity on TPU/GPU).
  """
  config: Any
  dtype: Any = jnp.float32
  precision: Any = None

  def __post_init__(self):
    if not isinstance(self.config, ml_collections.FrozenConfigDict):
      object.__setattr__(self, "config", ml_collections.FrozenConfigDict(self.config))
    super().__post_init__()

  def setup(self):
    c = self.config
    validate_tokenizer_config(c)
    enc, dec = c.encoder, c.decoder
    self.encoder = LatentEncoder(
        enc.width, enc.depth, enc.num_heads, enc.mlp_dim, enc.patch_size, enc.pos_grid,
        c.num_tokens, c.group_size, c.causal_num, enc.layer_norm_eps, self.dtype, self.precision,
        latent_mask(c))
    self.decoder = LatentDecoder(
        dec.width, dec.depth, dec.num_heads, dec.mlp_dim, dec.patch_size, dec.pos_grid,
        c.num_tokens, dec.layer_norm_eps, self.dtype, self.precision)
    # The codebook dimension is small (8 in the paper): never sharded.
    self.quant_conv = _torch_dense(c.codebook_dim, enc.width, jnp.float32, self.precision,
                                   ("embed", "codebook_dim"))
    self.post_quant_conv = _torch_dense(dec.width, c.codebook_dim, self.dtype, self.precision,
                                        ("codebook_dim", "embed"))
    self.refine_conv = _torch_dense(enc.width, c.codebook_dim, self.dtype, self.precision,
                                    ("codebook_dim", "embed"))
    self.quantize = vq.VectorQuantizer(c.codebook_size, c.codebook_dim)

  def __call__(self, images):
    """Touches every param (for init) at the least cost: encode, refine_conv, decode.

    (The encoder's refined_tokens are created with its other params.)
    """
    clean = self.encode(images)
    refined = self.refine_conv(clean["quant"])
    return self.decode(clean["quant"], None, self.config.decoder.patch_size), refined

  def _quantize_latents(self, enc_latent):
    h = self.quant_conv(enc_latent.astype(jnp.float32))
    return dict(h=h, **self.quantize(h))

  def encode(self, images, num_latents: Optional[int] = None):
    """Encodes NHWC images with the first `num_latents` (default N) latent queries.

    Returns a dict: h (B, M, codebook_dim) pre-quant, z (l2-normalised h), quant (straight-
    through), codes (normalised nearest codes), indices (B, M) int32, distances (B, M, K),
    enc_latent (B, M, D_enc), patch_hidden (B, P, D_enc).
    """
    patch_hidden, enc_latent = self.encoder(images, num_latents)
    return dict(enc_latent=enc_latent, patch_hidden=patch_hidden,
                **self._quantize_latents(enc_latent))

  def decode(self, quant, num_tokens, output_size: int):
    """Decodes (B, N, codebook_dim) quantised latents to NHWC (B, S, S, 3), S = output_size.

    num_tokens: None (all), a Python int n (the first n latents are kept, as the reference
    slices), or a traced int32 scalar (latents >= n are masked out of attention instead, so one
    program per output size serves every n).
    """
    latents = self.post_quant_conv(quant)
    num_valid = None
    if num_tokens is not None and _is_static_int(num_tokens):
      if not 1 <= num_tokens <= quant.shape[1]:
        raise ValueError(f"num_tokens={num_tokens} must be in [1, {quant.shape[1]}]")
      latents = latents[:, :int(num_tokens)]
    elif num_tokens is not None:
      num_valid = jnp.asarray(num_tokens, jnp.int32)
    return self.decoder(latents, output_size, num_valid)

  def decode_codes(self, indices, num_tokens, output_size: int):
    """`decode` from int code indices (B, N) via the normalised codebook (the AR sampler path)."""
    return self.decode(self.quantize.lookup(indices), num_tokens, output_size)

  def self_correct(self, images, noise_position, rng=None, *, clean=None, selected_indices=None,
                   num_latents: Optional[int] = None):
    """The official self-correction re-encode of `images` with noise at `noise_position`.

    Args:
      images: NHWC images (the second encoder pass needs them).
      noise_position: int or traced int32 scalar q; the span is [q, q+1) if q < causal_num else
        [q, q+group_size) (q must then start a group).
      rng: PRNG key for the top-k draw (needed unless `selected_indices` is given).
      clean: the `encode(images, num_latents)` dict, if already computed.
      selected_indices: (B, M) int32 noisy codes to use instead of drawing them.

    Returns a dict: quant (B, M, dim) = [clean < q, noisy span, re-encoded after the span],
    index_triplet (B, M, 3) int32 = (clean, input, label) as the reference, selected_indices,
    quant_noise (B, M, dim; meaningful before noise_end), noise_token (refine_conv of it),
    enc_latent / h / z / codes / indices / distances / new_quant of the second pass (all M
    positions),
    noise_end (int32 scalar) and corrected_mask ((M,) bool, True after the span: the positions
    whose codes come from the second pass).
    """
    c = self.config
    if clean is None:
      clean = self.encode(images, num_latents)
    m = clean["quant"].shape[1]
    if _is_static_int(noise_position):
      ok = 0 <= noise_position < m and (noise_position < c.causal_num
                                        or noise_position % c.group_size == 0)
      span = 1 if noise_position < c.causal_num else c.group_size
      if not ok or noise_position + span > m:
        raise ValueError(
            f"noise_position={noise_position} must be in [0, {m}) with its span inside the "
            f"sequence, and a multiple of group_size={c.group_size} when >= causal_num={c.causal_num}")
    if selected_indices is None:
      if rng is None:
        raise ValueError("self_correct needs `rng` to draw the noisy codes (or selected_indices)")
      selected_indices = vq.sample_top_k_codes(rng, clean["distances"], c.self_correction_top_k)
    selected_indices = jnp.asarray(selected_indices, jnp.int32)
    selected_quant = vq.straight_through(clean["z"], self.quantize.lookup(selected_indices))

    q = jnp.asarray(noise_position, jnp.int32)
    noise_end = q + jnp.where(q < c.causal_num, 1, c.group_size)
    pos = jnp.arange(m)
    before, in_span, head = pos < q, (pos >= q) & (pos < noise_end), pos < noise_end

    quant_noise = jax.lax.stop_gradient(
        jnp.where(before[None, :, None], clean["quant"], selected_quant))
    noise_token = self.refine_conv(quant_noise)
    refined = jnp.broadcast_to(self.encoder.refined_tokens[:, :m], noise_token.shape)
    latent_inputs = jnp.where(head[None, :, None], noise_token, refined.astype(noise_token.dtype))
    _, enc_latent = self.encoder(images, m, latent_inputs=latent_inputs)
    second = self._quantize_latents(enc_latent)

    quant = jnp.where(head[None, :, None], quant_noise, second["quant"])
    clean_idx, new_idx = clean["indices"], second["indices"]
    input_idx = jnp.where(before, clean_idx, jnp.where(in_span, selected_indices, new_idx))
    label_idx = jnp.where(head, clean_idx, new_idx)
    return dict(quant=quant, index_triplet=jnp.stack([clean_idx, input_idx, label_idx], -1),
                selected_indices=selected_indices, quant_noise=quant_noise,
                noise_token=noise_token, enc_latent=enc_latent, noise_end=noise_end,
                corrected_mask=~head, new_quant=second.pop("quant"), **second)

  def train_forward(self, images, num_tokens, noise_position, output_size: int, rng=None,
                    num_latents: Optional[int] = None):
    """The official tokenizer training forward (VQModel.forward in train mode).

    Encodes all M (= num_latents, default N) tokens of `images`; with `noise_position` not None
    also runs `self_correct` and decodes both sequences. Batch layout of `reconstructions`:
    rows [0, B) decode the clean codes, rows [B, 2B) the self-corrected codes of the same images
    (both are compared with the same target, so tile the target twice); (B, ...) without
    correction. Both decode the first `num_tokens` latents (int or traced) at `output_size`.

    Losses: vq_loss / commit_loss are the clean pass's (all positions), or with correction
    clean * M/(2M-e) + pass-2 (positions >= e only) * (M-e)/(2M-e), e = noise_end.
    Also returns codebook_usage / perplexity of the clean indices, group_cosine_similarity of
    the decoded codes, first_token (B, codebook_dim): the clean sequence's first quantised token
    (for the alignment loss), indices (B, M) clean codes, z (B, M, codebook_dim) the clean
    l2-normalised latents, and index_triplet when corrected.
    """
    c = self.config
    clean = self.encode(images, num_latents)
    m = clean["quant"].shape[1]
    vq_loss, commit_loss = vq.vq_losses(clean["z"], clean["codes"], c.commitment_beta)
    out = {}
    if noise_position is None:
      quant = clean["quant"]
    else:
      corr = self.self_correct(images, noise_position, rng, clean=clean)
      vq_2, commit_2 = vq.vq_losses(corr["z"], corr["codes"], c.commitment_beta,
                                    valid=corr["corrected_mask"][None, :])
      e = corr["noise_end"].astype(jnp.float32)
      clean_weight, noise_weight = m / (2 * m - e), (m - e) / (2 * m - e)
      vq_loss = vq_loss * clean_weight + vq_2 * noise_weight
      commit_loss = commit_loss * clean_weight + commit_2 * noise_weight
      quant = jnp.concatenate([clean["quant"], corr["quant"]], axis=0)
      out["index_triplet"] = corr["index_triplet"]
    out.update(
        reconstructions=self.decode(quant, num_tokens, output_size),
        vq_loss=vq_loss, commit_loss=commit_loss,
        group_cosine_similarity=vq.group_cosine_similarity(jax.lax.stop_gradient(quant),
                                                           c.group_size),
        first_token=clean["quant"][:, 0], indices=clean["indices"], z=clean["z"],
        **vq.codebook_metrics(clean["indices"], c.codebook_size))
    return out


def init_params(config, rng):
  """Freshly initialised params (the inner tree, without the 'params' wrapper).

  Jitted: op-by-op init of the towers is several times slower than compiling it.
  """
  p = config.encoder.patch_size
  model = DetailFlowTokenizer(config)
  return nn.unbox(jax.jit(model.init)(rng, jnp.zeros((1, p, p, 3), jnp.float32))["params"])


def param_logical_axes(config):
  """Pytree (same structure as the params) of PartitionSpecs of the params' logical axis
  names (train/sharding.py maps them to mesh axes)."""
  p = config.encoder.patch_size
  abstract = jax.eval_shape(DetailFlowTokenizer(config).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, p, p, 3), jnp.float32))
  return nn.get_partition_spec(abstract["params"])


def param_shapes(config):
  """The param tree as ShapeDtypeStructs, without allocating or computing anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
