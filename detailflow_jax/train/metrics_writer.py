"""Metric writing: TensorBoard event files, the full metrics in the log file, and one console
line per log step.

Console and log file: main.py sends every log record to WORKDIR/logs/ and shows on the console
only warnings and this package's own INFO lines. The full-precision metrics are logged with
FILE_ONLY, so they reach the log file and not the console, where ProgressLine prints the short
line (step/total, losses, steps/s, ETA) once.

clu's `metric_writers` (and `periodic_actions.ReportProgress`, which imports it) imports
TensorFlow when imported; see docs/dependencies.md. tensorboardX writes the same event files with
protobuf alone, so these writers keep clu's MetricWriter method names (write_scalars,
write_images, write_texts, flush, close) without TensorFlow.

One tensorboardX writer per log folder and process: the trainer's scalars, the strips hook's
images and the job's config text share it, in one event file. tensorboardX names a file by the
second and host only, so each writer also gets a suffix (process id, count): a later writer on
the same folder opens a new file instead of overwriting one.

tensorboardX writes on a thread: flush() does not wait for the events still queued; close() (and
the exit of the process) does. Readers that need every event close the writers first.
"""
import itertools
import json
import os
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

  def write_texts(self, step, texts):
    logging.info("[%d] texts: %s", step, sorted(texts), extra=FILE_ONLY)

  def flush(self):
    pass

  def close(self):
    pass


class TensorboardWriter:
  """TensorBoard event files under `logdir` (tensorboardX). Use tensorboard_writer(logdir), which
  shares one per folder."""

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.logdir = os.path.abspath(str(logdir))
    suffix = f".{os.getpid()}.{next(_WRITER_COUNT)}"
    self._writer = SummaryWriter(logdir=self.logdir, filename_suffix=suffix)

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), step)

  def write_images(self, step, images):
    """images: {tag: (H, W, C) or (N, H, W, C)}, uint8 or float in [0, 1]; N images are tiled
    into one picture (tensorboardX's grid, 8 per row)."""
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 3:
        self._writer.add_image(key, value, step, dataformats="HWC")
      else:
        self._writer.add_images(key, value, step, dataformats="NHWC")

  def write_texts(self, step, texts):
    """texts: {tag: markdown} (TensorBoard's text tab renders markdown, fenced code included)."""
    for key, value in texts.items():
      self._writer.add_text(key, str(value), step)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()
    if _TENSORBOARD_WRITERS.get(self.logdir) is self:
      del _TENSORBOARD_WRITERS[self.logdir]


_TENSORBOARD_WRITERS = {}  # absolute log folder -> its TensorboardWriter in this process
_WRITER_COUNT = itertools.count()


def tensorboard_writer(logdir):
  """The TensorboardWriter of `logdir`, opened on first use and shared after that."""
  logdir = os.path.abspath(str(logdir))
  if logdir not in _TENSORBOARD_WRITERS:
    _TENSORBOARD_WRITERS[logdir] = TensorboardWriter(logdir)
  return _TENSORBOARD_WRITERS[logdir]


def close_tensorboard_writers():
  """Closes every shared writer: their queued events are on disk when this returns."""
  for writer in list(_TENSORBOARD_WRITERS.values()):
    writer.close()


class MultiWriter:
  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_texts(self, step, texts):
    for w in self.writers:
      w.write_texts(step, texts)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create_writer(workdir, run=""):
  """Log file + TensorBoard (WORKDIR/tensorboard, or its subfolder `run`: another run in
  TensorBoard's run selector) on process 0; nothing on other processes."""
  if jax.process_index() != 0:
    return MultiWriter([])
  logdir = os.path.join(str(workdir), "tensorboard", run)
  return MultiWriter([LogFileWriter(), tensorboard_writer(logdir)])


CONFIG_TAG = "config"


def config_markdown(config):
  """The config as JSON in a fenced markdown block (TensorBoard's text tab keeps the layout)."""
  if hasattr(config, "to_json_best_effort"):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
  else:
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
  return f"```json\n{text}\n```"


def write_config(workdir, config, step=0, run=""):
  """The run config as the `config` text of WORKDIR/tensorboard (process 0), flushed."""
  writer = create_writer(workdir, run)
  writer.write_texts(step, {CONFIG_TAG: config_markdown(config)})
  writer.flush()


# TensorBoard's image tab shows a picture at its own size: larger ones (an ImageNet sample grid
# has a row per class) are shrunk by a whole factor to at most this side; the PNG files keep all.
MAX_IMAGE_SIDE = 4096


def shrink_to_side(image, max_side=MAX_IMAGE_SIDE):
  """uint8 (H, W, C) image averaged down by the smallest whole factor that fits max_side."""
  image = np.asarray(image)
  factor = -(-max(image.shape[:2]) // max_side)
  if factor <= 1:
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  reduced = np.asarray(Image.fromarray(image[..., 0] if squeeze else image).reduce(factor))
  return reduced[..., None] if squeeze else reduced


def write_images(workdir, step, images, run=""):
  """{tag: uint8 (H, W, C) image} into WORKDIR/tensorboard (process 0), flushed."""
  writer = create_writer(workdir, run)
  writer.write_images(step, {k: shrink_to_side(v) for k, v in images.items()})
  writer.flush()


def write_scalars(workdir, step, scalars, run=""):
  """{tag: number} into WORKDIR/tensorboard (process 0), flushed. None values are left out."""
  writer = create_writer(workdir, run)
  writer.write_scalars(step, {k: v for k, v in scalars.items() if v is not None})
  writer.flush()


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
