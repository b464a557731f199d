"""The FID Inception-v3 (TensorFlow graph of 2015-12-05) in flax.linen.

This is the network behind TTUR/pytorch-fid FID and the ADM evaluator (FID, sFID, precision,
recall), not torchvision's ImageNet Inception: its pooling quirks are kept because the features
depend on them (3x3 average pools that exclude padding, a max pool in the last block's pool
branch, batch norm without scale, eps 1e-3).

Inputs are uint8-range NHWC images of any size. As in the TF graph the ADM evaluator feeds, they
are resized to 299x299 with TF1's legacy bilinear resize (source pixel = output pixel * in/out,
no half-pixel shift, edge clamped) and mapped to (x - 128) / 128.

Outputs: `pool` (pool_3, 2048-d) for FID / precision / recall, and `spatial`: the first 7
channels of mixed_6/conv (the 1x1 branch of the third 17x17 block, after its ReLU), flattened in
HWC order to 17*17*7 = 2023 values, as ADM's sFID. The weight file carries no classifier head,
so there are no logits and no Inception Score.

Params are one plain pytree (conv kernels HWIO plus batch-norm beta/mean/var): the network is
frozen, so the BN statistics need no separate collection. They come from the published file
through inception_weights (converter and `load_inception`), which depends on this module
for the expected shapes; this module depends on no weight file format.
"""
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BATCH_NORM_EPS = 1e-3


class InceptionOutputs(NamedTuple):
  pool: jax.Array     # [batch, 2048]
  spatial: jax.Array  # [batch, 2023]


def legacy_bilinear_matrix(in_size, out_size):
  """[out, in] interpolation matrix of TF1 ResizeBilinear(align_corners=False, no half pixel).

  Source coordinate i * in / out (float32, as TF), lower neighbour floor, upper one clamped to
  the last pixel. A matrix keeps the resize exact and static-shaped under jit.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.arange(out_size, dtype=np.float32) * scale
  low = np.floor(source).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  frac = (source - low).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix


def preprocess(images, precision=jax.lax.Precision.HIGHEST):
  """uint8-range NHWC images (1 or 3 channels, any size) -> float32 [B, 299, 299, 3] in [-1, 1)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [batch, height, width, 1 or 3] in [0, 255], got shape "
                     f"{images.shape}")
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))  # grayscale as RGB, as PIL's convert("RGB")
  height, width = x.shape[1:3]
  if (height, width) != (INPUT_SIZE, INPUT_SIZE):
    rows = jnp.asarray(legacy_bilinear_matrix(height, INPUT_SIZE))
    cols = jnp.asarray(legacy_bilinear_matrix(width, INPUT_SIZE))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=precision)
    x = jnp.einsum("pw,bowc->bopc", cols, x, precision=precision)
  return (x - 128.0) / 128.0


class ConvBN(nn.Module):
  """Bias-free conv, batch norm with beta only (TF's scale_after_normalization=False), ReLU."""
  features: int
  kernel_size: tuple
  strides: int = 1
  padding: str = "SAME"  # TF padding; SAME at stride 1 is symmetric (k - 1) // 2
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    if tuple(self.kernel_size) == (1, 1) and self.strides == 1:
      # A 1x1 conv is a matmul over channels: the same sums, and XLA:CPU runs a matmul faster
      # than its convolution (benchmarks/inception.py).
      y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0].astype(x.dtype), precision=self.precision)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel.astype(x.dtype), (self.strides, self.strides), self.padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = (y - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) + beta
    return nn.relu(y)


def _avg_pool_3x3(x):
  # TF's SAME average pool divides by the number of real (unpadded) pixels.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ... (optionally after a 3x3 average pool)."""
  layers: tuple  # ((features, kernel_size, strides, padding), ...)
  pool_first: bool = False
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, strides, padding) in enumerate(self.layers):
      name = "conv" if i == 0 else f"conv_{i}"
      x = ConvBN(features, kernel, strides, padding, self.precision, name=name)(x)
    return x


def _conv(features, kernel=(1, 1), strides=1, padding="SAME"):
  return (features, kernel, strides, padding)


class InceptionA(nn.Module):  # 35x35 blocks: mixed, mixed_1, mixed_2
  pool_features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, (1, 1), precision=p, name="conv")(x),
        Tower((_conv(48), _conv(64, (5, 5))), precision=p, name="tower")(x),
        Tower((_conv(64), _conv(96, (3, 3)), _conv(96, (3, 3))), precision=p, name="tower_1")(x),
        Tower((_conv(self.pool_features),), pool_first=True, precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):  # 35 -> 17 reduction: mixed_3
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, "VALID", precision=p, name="conv")(x),
        Tower((_conv(64), _conv(96, (3, 3)), _conv(96, (3, 3), 2, "VALID")), precision=p,
              name="tower")(x),
        _max_pool_3x3_stride2(x),
    ], axis=-1)


