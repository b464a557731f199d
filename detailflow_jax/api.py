"""The public functions: encode / decode with a tokenizer, sample / generate_codes with a GPT.

Params are plain pytrees bundled with their (static, hashable) configs, so a call is
`sample(params, labels, rng=...)` with nothing global. Every function here is jit-compiled; a
compiled program is cached per config, batch shape and static setting.
"""
import dataclasses
import functools
from typing import Any, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections

from detailflow_jax import detail
from detailflow_jax import dynamic_resolution
from detailflow_jax import sampling
from detailflow_jax import workdir_io
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.models import tokenizer as tokenizer_model


@flax.struct.dataclass
class TokenizerParams:
  """Tokenizer weights + the `tokenizer` config section they belong to."""
  params: Any
  config: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class SamplerParams:
  """Everything `sample` needs: a tokenizer and a GPT trained on its codes."""
  tokenizer: TokenizerParams
  gpt: Any
  gpt_config: gpt_model.GPTConfig = flax.struct.field(pytree_node=False)


def tokenizer_params(params, config):
  return TokenizerParams(params=params, config=ml_collections.FrozenConfigDict(config))


def load_tokenizer(workdir, *, use_ema=False, step=None):
  """TokenizerParams from a tokenizer workdir (latest checkpoint unless `step`)."""
  loaded = workdir_io.load_tokenizer(workdir, use_ema=use_ema, step=step)
  return tokenizer_params(jax.tree_util.tree_map(jnp.asarray, loaded.params), loaded.config)


def load_sampler_params(tokenizer_workdir, gpt_workdir, *, use_ema=None, step=None):
  """SamplerParams from a tokenizer workdir and an AR workdir. use_ema=None takes the GPT's EMA
  weights when the run kept them (the reference samples with EMA)."""
  tokenizer = load_tokenizer(tokenizer_workdir)
  if use_ema is None:
    try:
      loaded = workdir_io.load_gpt(gpt_workdir, use_ema=True, step=step)
    except ValueError:
      loaded = workdir_io.load_gpt(gpt_workdir, use_ema=False, step=step)
  else:
    loaded = workdir_io.load_gpt(gpt_workdir, use_ema=use_ema, step=step)
  check_pairing(tokenizer.config, loaded.config)
  return in_decoding_layout(SamplerParams(
      tokenizer=tokenizer, gpt=jax.tree_util.tree_map(jnp.asarray, loaded.params),
      gpt_config=loaded.config))


def in_decoding_layout(params: SamplerParams) -> SamplerParams:
  """params whose GPT weight matrices are stored transposed (gpt.to_decoding_layout), the form
  load_sampler_params gives: the same logits, and on CPU a decode step 2x faster at batch 1
  (docs/performance.md). Every sampling function takes either layout; checkpoints and
  conversion keep the stored one (gpt.from_decoding_layout gives it back)."""
  return params.replace(gpt=gpt_model.to_decoding_layout(params.gpt))


def check_pairing(tok_config, gpt_config):
  """A GPT must predict the tokenizer's codes: same N, group, causal count and vocabulary."""
  pairs = dict(num_tokens=(tok_config.num_tokens, gpt_config.block_size),
               group_size=(tok_config.group_size, gpt_config.group_size),
               causal_num=(tok_config.causal_num, gpt_config.causal_num),
               codebook_size=(tok_config.codebook_size, gpt_config.vocab_size))
  bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
  if bad:
    raise ValueError("tokenizer and GPT do not match (tokenizer value, GPT value): "
                     + ", ".join(f"{k} {v}" for k, v in bad.items()))


def _model(config):
  return tokenizer_model.DetailFlowTokenizer(config)


@functools.partial(jax.jit, static_argnames=("config", "num_latents"))
def _encode(params, images, config, num_latents=None):
  return _model(config).apply({"params": params}, images, num_latents,
                              method="encode")["indices"]


@functools.partial(jax.jit, static_argnames=("config", "num_tokens", "output_size"))
def _decode(params, codes, config, num_tokens, output_size):
  return _model(config).apply({"params": params}, codes, num_tokens, output_size,
                              method="decode_codes")


