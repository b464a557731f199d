"""Metric writers: clu's console writer plus TensorBoard event files, and a progress line.

clu's default TensorBoard writer imports TensorFlow (about 600 MB installed) only to write event
files; tensorboardX writes the same files with protobuf alone, so we wrap it in clu's
MetricWriter interface and keep TensorFlow out of the install (see docs/dependencies.md).
"""
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from clu.metric_writers import interface


class TensorboardXWriter(interface.MetricWriter):
  """clu MetricWriter writing TensorBoard event files with tensorboardX."""

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir=str(logdir))

  def write_summaries(self, step, values, metadata=None):
    for key, value in values.items():
      self._writer.add_scalar(key, float(np.asarray(value)), step)

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), step)

  def write_images(self, step, images):
    for key, value in images.items():
      value = np.asarray(value)
      self._writer.add_images(key, value if value.ndim == 4 else value[None], step, dataformats="NHWC")

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    for key, value in texts.items():
      self._writer.add_text(key, value, step)

  def write_histograms(self, step, arrays, num_buckets=None):
    for key, value in arrays.items():
      self._writer.add_histogram(key, np.asarray(value), step)

  def write_hparams(self, hparams):
    self._writer.add_text("hparams", str(dict(hparams)), 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def create_writer(workdir):
  """Console + TensorBoard on process 0; nothing on other processes."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.LoggingWriter(), TensorboardXWriter(f"{workdir}/tensorboard")])


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
