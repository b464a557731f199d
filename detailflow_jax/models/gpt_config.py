"""Hyper-parameters of the DetailFlow GPT: GPTConfig and the LlamaGen sizes."""
import dataclasses

import jax.numpy as jnp

# LlamaGen sizes: (num_layers, dim, num_heads).
GPT_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (36, 1280, 20), "XXL": (48, 1536, 24)}


def ffn_hidden_size(dim, multiple_of=256):
  """SwiGLU width of the official FeedForward: int(2 * 4 * dim / 3) rounded up to `multiple_of`."""
  hidden = int(2 * (4 * dim) / 3)
  return -(-hidden // multiple_of) * multiple_of


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyper-parameters of the GPT. Frozen (hashable) so it can be a static jit argument."""
  vocab_size: int = 8192
  num_layers: int = 12
  dim: int = 768
  num_heads: int = 12
  num_classes: int = 1000
  block_size: int = 128          # N, codes per image
  group_size: int = 8            # g, codes predicted together
  causal_num: int = 8            # c, leading codes predicted one at a time
  cls_token_num: int = 1
  ffn_dim: int = 0               # 0: the official SwiGLU rounding of the width
  norm_eps: float = 1e-5
  rope_base: float = 10000.0
  # Element-wise dropout on the input embeddings, as the official tok_dropout (nn.Dropout; its
  # GroupDropout class is never used).
  token_dropout: float = 0.1
  resid_dropout: float = 0.1     # after the attention output projection
  ffn_dropout: float = 0.1       # after the SwiGLU output projection
  class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
  dtype: str = "float32"         # compute dtype; parameters stay float32
  # Random bits per element-wise dropout decision. 32: flax's nn.Dropout (a float32 uniform per
  # element). 16 or 8: two or four decisions from each 32-bit word, so half or a quarter of
  # the threefry hashing; the keep probability is rounded to a multiple of 2^-bits (0.9 ->
  # 0.89999 with 16 bits, 0.8984 with 8).
  dropout_bits: int = 32

  def __post_init__(self):
    def need(ok, message):
      if not ok:
        raise ValueError(message)
    need(self.dim % self.num_heads == 0,
         f"dim={self.dim} must be a multiple of num_heads={self.num_heads}")
    need(self.head_dim % 4 == 0,
         f"head_dim={self.head_dim} must be a multiple of 4 (2D rotary embedding)")
    need(self.group_size >= 1, f"group_size={self.group_size} must be >= 1")
    need(self.block_size % self.group_size == 0,
         f"block_size={self.block_size} must be a multiple of group_size={self.group_size}")
    need(self.causal_num > 0 and self.causal_num % self.group_size == 0,
         f"causal_num={self.causal_num} must be a positive multiple of group_size={self.group_size}")
    need(self.causal_num < self.block_size,
         f"causal_num={self.causal_num} must be < block_size={self.block_size}")
    need(self.cls_token_num == 1,
         f"cls_token_num={self.cls_token_num}: the class-conditional model uses one class token")
    need(self.dropout_bits in (8, 16, 32),
         f"dropout_bits={self.dropout_bits} must be 8, 16 or 32")
    need(self.dtype in ("float32", "bfloat16", "float16"),
         f"dtype={self.dtype!r} must be one of 'float32', 'bfloat16', 'float16'")

  @property
  def head_dim(self):
    return self.dim // self.num_heads

  @property
  def ffn_hidden(self):
    return self.ffn_dim or ffn_hidden_size(self.dim)

  @property
  def num_class_rows(self):
    # The official LabelEmbedder adds the null-class row only when label dropout is on.
    return self.num_classes + int(self.class_dropout_prob > 0)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_dict(cls, d):
    """From a dict / ConfigDict; unknown keys raise ValueError naming them."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown GPTConfig keys {unknown}; valid keys: {sorted(known)}")
    return cls(**d)

  def to_dict(self):
    return dataclasses.asdict(self)


def gpt_model_config(size, **overrides):
  """GPTConfig of a LlamaGen size ('B', 'L', 'XL', 'XXL') for DetailFlow-16 (N=128, g=c=8)."""
  key = size.upper().removeprefix("GPT-")
  if key not in GPT_SIZES:
    raise ValueError(f"size={size!r} is not one of {sorted(GPT_SIZES)}")
  layers, dim, heads = GPT_SIZES[key]
  return GPTConfig(**{"num_layers": layers, "dim": dim, "num_heads": heads, **overrides})


def sequence_length(num_codes, config):
  """Length of the model sequence holding class token + `num_codes` codes (+ specials)."""
  extra = config.group_size if num_codes >= config.causal_num else 1
  return num_codes + extra