def encode(tokenizer: TokenizerParams, images):
  """NHWC float images in [-1, 1] -> int32 codes (B, n): n = N at the tokenizer's image size,
  n = token_count_for_size(config, side) at another supported side (an any-resolution
  tokenizer, see supported_image_sizes); other sides (multiples of the encoder patch) get N."""
  images = jnp.asarray(images, jnp.float32)
  config = tokenizer.config
  size = config.image_size
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC RGB (B, H, W, 3), got shape {images.shape}")
  if images.shape[1] % config.encoder.patch_size or images.shape[2] % config.encoder.patch_size:
    raise ValueError(f"image height/width {images.shape[1:3]} must be multiples of the encoder "
                     f"patch {config.encoder.patch_size} (trained at {size}x{size})")
  side = images.shape[1]
  num_latents = None
  if side == images.shape[2] and side != size and side in supported_image_sizes(config):
    num_latents = token_count_for_size(config, side)
  return _encode(tokenizer.params, images, config, num_latents)


def decodable_token_counts(config):
  return detail.resolution_schedule(config).token_list


def supported_image_sizes(config):
  """Sides a tokenizer encodes and decodes at, ascending: its image_size alone, or every best
  side of R(n) in [tokenizer.min_image_size, image_size] for an any-resolution tokenizer."""
  return dynamic_resolution.supported_sizes(config)


def check_image_size(config, image_size):
  """The image size to decode at (None: the tokenizer's own); ValueError listing the supported
  sizes for any other."""
  supported = supported_image_sizes(config)
  if image_size is None:
    return supported[-1]
  if isinstance(image_size, bool) or not isinstance(image_size, int) or \
      image_size not in supported:
    raise ValueError(f"image_size={image_size!r} is not supported by this tokenizer; "
                     f"supported sizes: {list(supported)}")
  return image_size


def token_count_for_size(config, image_size):
  """Codes of an image of `image_size` (official decres2besttoken): N at the tokenizer's own
  size, fewer at smaller supported sizes. ValueError listing the supported sizes otherwise."""
  return detail.resolution_schedule(config).decres2besttoken[check_image_size(config, image_size)]


def decode(tokenizer: TokenizerParams, codes, num_tokens: Optional[int] = None,
           image_size: Optional[int] = None):
  """Codes (B, >= n) -> images from their first `num_tokens` codes.

  image_size None: at the decoder size d of R(n) (the full image size when num_tokens is None).
  image_size S (a supported size, official decode_code(..., img_size=S)): at S x S; num_tokens
  None then means token_count_for_size(S)."""
  config = tokenizer.config
  codes = jnp.asarray(codes, jnp.int32)
  if image_size is not None:
    check_image_size(config, image_size)
  if num_tokens is not None:
    n = int(num_tokens)
  elif image_size is not None:
    n = token_count_for_size(config, image_size)
  else:
    n = config.num_tokens
  valid = decodable_token_counts(config)
  if n not in valid:
    raise ValueError(f"num_tokens={num_tokens} is not a prefix length of this tokenizer; "
                     f"valid: {list(valid)}")
  if codes.ndim != 2 or codes.shape[1] < n:
    raise ValueError(f"codes must be (B, >= {n}) ints, got shape {codes.shape}")
  if codes.shape[1] < config.num_tokens:  # the decoder reads only the first n latents
    codes = jnp.pad(codes, ((0, 0), (0, config.num_tokens - codes.shape[1])))
  size = image_size or detail.resolution_schedule(config).decoder_size(n)
  return _decode(tokenizer.params, codes, config, n, size)


def in_bfloat16(params: SamplerParams) -> SamplerParams:
  """params whose GPT computes in bfloat16 with its weight matrices stored in bfloat16 (norm
  scales stay float32; products accumulate in float32). Half the bytes per decoding step:
  on the CPUs of docs/performance.md, GPT-B sampling at batch 8 runs 1.46x faster, batch 1
  1.26x. Sampled codes can differ from float32 sampling's, as the logits differ in bfloat16's
  last bits. The tokenizer is unchanged. On a CPU without bfloat16 instructions (AVX2 only)
  it is slower than float32 (docs/performance.md)."""
  config = dataclasses.replace(params.gpt_config, dtype="bfloat16")
  weights = jax.tree_util.tree_map(
      lambda w: w.astype(jnp.bfloat16) if w.ndim >= 2 else w, params.gpt)
  return params.replace(gpt=weights, gpt_config=config)


