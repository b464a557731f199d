"""What the evaluation jobs share: trained models from workdirs (through workdir_io),
Inception features, real-image batches from the data sources, the device mesh, and result files
that carry their settings.
"""
import datetime
import json
import os
import pathlib
import sys

import jax
import numpy as np
from absl import logging

from detailflow_jax import workdir_io
from detailflow_jax.data import sources
from detailflow_jax.data import transforms
from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import inception_weights
from detailflow_jax.eval import inputs
from detailflow_jax.train import sharding


def check_single_process(job):
  # Metrics gather every image on one host; splitting the images over hosts would need every
  # accumulator all-gathered. One host with several devices is supported through the mesh.
  if jax.process_count() > 1:
    raise ValueError(f"{job} runs in a single process (it may use all of that host's devices); "
                     f"got {jax.process_count()} processes. Start it on one host only.")


def resolve_workdir(path, fallback, key):
  """`path` from the config key `key`, or `fallback` when it is empty; must be a directory."""
  chosen = path or fallback
  if not chosen or not os.path.isdir(chosen):
    raise ValueError(f"{key}={chosen!r} is not a directory; set --config.{key}=<trained workdir>")
  return os.path.abspath(chosen)


def _step(step):
  return None if step is None or step < 0 else int(step)


def load_tokenizer(workdir, step=-1, use_ema=False):
  """(tokenizer ConfigDict, numpy params, step) of a tokenizer workdir; step -1: the latest."""
  loaded = workdir_io.load_tokenizer(workdir, use_ema=use_ema, step=_step(step))
  logging.info("tokenizer from %s step %d (ema %s)", workdir, loaded.step, use_ema)
  return loaded.config, loaded.params, loaded.step


def load_gpt(workdir, step=-1, use_ema=True):
  """(GPTConfig, numpy params, step, the run's config) of an AR workdir; step -1: the latest."""
  loaded = workdir_io.load_gpt(workdir, use_ema=use_ema, step=_step(step))
  logging.info("GPT from %s step %d (ema %s)", workdir, loaded.step, use_ema)
  return loaded.config, loaded.params, loaded.step, workdir_io.load_workdir_config(workdir)


PROGRESS_SECONDS = 60  # an Inception pass over 10k images takes many minutes on a CPU


class FeatureExtractor:
  """uint8 NHWC batches -> InceptionFeatures (pool 2048-d, spatial 2023-d), batched under jit."""

  def __init__(self, weights_path, batch_size, mesh=None):
    self.weights_path = weights_path or inception_weights.default_weights_path()
    self.params = inception_weights.load_inception(self.weights_path)
    self.batch_size = batch_size
    self.mesh = mesh

  def __call__(self, batches, max_images=None):
    return fid_lib.compute_features(self.params, batches, self.batch_size, self.mesh, max_images,
                                    log_every_seconds=PROGRESS_SECONDS)

  def describe(self):
    return dict(network="FID Inception-v3 (pool_3 2048-d, mixed_6/conv spatial 2023-d)",
                weights=os.path.abspath(os.path.expanduser(self.weights_path)))


def make_feature_extractor(weights_path, batch_size, mesh=None):
  """The extractor the jobs use (tests substitute a small random one here)."""
  return FeatureExtractor(weights_path, batch_size, mesh)


def source_images(data_cfg, split, image_size, indices=None):
  """uint8 HWC RGB images of a data source split (ADM center crop to image_size)."""
  source = sources.make_source(data_cfg, split)
  indices = range(len(source)) if indices is None else indices
  for index in indices:
    yield transforms.center_crop(np.asarray(source[int(index)]["image"]), image_size)


def source_batches(data_cfg, split, image_size, batch_size, indices=None):
  """uint8 NHWC batches of a data source split, in record order (or of `indices`)."""
  return inputs.batch_images(source_images(data_cfg, split, image_size, indices), batch_size)


def source_length(data_cfg, split):
  return len(sources.make_source(data_cfg, split))


def build_mesh(mesh_config, batch_size, key):
  """The config's mesh over this host's devices; the batch must split evenly over it."""
  mesh = sharding.build_mesh(mesh_config)
  if batch_size < 1 or batch_size % mesh.devices.size:
    raise ValueError(f"{key}={batch_size} must be a positive multiple of the "
                     f"{mesh.devices.size} devices of the mesh {dict(mesh.shape)}")
  return mesh


def shard_rows(array, mesh):
  """A host batch as a jax.Array split by rows over every mesh axis."""
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.device_put(np.asarray(array), jax.sharding.NamedSharding(mesh, spec))


def replicate(tree, mesh):
  return jax.device_put(tree, sharding.replicated(mesh))


def run_record(config):
  """What a results file needs to be traced to its run: config, command, software, devices."""
  devices = jax.devices()
  return dict(
      config=config.to_dict(), command=" ".join(sys.argv),
      time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax_version=jax.__version__, device_kind=devices[0].device_kind,
      num_devices=len(devices))


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path, payload):
  """Writes JSON atomically (temp file + rename): a crash never leaves half a results file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
  os.replace(tmp, path)
  return path


def normalised_json(payload):
  """`payload` as it reads back from JSON (tuples -> lists, numpy -> Python), for comparisons."""
  return json.loads(json.dumps(payload, default=_json_default))


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())
