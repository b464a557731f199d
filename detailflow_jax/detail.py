"""The paper's coarse-to-fine structure as pure functions: attention masks, R(n), prefix sampling.

Masks use the JAX convention True = may attend (the official tokenizer mask uses True = blocked;
its GPT mask uses True = may attend).
"""
import numpy as np


def encoder_attention_mask(num_patches, num_latents, group_size, causal_num):
  """Mask of the tokenizer encoder over [patch tokens; latent tokens], True = may attend.

  Patches see only patches. Latents see every patch. Among latents, the first `causal_num`
  are token-causal (groups of `group_size` that only see themselves and earlier tokens); every
  later group sees its whole own group and all earlier latents.
  """
  if num_latents % group_size:
    raise ValueError(f"num_latents={num_latents} is not a multiple of group_size={group_size}")
  if causal_num % group_size:
    raise ValueError(f"causal_num={causal_num} is not a multiple of group_size={group_size}")
  p, m = num_patches, num_latents
  allowed = np.zeros((p + m, p + m), dtype=bool)
  allowed[:p, :p] = True
  allowed[p:, :p] = True
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