class InceptionC(nn.Module):  # 17x17 blocks: mixed_4 .. mixed_7
  channels_7x7: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
  also_return_1x1: bool = False  # mixed_6's 1x1 branch is ADM's sFID layer ("mixed_6/conv")

  @nn.compact
  def __call__(self, x):
    p, c = self.precision, self.channels_7x7
    branch_1x1 = ConvBN(192, (1, 1), precision=p, name="conv")(x)
    towers = [
        Tower((_conv(c), _conv(c, (1, 7)), _conv(192, (7, 1))), precision=p, name="tower")(x),
        Tower((_conv(c), _conv(c, (7, 1)), _conv(c, (1, 7)), _conv(c, (7, 1)),
               _conv(192, (1, 7))), precision=p, name="tower_1")(x),
        Tower((_conv(192),), pool_first=True, precision=p, name="tower_2")(x),
    ]
    out = jnp.concatenate([branch_1x1] + towers, axis=-1)
    return (out, branch_1x1) if self.also_return_1x1 else out


class InceptionD(nn.Module):  # 17 -> 8 reduction: mixed_8
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        Tower((_conv(192), _conv(320, (3, 3), 2, "VALID")), precision=p, name="tower")(x),
        Tower((_conv(192), _conv(192, (1, 7)), _conv(192, (7, 1)),
               _conv(192, (3, 3), 2, "VALID")), precision=p, name="tower_1")(x),
        _max_pool_3x3_stride2(x),
    ], axis=-1)


class InceptionE(nn.Module):  # 8x8 blocks: mixed_9 (average pool branch), mixed_10 (max pool)
  max_pool_branch: bool
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    a = conv(384, (1, 1), name="tower_conv")(x)
    b = conv(448, (1, 1), name="tower_1_conv")(x)
    b = conv(384, (3, 3), name="tower_1_conv_1")(b)
    if self.max_pool_branch:  # the FID graph's quirk: the last block pools with max
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    return jnp.concatenate([
        conv(320, (1, 1), name="conv")(x),
        conv(384, (1, 3), name="tower_mixed_conv")(a),
        conv(384, (3, 1), name="tower_mixed_conv_1")(a),
        conv(384, (1, 3), name="tower_1_mixed_conv")(b),
        conv(384, (3, 1), name="tower_1_mixed_conv_1")(b),
        conv(192, (1, 1), name="tower_2_conv")(pooled),
    ], axis=-1)


class InceptionV3FID(nn.Module):
  """uint8-range NHWC images -> InceptionOutputs(pool [B, 2048], spatial [B, 2023])."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    p = self.precision
    x = preprocess(images, p)
    x = ConvBN(32, (3, 3), 2, "VALID", p, name="conv")(x)      # 149
    x = ConvBN(32, (3, 3), 1, "VALID", p, name="conv_1")(x)    # 147
    x = ConvBN(64, (3, 3), 1, "SAME", p, name="conv_2")(x)     # 147
    x = _max_pool_3x3_stride2(x)                               # 73
    x = ConvBN(80, (1, 1), 1, "VALID", p, name="conv_3")(x)
    x = ConvBN(192, (3, 3), 1, "VALID", p, name="conv_4")(x)   # 71
    x = _max_pool_3x3_stride2(x)                               # 35
    x = InceptionA(32, p, name="mixed")(x)
    x = InceptionA(64, p, name="mixed_1")(x)
    x = InceptionA(64, p, name="mixed_2")(x)
    x = InceptionB(p, name="mixed_3")(x)                       # 17
    x = InceptionC(128, p, name="mixed_4")(x)
    x = InceptionC(160, p, name="mixed_5")(x)
    x, mixed_6_conv = InceptionC(160, p, also_return_1x1=True, name="mixed_6")(x)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]              # [B, 17, 17, 7]
    x = InceptionC(192, p, name="mixed_7")(x)
    x = InceptionD(p, name="mixed_8")(x)                       # 8
    x = InceptionE(False, p, name="mixed_9")(x)
    x = InceptionE(True, p, name="mixed_10")(x)
    pool = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 average pool, VALID
    return InceptionOutputs(pool, spatial.reshape(spatial.shape[0], -1))


def inception_features(params, images, precision=jax.lax.Precision.HIGHEST):
  """Pure function: params (load_inception) and uint8-range NHWC images -> InceptionOutputs."""
  return InceptionV3FID(precision).apply({"params": params}, images)


def compiler_options():
  """Options for jax.jit of a function that runs this network.

  On CPU: no YNNPACK fusions, so XLA runs the convolutions with its Eigen kernels. With jax
  0.10's default (YNNPACK convolutions) the 3x3 convolutions of the stem (32 -> 32 channels at
  147 px, 80 -> 192 at 71 px) run at a quarter of the machine's matmul rate; Eigen's take the
  whole network from 0.133 to about 0.09 s per image on two cores (benchmarks/inception.py,
  docs/performance.md). Other backends: no options.
  """
  if jax.default_backend() != "cpu":
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=1)
def param_shapes():
  """{'mixed_6/conv/kernel': shape} of the module, without computing anything."""
  variables = jax.eval_shape(InceptionV3FID().init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
