"""Splitting a CPU host into several JAX devices (the config field `cpu_devices`).

XLA:CPU runs one program's ops one after another and spreads each op over every core. The tiny
models' ops are small (96-wide layers, 96-token attention at batch 32), too small to keep two
cores busy: most of their time goes to handing out and waiting for the work of single ops. Run as
two devices instead, each with half of every batch (the data axis of the mesh, as on a GPU
host), the host executes two streams of ops at once: the tiny tokenizer's and the tiny GPT's
train steps take 1.3x less time on 2 cores. GPT-B, whose matmuls already fill the cores, is 8%
slower that way (docs/performance.md), so this is a per-config choice and 1 (JAX's own default)
everywhere but the tiny configs.

It only changes the CPU client: on a GPU or TPU host jobs still run on the accelerators.
"""
import os

import jax
from absl import logging

FORCED_COUNT_FLAG = "xla_force_host_platform_device_count"


def configure(num_devices):
  """Makes the CPU backend `num_devices` devices. Must run before JAX starts its backends.

  1 (or None) leaves JAX's default of one CPU device. A device count already forced through
  XLA_FLAGS (as the multi-device tests do) is left as it is.
  """
  if num_devices is None:
    return
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"cpu_devices={num_devices!r} must be a positive integer (1: one CPU device, "
                     "JAX's default)")
  if num_devices == 1:
    return
  if FORCED_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    logging.info("cpu_devices=%d not applied: XLA_FLAGS already sets --%s", num_devices,
                 FORCED_COUNT_FLAG)
    return
  try:
    jax.config.update("jax_num_cpu_devices", num_devices)
  except Exception as error:  # JAX refuses once a backend has started
    raise RuntimeError(f"cpu_devices={num_devices} must be set before JAX starts its backends "
                       f"(call host_devices.configure first): {error}") from None
