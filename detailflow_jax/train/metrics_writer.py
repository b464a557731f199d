"""Metric writing: TensorBoard event files, the full metrics in the log file, and one console
line per log step.

Console and log file: main.py sends every log record to WORKDIR/logs/ and shows on the console
only warnings and this package's own INFO lines. The full-precision metrics are logged with
FILE_ONLY, so they reach the log file and not the console, where ProgressLine prints the short
line (step/total, losses, steps/s, ETA) once.

clu's `metric_writers` (and `periodic_actions.ReportProgress`, which imports it) imports
TensorFlow when imported; see docs/dependencies.md. tensorboardX writes the same event files with
protobuf alone, so these writers keep clu's MetricWriter method names (write_scalars,
write_images, flush, close) without TensorFlow.
"""
import time

import jax
import numpy as np
from absl import logging

# logging `extra`: the record goes to the log file only (main.py's console filter drops it).
FILE_ONLY = {"file_only": True}


class LogFileWriter:
  """`[step] key=value, ...` at full precision into the log file, like clu's LoggingWriter."""

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step,
                 ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())),
                 extra=FILE_ONLY)

  def write_images(self, step, images):
    logging.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()},
                 extra=FILE_ONLY)

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
  """Log file + TensorBoard on process 0; nothing on other processes."""
  if jax.process_index() != 0:
    return MultiWriter([])
  return MultiWriter([LogFileWriter(), TensorboardWriter(f"{workdir}/tensorboard")])


def console_metrics(scalars):
  """The scalars worth a glance on the console: the losses (total first) and accuracy."""
  keys = sorted((k for k in scalars if "loss" in k or k == "accuracy"),
                key=lambda k: (k != "loss", "loss" not in k, k))
  return {k: scalars[k] for k in keys}


class ProgressLine:
  """Prints `step N/total  losses  steps/s  ETA` on process 0, one line per call.

  steps/s is the rate since the previous call; the ETA uses the rate since the first call, so
  neither the first call's compilation nor one slow interval (a checkpoint save) throws it off.
  """

  def __init__(self, total_steps, first_step=0):
    self.total = total_steps
    self.last_step = first_step
    self.last_time = time.perf_counter()
    self.first = None  # (step, time) of the first call

  def __call__(self, step, scalars):
    """Returns the steps/s since the previous call."""
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    if self.first is None:
      self.first = (step, now)
      mean_rate = rate
    else:
      mean_rate = (step - self.first[0]) / max(now - self.first[1], 1e-9)
    eta = (self.total - step) / mean_rate if mean_rate > 0 else float("inf")
    shown = "  ".join(f"{k}={float(v):.4g}" for k, v in console_metrics(scalars).items())
    if jax.process_index() == 0:
      print(f"step {step}/{self.total}  {shown}  {rate:.2f} steps/s  ETA {format_seconds(eta)}",
            flush=True)
    return rate


def format_seconds(seconds):
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
