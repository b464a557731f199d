"""First-token alignment loss: the first quantised token predicts the image's SigLIP2 embedding.

Reference (`global_token_proj` in the official tokenizer):
  L_align = mean_b -cos(MLP(z1_b), mean_tokens SigLIP2(x_b))
with MLP 8 -> 1024 -> 1024 -> 1152 (SiLU between), z1 the quantised first token of the clean
sequence, and the SigLIP2 so400m features of the full-resolution input (see models/siglip2.py).
The config weight (loss.align_weight) is applied by the caller.
"""
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Official nn.Sequential indices of the three Linear layers (1 and 3 are the SiLUs).
_LAYER_INDICES = (0, 2, 4)
OFFICIAL_PREFIX = "global_token_proj."


class AlignmentMLP(nn.Module):
  """Dense(hidden) -> SiLU -> Dense(hidden) -> SiLU -> Dense(out). Layers are named
  `layers_0`, `layers_2`, `layers_4` after the official Sequential indices."""
  hidden_dim: int = 1024
  out_dim: int = 1152

  @nn.compact
  def __call__(self, x):
    # PyTorch Linear default init: U(+-1/sqrt(fan_in)) for weight and bias.
    # Logical axes: a Megatron pair (column- then row-parallel), then a replicated output.
    def dense(features, fan_in, names, name):
      bound = 1.0 / np.sqrt(fan_in)
      init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
      return nn.Dense(features, kernel_init=nn.with_logical_partitioning(init, names),
                      bias_init=nn.with_logical_partitioning(init, names[1:]), name=name)
    x = jax.nn.silu(dense(self.hidden_dim, x.shape[-1], ("codebook_dim", "mlp"), "layers_0")(x))
    x = jax.nn.silu(dense(self.hidden_dim, self.hidden_dim, ("mlp", "embed"), "layers_2")(x))
    return dense(self.out_dim, self.hidden_dim, ("embed", "features"), "layers_4")(x)


def init_alignment_mlp(rng, codebook_dim=8, hidden_dim=1024, out_dim=1152):
  """(module, params) for the alignment MLP; params is the bare tree (no 'params' wrapper)."""
  module = AlignmentMLP(hidden_dim, out_dim)
  # Non-partitionable threefry: XLA:CPU compiles the partitionable one several times slower.
  with jax.threefry_partitionable(False):
    params = jax.jit(module.init)(rng, jnp.zeros((1, codebook_dim), jnp.float32))["params"]
  return module, nn.unbox(params)


def alignment_mlp_logical_axes(codebook_dim=8, hidden_dim=1024, out_dim=1152):
  """The MLP params' logical axis names (PartitionSpecs, same tree as the params)."""
  abstract = jax.eval_shape(AlignmentMLP(hidden_dim, out_dim).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, codebook_dim), jnp.float32))
  return nn.get_partition_spec(abstract["params"])


def _normalize(x, eps=1e-12):
  # F.normalize: x / max(||x||, eps)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def alignment_target(siglip_features):
  """(B, L, D) SigLIP2 token features -> (B, D) mean over tokens."""
  return jnp.mean(siglip_features.astype(jnp.float32), axis=1)


def alignment_loss(mlp_params, first_token_quant, siglip_features):
  """-mean_b cos(MLP(z1_b), mean-pooled features_b).

  Args:
    mlp_params: AlignmentMLP params (bare tree, or {'params': tree}).
    first_token_quant: (B, codebook_dim) quantised first tokens of the clean sequence (a
      (B, N, codebook_dim) sequence is accepted: its first token is used).
    siglip_features: (B, L, D) features (gradients are stopped: the feature model is frozen),
      or an already pooled (B, D) target.
  """
  if first_token_quant.ndim == 3:
    first_token_quant = first_token_quant[:, 0]
  target = jax.lax.stop_gradient(siglip_features)
  target = alignment_target(target) if target.ndim == 3 else target.astype(jnp.float32)
  if target.shape[0] != first_token_quant.shape[0]:
    raise ValueError(f"batch sizes differ: first_token_quant {first_token_quant.shape}, "
                     f"siglip_features {siglip_features.shape}")
  params = mlp_params if "params" in mlp_params else {"params": mlp_params}
  hidden_dim = params["params"]["layers_0"]["kernel"].shape[-1]
  module = AlignmentMLP(hidden_dim, target.shape[-1])
  pred = module.apply(params, first_token_quant.astype(jnp.float32))
  cos = jnp.sum(_normalize(pred) * _normalize(target), axis=-1)
  return -jnp.mean(cos)


def alignment_mlp_params_from_state_dict(state_dict: Dict[str, np.ndarray],
                                         prefix: str = OFFICIAL_PREFIX):
  """Official `global_token_proj.{0,2,4}.{weight,bias}` -> AlignmentMLP params."""
  params = {}
  for i in _LAYER_INDICES:
    w, b = f"{prefix}{i}.weight", f"{prefix}{i}.bias"
    if w not in state_dict or b not in state_dict:
      raise ValueError(f"state dict is missing {w} / {b}")
    params[f"layers_{i}"] = {"kernel": np.asarray(state_dict[w]).T,
                             "bias": np.asarray(state_dict[b])}
  return params


def alignment_mlp_state_dict_from_params(params, prefix: str = OFFICIAL_PREFIX):
  """AlignmentMLP params -> official key names and PyTorch layouts."""
  params = params.get("params", params)
  out = {}
  for i in _LAYER_INDICES:
    layer = jax.device_get(params[f"layers_{i}"])
    out[f"{prefix}{i}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
    out[f"{prefix}{i}.bias"] = np.asarray(layer["bias"])
  return out
