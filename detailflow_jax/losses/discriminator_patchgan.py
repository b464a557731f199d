"""A PatchGAN discriminator trained from scratch (no pretrained weights).

Design of the reference's `discriminator_patchgan.py` (taming-transformers' NLayerDiscriminator,
itself pix2pix's): 4x4 convs, stride 2 then stride 1, channels doubling up to 8x, BatchNorm (no
conv bias before it), LeakyReLU(0.2), a final 4x4 conv to one logit per patch; conv weights
N(0, 0.02), BatchNorm scales N(1, 0.02). Spectral norm on every conv is optional.

One change: the input is first resized to a fixed `input_size` ('area' down / 'bicubic' up),
because DetailFlow's reconstructions come at many sizes down to 16 px, where the 5 convs of the
default 3-layer net would leave no pixels; the DINO discriminator does the same at 224.

A convolution whose output map is smaller than its kernel (the last two convs at a 32 px input:
4 -> 3 and 3 -> 2 pixels) runs as one matmul over its kernel taps (small_map_conv.py): XLA:CPU's
slow path for such a conv's input gradient made the tiny tokenizer's step with the GAN 4.43 s
against 0.21 s without it; 0.39 s now.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.losses import image_resize
from detailflow_jax.losses.small_map_conv import small_map_conv


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def patchgan_output_size(input_size, num_layers):
  """Side of the logit map: num_layers stride-2 convs then two stride-1 4x4 convs (pad 1)."""
  size = input_size
  for _ in range(num_layers):
    size = (size + 2 - 4) // 2 + 1
  return size - 2


class PatchGANDiscriminator(nn.Module):
  """Logits (B, S*S) for NHWC images in [-1, 1]; S = patchgan_output_size(input_size, layers)."""
  input_size: int
  channels: int = 64
  num_layers: int = 3
  spectral_norm: bool = False

  def _conv(self, features, stride, use_bias, name, input_side):
    output_side = (input_side + 2 - 4) // stride + 1
    conv = nn.Conv(features, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=use_bias,
                   kernel_init=nn.initializers.normal(0.02), name=name,
                   conv_general_dilated=small_map_conv if output_side < 4 else None)
    return nn.SpectralNorm(conv, name=f"{name}_sn") if self.spectral_norm else conv

  def _apply_conv(self, conv, x, train):
    return conv(x, update_stats=train) if self.spectral_norm else conv(x)

  def _norm(self, x, train, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        scale_init=_bn_scale_init, name=name)(x)

  @nn.compact
  def __call__(self, images, train=True, rng=None):
    del rng  # deterministic; the argument keeps one calling convention for all discriminators
    if patchgan_output_size(self.input_size, self.num_layers) < 1:
      raise ValueError(f"input_size={self.input_size} is too small for a {self.num_layers}-layer "
                       f"PatchGAN; use at least {2 ** (self.num_layers + 2)}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC RGB, got shape {images.shape}")
    x = image_resize.torch_resize(images.astype(jnp.float32), self.input_size, self.input_size)
    x = self._apply_conv(self._conv(self.channels, 2, True, "conv_0", x.shape[1]), x, train)
    x = nn.leaky_relu(x, 0.2)
    mult = 1
    for n in range(1, self.num_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      x = self._apply_conv(self._conv(self.channels * mult, stride, False, f"conv_{n}", x.shape[1]),
                           x, train)
      x = nn.leaky_relu(self._norm(x, train, f"norm_{n}"), 0.2)
    x = self._apply_conv(self._conv(1, 1, True, "to_logit", x.shape[1]), x, train)
    return x.reshape(x.shape[0], -1)