def generate_codes(params: SamplerParams, labels, *, rng, cfg_scale=1.5, temperature=1.0,
                   top_k=0, top_p=1.0, gradual_cfg=False, num_tokens=None):
  """Group-parallel sampling of code sequences (B, num_tokens); see sampling.generate_codes."""
  return sampling.generate_codes(
      params.gpt, params.gpt_config, labels, rng=rng, cfg_scale=cfg_scale,
      temperature=temperature, top_k=top_k, top_p=top_p, gradual_cfg=gradual_cfg,
      num_tokens=num_tokens)


def sample(params: SamplerParams, labels, *, rng, cfg_scale=1.5, temperature=1.0, top_k=0,
           top_p=1.0, gradual_cfg=False, num_tokens=None, image_size=None):
  """Class-conditional images (B, d, d, 3) in [-1, 1]: sample codes, decode them. Fewer
  tokens stop sampling early and give a smaller image at R(num_tokens).

  image_size S (one of supported_image_sizes(params.tokenizer.config)): sample the codes of
  an S x S image (token_count_for_size(S) of them unless num_tokens is given) and decode them
  at S. An unsupported S is a ValueError listing the supported sizes."""
  if image_size is not None and num_tokens is None:
    num_tokens = token_count_for_size(params.tokenizer.config, image_size)
  elif image_size is not None:
    check_image_size(params.tokenizer.config, image_size)
  codes = generate_codes(params, labels, rng=rng, cfg_scale=cfg_scale, temperature=temperature,
                         top_k=top_k, top_p=top_p, gradual_cfg=gradual_cfg, num_tokens=num_tokens)
  images = decode(params.tokenizer, codes, num_tokens=codes.shape[1], image_size=image_size)
  return jnp.clip(images, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Preview:
  """One stage of `sample_progressive`: the images decoded from the first `num_tokens` codes.

  images: (B, d, d, 3) float32 in [-1, 1], d = decoder_size; resolution: R(n), the content
  resolution those codes carry (the image is R(n) detail upsampled to d); codes: (B, n) int32;
  final: the last stage, equal to `sample(...)` with the same arguments."""
  num_tokens: int
  resolution: int
  decoder_size: int
  images: jax.Array
  codes: jax.Array
  final: bool


def sample_progressive(params: SamplerParams, labels, *, rng, cfg_scale=1.5, temperature=1.0,
                       top_k=0, top_p=1.0, gradual_cfg=False, num_tokens=None,
                       image_size=None) -> Iterator[Preview]:
  """`sample`, yielding a Preview after every causal token and every group: the images decoded
  from the codes so far, at R(n), coarse to fine. The last one equals `sample` with the same
  key, bit for bit. Sampling runs one compiled step per next() (sampling.generate_codes_stepwise)
  and each stage is decoded as it comes, so a caller can show the image sharpen while it is
  generated. image_size: the output size (None: the tokenizer's), as in `sample`: the last stage
  is decoded at it, from token_count_for_size(image_size) codes unless num_tokens is given; the
  supported sizes are `supported_image_sizes(params.tokenizer.config)`. Arguments are checked
  before the first stage.
  """
  config = params.tokenizer.config
  check_image_size(config, image_size)
  if image_size is not None and num_tokens is None:
    num_tokens = token_count_for_size(config, image_size)
  stages = sampling.generate_codes_stepwise(
      params.gpt, params.gpt_config, labels, rng=rng, cfg_scale=cfg_scale,
      temperature=temperature, top_k=top_k, top_p=top_p, gradual_cfg=gradual_cfg,
      num_tokens=num_tokens)
  last = params.gpt_config.block_size if num_tokens is None else int(num_tokens)
  return _previews(params.tokenizer, stages, last, image_size)


def _previews(tokenizer, stages, last, image_size):
  schedule = detail.resolution_schedule(tokenizer.config)
  for n, codes in stages:
    size = image_size if n == last else None   # the last stage as `sample` decodes it
    images = jnp.clip(decode(tokenizer, codes, num_tokens=n, image_size=size), -1.0, 1.0)
    yield Preview(num_tokens=n, resolution=schedule.content_resolution(n),
                  decoder_size=images.shape[1], images=images, codes=codes, final=n == last)
