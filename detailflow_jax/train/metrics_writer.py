"""Metric writing: console lines plus TensorBoard event files, and a progress line.

clu's `metric_writers` package imports TensorFlow when imported (measured: +1.4 GB in the venv,
13.6 s to import), only to write event files. tensorboardX writes the same event files with
protobuf alone, so these writers keep clu's MetricWriter method names (write_scalars,
write_images, flush, close) without the TensorFlow import; see docs/dependencies.md.
"""
import time

import jax
import numpy as np
from absl import logging


class ConsoleWriter:
  """Logs `step | key=value ...` like clu's LoggingWriter."""

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())))

  def write_images(self, step, images):
    logging.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()})

  def flush(self):
    pass

  def close(self):
    pass


class TensorboardWriter:
  """TensorBoard event files under `logdir` (tensorboardX)."""

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir=str(logdir))

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), step)

  def write_images(self, step, images):
    for key, value in images.items():
      value = np.asarray(value)
      self._writer.add_images(key, value if value.ndim == 4 else value[None], step,
                              dataformats="NHWC")

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class MultiWriter:
  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create_writer(workdir):
  """Console + TensorBoard on process 0; nothing on other processes."""
  if jax.process_index() != 0:
    return MultiWriter([])
  return MultiWriter([ConsoleWriter(), TensorboardWriter(f"{workdir}/tensorboard")])


class ProgressLine:
  """Prints `step/total  losses  steps/s  ETA` (process 0 only)."""

  def __init__(self, total_steps, first_step=0):
    self.total = total_steps
    self.last_step = first_step
    self.last_time = time.perf_counter()

  def __call__(self, step, scalars):
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    shown = "  ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
    line = f"step {step}/{self.total}  {shown}  {rate:.2f} steps/s  ETA {format_seconds(eta)}"
    if jax.process_index() == 0:
      print(line, flush=True)
      logging.info(line)
    return rate


def format_seconds(seconds):
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
