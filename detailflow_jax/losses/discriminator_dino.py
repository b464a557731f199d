"""The paper's discriminator: trainable 1D-conv heads on frozen DINO ViT-S/16 features.

Follows the reference (VAR's `DinoDisc`): the input in [-1, 1] is ImageNet-normalised, brought
to the backbone's 224x224 (a random 224 crop with probability 0.5 when both sides are larger and
an rng is given, else 'area' down / 'bicubic' up), and each of the 5 feature taps (embedding,
blocks 2, 5, 8, 11) feeds its own head:

  SN-Conv1d(k=1) -> BatchNorm -> LeakyReLU(0.2)
  residual: (x + [SN-Conv1d(k=9, circular) -> BatchNorm -> LeakyReLU(0.2)](x)) / sqrt(2)
  SN-Conv1d(C -> 1, k=1)

The 5 per-token logit maps are concatenated: (B, 5 * 196). BatchNorm uses batch statistics in
training (the reference's SyncBatchNorm in train mode; under jit over a sharded batch the
statistics are global too) and keeps running averages for eval. Spectral norm does one power
iteration per training call (u vectors live in `batch_stats`).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.losses import image_resize
from detailflow_jax.models import dino

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_PROB = 0.5


def _torch_conv_init(fan_in):
  """PyTorch's default Conv init: U(+-1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv1d(features, kernel_size, in_channels, spectral, name):
  conv = nn.Conv(features, (kernel_size,), padding="CIRCULAR",
                 kernel_init=_torch_conv_init(in_channels * kernel_size),
                 bias_init=_torch_conv_init(in_channels * kernel_size), name=name)
  return nn.SpectralNorm(conv, epsilon=1e-12, name=f"{name}_sn") if spectral else conv


class DinoHeadBlock(nn.Module):
  channels: int
  kernel_size: int
  norm_eps: float = 1e-6
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, x, train):
    conv = _conv1d(self.channels, self.kernel_size, self.channels, self.spectral_norm, "conv")
    x = conv(x, update_stats=train) if self.spectral_norm else conv(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.norm_eps,
                     use_fast_variance=False, name="norm")(x)
    return nn.leaky_relu(x, 0.2)


class DinoHead(nn.Module):
  channels: int
  kernel_size: int = 9
  norm_eps: float = 1e-6
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, x, train):
    x = DinoHeadBlock(self.channels, 1, self.norm_eps, self.spectral_norm,
                      name="block_k1")(x, train)
    y = DinoHeadBlock(self.channels, self.kernel_size, self.norm_eps, self.spectral_norm,
                      name="block_res")(x, train)
    x = (y + x) * (1.0 / np.sqrt(2.0))
    out = _conv1d(1, 1, self.channels, self.spectral_norm, "to_logit")
    x = out(x, update_stats=train) if self.spectral_norm else out(x)
    return x.reshape(x.shape[0], -1)


def to_backbone_input(images, side, rng=None):
  """[-1, 1] NHWC -> ImageNet-normalised (B, side, side, 3) as the reference prepares it."""
  x = images.astype(jnp.float32)
  x = x * (0.5 / IMAGENET_STD) + (0.5 - IMAGENET_MEAN) / IMAGENET_STD
  _, h, w, _ = x.shape
  resized = image_resize.torch_resize(x, side, side)
  if rng is None or not (h > side and w > side):
    return resized
  coin_rng, top_rng, left_rng = jax.random.split(rng, 3)
  top = jax.random.randint(top_rng, (), 0, h - side + 1)
  left = jax.random.randint(left_rng, (), 0, w - side + 1)
  cropped = jax.lax.dynamic_slice(x, (0, top, left, 0), (x.shape[0], side, side, 3))
  return jnp.where(jax.random.bernoulli(coin_rng, CROP_PROB), cropped, resized)


class DinoDiscriminator(nn.Module):
  """Logits (B, num_taps * grid^2) for NHWC images in [-1, 1] of any size.

  The backbone params sit under 'backbone' and are meant to stay frozen (see
  `discriminator.discriminator_apply`); the heads are 'heads_{i}'.
  """
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  grid: int = 14
  tap_depths: Sequence[int] = dino.DEFAULT_TAP_DEPTHS
  kernel_size: int = 9
  norm_eps: float = 1e-6
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, images, train=True, rng=None):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC RGB, got shape {images.shape}")
    x = to_backbone_input(images, self.grid * self.patch_size, rng)
    readouts = dino.DinoViT(self.width, self.depth, self.num_heads, self.patch_size, self.grid,
                            tuple(self.tap_depths), self.norm_eps, name="backbone")(x)
    logits = [DinoHead(self.width, self.kernel_size, self.norm_eps, self.spectral_norm,
                       name=f"heads_{i}")(r, train) for i, r in enumerate(readouts)]
    return jnp.concatenate(logits, axis=1)


def init_heads(module: DinoDiscriminator, rng):
  """Initial (params, batch_stats) of the heads alone, as `module` names them ('heads_{i}').

  Cheaper than module.init: the backbone (whose weights come from a file) is not traced.
  """
  num_taps = 1 + len([d for d in module.tap_depths if d < module.depth])
  probe = jnp.zeros((2, module.grid * module.grid, module.width), jnp.float32)
  head = DinoHead(module.width, module.kernel_size, module.norm_eps, module.spectral_norm)
  init = jax.jit(lambda r: head.init(r, probe, train=False))
  params, batch_stats = {}, {}
  for i, r in enumerate(jax.random.split(rng, num_taps)):
    variables = init(r)
    params[f"heads_{i}"] = variables["params"]
    batch_stats[f"heads_{i}"] = variables["batch_stats"]
  return params, batch_stats
