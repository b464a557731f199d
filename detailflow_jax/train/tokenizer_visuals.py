"""Periodic coarse-to-fine strips: each row is one image decoded from its first n tokens, for
every n in the token list (left to right), then the input. Each strip is a PNG in WORKDIR/images
and the image `reconstructions/coarse_to_fine` at its step in WORKDIR/tensorboard."""
import jax
import numpy as np
from jax.experimental import multihost_utils

from detailflow_jax import detail
from detailflow_jax import images as image_io
from detailflow_jax.data import pipeline
from detailflow_jax.train import metrics_writer

NUM_EXAMPLES = 8
TENSORBOARD_TAG = "reconstructions/coarse_to_fine"


def prefix_reconstructions(model, params, images, schedule):
  """{n: decoded images (B, d_n, d_n, 3)} for every n in the token list."""
  encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images)
  decode = jax.jit(
      lambda p, q, n, size: model.apply({"params": p}, q, n, size, method=model.decode),
      static_argnums=(2, 3))
  return {n: decode(params, encoded["quant"], n, schedule.decoder_size(n))
          for n in schedule.token_list}


class ReconstructionStrips:
  """Hook writing WORKDIR/images/strip_<step>.png (and the same image to TensorBoard) from a
  fixed batch of eval images."""

  def __init__(self, config, objective, workdir):
    self.config = config
    self.model = objective.model
    self.workdir = workdir
    self.schedule = detail.resolution_schedule(config.tokenizer)
    self._images = None

  def images(self):
    if self._images is None:
      batch = next(iter(pipeline.make_eval_iterator(
          self.config, self.config.data.eval_split, NUM_EXAMPLES)))
      self._images = np.asarray(batch["image"][:NUM_EXAMPLES])
    return self._images

  def __call__(self, step, state):
    params = state.params["tokenizer"]
    if jax.process_count() > 1:
      # With fsdp across hosts a param's shards live on other processes: every process joins
      # the gather (the hook runs on all of them), then only process 0 draws.
      params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
      return
    images = self.images()
    params = jax.device_get(params)
    recons = prefix_reconstructions(self.model, params, images, self.schedule)
    rows = []
    for i in range(images.shape[0]):
      row = [image_io.to_uint8(np.asarray(recons[n][i])) for n in self.schedule.token_list]
      rows.append(row + [image_io.to_uint8(images[i])])
    strip = image_io.coarse_to_fine_strip(rows, self.config.tokenizer.image_size)
    image_io.save_png(strip, f"{self.workdir}/images/strip_{step:07d}.png")
    metrics_writer.write_images(self.workdir, step, {TENSORBOARD_TAG: strip})
