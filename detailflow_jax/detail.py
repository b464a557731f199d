"""The paper's coarse-to-fine structure as pure functions: attention masks, R(n), prefix sampling.

Masks use the JAX convention True = may attend (the official tokenizer mask uses True = blocked;
its GPT mask uses True = may attend).
"""
import dataclasses
import functools
import math

import numpy as np


# Values of the tokenizer config's `latent_mask` (the latent-to-latent block of the encoder mask).
LATENT_MASKS = ("group_causal", "bidirectional")


def encoder_attention_mask(num_patches, num_latents, group_size, causal_num,
                           latent_mask="group_causal"):
  """Mask of the tokenizer encoder over [patch tokens; latent tokens], True = may attend.

  Patches see only patches. Latents see every patch. Among latents ("group_causal", the paper),
  the first `causal_num` are token-causal (groups of `group_size` that only see themselves and
  earlier tokens); every later group sees its whole own group and all earlier latents.
  "bidirectional" (an ablation, not the paper): every latent sees every latent, so token i also
  depends on the queries after it; only the latent-to-latent block differs.
  """
  if latent_mask not in LATENT_MASKS:
    raise ValueError(f"latent_mask={latent_mask!r} must be one of {LATENT_MASKS}")
  if num_latents % group_size:
    raise ValueError(f"num_latents={num_latents} is not a multiple of group_size={group_size}")
  if causal_num % group_size:
    raise ValueError(f"causal_num={causal_num} is not a multiple of group_size={group_size}")
  p, m = num_patches, num_latents
  allowed = np.zeros((p + m, p + m), dtype=bool)
  allowed[:p, :p] = True
  allowed[p:, :p] = True
  if latent_mask == "bidirectional":
    allowed[p:, p:] = True
    return allowed
  latent = np.arange(m)
  # A later group sees up to the end of its own group; a causal-region token sees up to itself.
  group_end = (latent // group_size + 1) * group_size - 1
  visible_until = np.where(latent < causal_num, latent, group_end)
  allowed[p:, p:] = latent[None, :] <= visible_until[:, None]
  return allowed


def gpt_attention_mask(seq_len, group_size, causal_num):
  """Group-causal mask of the GPT over sequence positions (class token at 0), True = may attend.

  Row i < causal_num sees columns j <= i; row i >= causal_num sees every j with
  floor(j / g) <= floor(i / g).
  """
  i = np.arange(seq_len)[:, None]
  j = np.arange(seq_len)[None, :]
  return np.where(i < causal_num, j <= i, (j // group_size) <= (i // group_size))


# ---------------------------------------------------------------------------------------------
# R(n): how many pixels of content the first n tokens carry.
#
# Compiled variants: a tokenizer train step is specialised on the decoder OUTPUT size only
# (the decoder masks latents beyond n, so n itself is a traced value). A config therefore has
# `len(ResolutionSchedule.output_sizes())` shape variants, e.g. 14 for N=128 at 256 px.
# ---------------------------------------------------------------------------------------------


def token_list(num_tokens, group_size, causal_num):
  """Prefix lengths the model is trained/decoded at: 1..causal_num, then whole groups up to N."""
  _check_token_layout(num_tokens, group_size, causal_num)
  return list(range(1, causal_num + 1)) + list(
      range(causal_num + group_size, num_tokens + 1, group_size))


def content_resolution(n, image_size, num_tokens, power):
  """R(n) = S - b (N - n)^p with b = (S - 1) / (N - 1)^p, truncated to int, clipped to [1, S].

  Truncation (not rounding) and float64 `math.pow` follow the official tables bit for bit.
  """
  if not 1 <= n <= num_tokens:
    raise ValueError(f"n={n} must be in [1, num_tokens={num_tokens}]")
  if num_tokens == 1:
    return image_size
  slope = (image_size - 1) / math.pow(num_tokens - 1, power)
  side = int(image_size - slope * math.pow(num_tokens - n, power))
  return max(1, min(side, image_size))


def snap_to_patch(side, patch_size, max_side):
  """Square side a ViT with `patch_size` patches runs at for content of `side` pixels.

  Below one patch: one patch. Otherwise rounded UP to a multiple of the patch; if that square
  has more pixels than the largest grid (ceil(max_side / patch) patches a side), the side is
  scaled down to fit and rounded DOWN instead (the Qwen2-VL smart-resize rule, square case).
  """
  if side < patch_size:
    return patch_size
  max_pixels = (math.ceil(max_side / patch_size) * patch_size) ** 2
  snapped = math.ceil(side / patch_size) * patch_size
  if snapped * snapped > max_pixels:
    shrink = math.sqrt(side * side / max_pixels)
    snapped = math.floor(side / shrink / patch_size) * patch_size
  return snapped


def _check_token_layout(num_tokens, group_size, causal_num):
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be >= 1")
  if num_tokens < 1 or num_tokens % group_size:
    raise ValueError(f"num_tokens={num_tokens} must be a positive multiple of "
                     f"group_size={group_size}")
  if causal_num < group_size or causal_num % group_size or causal_num > num_tokens:
    raise ValueError(f"causal_num={causal_num} must be a multiple of group_size={group_size} "
                     f"in [{group_size}, num_tokens={num_tokens}]")


@dataclasses.dataclass(frozen=True)
class ResolutionSchedule:
  """Every table that ties a prefix length n to image sizes, for one tokenizer config.

  Tables are dicts keyed by n (or by a decoder side), in the official insertion order:
    token2res          n -> R(n), the content side (the target is area-downsampled to it)
    token2enc_res      n -> R(n) snapped to the encoder patch
    token2dec_res      n -> R(n) snapped to the decoder patch
    token2dec_out_res  n -> decoder output side: max(token2dec_res, min_decoder_size)
    decres2besttoken   decoder side -> n whose R(n) is closest to it (a tie goes to larger n)
    encres2besttoken   encoder side -> same, for the encoder snapping
    decres2mintoken / decres2maxtoken   decoder side -> smallest / largest n mapping to it
  best_res lists decres2besttoken's keys; best_token its values, sorted.
  """
  image_size: int
  num_tokens: int
  group_size: int
  causal_num: int
  power: float
  min_decoder_size: int
  encoder_patch_size: int
  decoder_patch_size: int
  token_list: tuple = dataclasses.field(init=False, compare=False)
  token2res: dict = dataclasses.field(init=False, repr=False, compare=False)
  token2enc_res: dict = dataclasses.field(init=False, repr=False, compare=False)
  token2dec_res: dict = dataclasses.field(init=False, repr=False, compare=False)
  token2dec_out_res: dict = dataclasses.field(init=False, repr=False, compare=False)
  decres2besttoken: dict = dataclasses.field(init=False, repr=False, compare=False)
  encres2besttoken: dict = dataclasses.field(init=False, repr=False, compare=False)
  decres2mintoken: dict = dataclasses.field(init=False, repr=False, compare=False)
  decres2maxtoken: dict = dataclasses.field(init=False, repr=False, compare=False)
  best_res: tuple = dataclasses.field(init=False, repr=False, compare=False)
  best_token: tuple = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    self._validate()
    tokens = token_list(self.num_tokens, self.group_size, self.causal_num)
    token2res, token2enc, token2dec = {}, {}, {}
    best = {"dec": {}, "enc": {}}
    best_gap = {"dec": {}, "enc": {}}
    dec_min, dec_max = {}, {}
    for n in tokens:
      res = self.content_resolution(n)
      enc = snap_to_patch(res, self.encoder_patch_size, self.image_size)
      dec = snap_to_patch(res, self.decoder_patch_size, self.image_size)
      token2res[n], token2enc[n], token2dec[n] = res, enc, dec
      for kind, side in (("dec", dec), ("enc", enc)):
        # `<=` while scanning n upward: on a tie the larger n wins, as in the reference.
        if abs(res - side) <= best_gap[kind].get(side, self.image_size):
          best[kind][side] = n
          best_gap[kind][side] = abs(res - side)
      dec_min[dec] = min(dec_min.get(dec, self.num_tokens), n)
      dec_max[dec] = max(dec_max.get(dec, 1), n)
    fields = dict(
        token_list=tuple(tokens), token2res=token2res, token2enc_res=token2enc,
        token2dec_res=token2dec,
        token2dec_out_res={n: max(d, self.min_decoder_size) for n, d in token2dec.items()},
        decres2besttoken=best["dec"], encres2besttoken=best["enc"],
        decres2mintoken=dec_min, decres2maxtoken=dec_max,
        best_res=tuple(best["dec"]), best_token=tuple(sorted(best["dec"].values())))
    for name, value in fields.items():
      object.__setattr__(self, name, value)  # frozen dataclass: derived fields set once here

  def _validate(self):
    _check_token_layout(self.num_tokens, self.group_size, self.causal_num)
    for name in ("image_size", "min_decoder_size", "encoder_patch_size", "decoder_patch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.power <= 0:
      raise ValueError(f"degradation_power={self.power} must be > 0")
    if self.encoder_patch_size > self.decoder_patch_size:
      raise ValueError(f"encoder patch_size={self.encoder_patch_size} must be <= decoder "
                       f"patch_size={self.decoder_patch_size}")
    for name in ("encoder_patch_size", "decoder_patch_size"):
      if self.min_decoder_size % getattr(self, name):
        raise ValueError(f"min_decoder_size={self.min_decoder_size} must be a multiple of the "
                         f"{name.split('_')[0]} patch_size={getattr(self, name)}")
    if self.image_size % self.decoder_patch_size:
      raise ValueError(f"image_size={self.image_size} must be a multiple of the decoder "
                       f"patch_size={self.decoder_patch_size}")

  def content_resolution(self, n):
    """R(n): side of the content the first n tokens carry (target area-downsampled to it)."""
    return content_resolution(n, self.image_size, self.num_tokens, self.power)

  def decoder_size(self, n):
    """Side of the decoder's output image for a prefix of n tokens (any n in [1, N])."""
    if n in self.token2dec_out_res:
      return self.token2dec_out_res[n]
    side = snap_to_patch(self.content_resolution(n), self.decoder_patch_size, self.image_size)
    return max(side, self.min_decoder_size)

  def output_sizes(self):
    """Distinct decoder output sides over token_list, ascending: one compiled variant each."""
    return tuple(sorted(set(self.token2dec_out_res.values())))


def resolution_schedule(tokenizer_cfg):
  """The ResolutionSchedule of a `tokenizer` config section (config.defaults layout).

  The one way from a config to R(n) and the decoder sizes: the data pipeline, the trainer, code
  extraction, the evaluation and sampling jobs and the public API all call this, and the tables
  are built once per distinct schedule and shared (the result is frozen and hashable).
  """
  return _cached_schedule(
      image_size=tokenizer_cfg.image_size, num_tokens=tokenizer_cfg.num_tokens,
      group_size=tokenizer_cfg.group_size, causal_num=tokenizer_cfg.causal_num,
      power=tokenizer_cfg.degradation_power, min_decoder_size=tokenizer_cfg.min_decoder_size,
      encoder_patch_size=tokenizer_cfg.encoder.patch_size,
      decoder_patch_size=tokenizer_cfg.decoder.patch_size)


@functools.lru_cache(maxsize=None)
def _cached_schedule(**fields):
  return ResolutionSchedule(**fields)


# ---------------------------------------------------------------------------------------------
# Per-batch draws of the official tokenizer training (one n and one noise position per batch).
# ---------------------------------------------------------------------------------------------


def sample_prefix_length(rng, num_tokens, group_size, causal_num, degrade_prob):
  """Draws the prefix length n the decoder sees for one training batch.

  With probability 1 - degrade_prob: n = N (full detail). Otherwise u ~ U{1..N-g}; u stays as
  is inside the token-causal region (u <= causal_num), else it is rounded UP to whole groups.
  So n is never N on the degraded branch, and every n is in token_list.
  """
  _check_token_layout(num_tokens, group_size, causal_num)
  if not 0.0 <= degrade_prob <= 1.0:
    raise ValueError(f"degrade_prob={degrade_prob} must be in [0, 1]")
  if rng.random() >= degrade_prob:
    return num_tokens
  if num_tokens < group_size + causal_num:
    raise ValueError(f"degrading needs num_tokens={num_tokens} >= group_size={group_size} + "
                     f"causal_num={causal_num}; set degrade_prob=0 or use more tokens")
  n = int(rng.integers(1, num_tokens - group_size + 1))
  if n > causal_num:
    n = -(-n // group_size) * group_size
  return n


def sample_noise_position(rng, n, group_size, causal_num, prob):
  """Draws where self-correction noise starts for a prefix of n tokens; -1 means no noise.

  No noise when n == 1 or with probability 1 - prob. Otherwise q ~ U{0..n-1} if n <= causal_num,
  else q ~ U{0..n-g-1} (so the last group is never noised); a q past the token-causal region is
  moved to the start of its group, because there a whole group is noised together.
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob={prob} must be in [0, 1]")
  if n < 1:
    raise ValueError(f"n={n} must be >= 1")
  if n > causal_num and (n % group_size or n < causal_num + group_size):
    raise ValueError(f"n={n} is not a prefix length of token_list: above causal_num="
                     f"{causal_num} it must be a multiple of group_size={group_size}")
  if n == 1 or rng.random() >= prob:
    return -1
  upper = n if n <= causal_num else n - group_size
  position = int(rng.integers(0, upper))
  if position >= causal_num:
    position = position // group_size * group_size
  return position


def noise_span_end(position, group_size, causal_num):
  """One past the last noised token: a single token in the causal region, else a whole group."""
  if position < 0:
    raise ValueError(f"position={position} must be >= 0 (-1 means no noise: nothing to end)")
  return position + 1 if position < causal_num else position + group_size
