"""The `sample` job: class-conditional samples as PNG grids, coarse-to-fine strips and an
ADM-style .npz (arr_0: uint8 NHWC, arr_1: labels).

grid.png has one row per class, labelled with the class name (Fashion-MNIST) or index;
coarse_to_fine.png has one row per class (its first sample) and one column per prefix length,
labelled "n=..." and R(n). Both are upscaled x3 with nearest neighbour (labelled_grid.py) and
also written to WORKDIR/tensorboard as the images sample/grid and sample/coarse_to_fine at the
GPT checkpoint's step, so successive checkpoints' samples line up on TensorBoard's step slider.
sample.image_size S (0: the tokenizer's own size) samples the codes of an S x S image of an
any-resolution tokenizer (api.token_count_for_size) and decodes them at S.

SIGTERM stops sampling after the batch in progress (preemption.py); nothing is written until every
sample is decoded, each file through a temporary file and a rename, and sample_settings.json (the
settings and the two checkpoint steps) last. A rerun whose settings and checkpoints match a
complete sample_settings.json keeps the samples; otherwise it samples again."""
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from detailflow_jax import api
from detailflow_jax import detail
from detailflow_jax import images as image_io
from detailflow_jax import labelled_grid
from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.data import fashion_mnist
from detailflow_jax.train import metrics_writer

STRIP_ROWS = 10
SETTINGS_FILE = "sample_settings.json"  # written last: the samples are complete


def sample_settings(config):
  s = config.sample
  return dict(cfg_scale=float(s.cfg_scale), temperature=float(s.temperature), top_k=int(s.top_k),
              top_p=float(s.top_p), gradual_cfg=bool(s.gradual_cfg))


def class_labels(num_classes, per_class):
  """[0]*per_class + [1]*per_class + ...: grid row c holds class c."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def generate(params, labels, *, seed, batch_size, settings, log_every=10):
  """All codes for `labels`, in fixed-size batches (the last one padded) with one PRNG key per
  image derived from (seed, image index), so a sample does not depend on the batch size."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(labels))
  codes = []
  start = time.perf_counter()
  num_batches = -(-len(labels) // batch_size)
  for b in range(num_batches):
    lo, hi = b * batch_size, min((b + 1) * batch_size, len(labels))
    pad = batch_size - (hi - lo)
    batch_labels = np.concatenate([labels[lo:hi], np.zeros(pad, np.int32)])
    batch_keys = jnp.concatenate([keys[lo:hi], keys[:pad]]) if pad else keys[lo:hi]
    out = api.generate_codes(params, batch_labels, rng=batch_keys, **settings)
    codes.append(np.asarray(out)[:hi - lo])
    if (b + 1) % log_every == 0 or b + 1 == num_batches:
      done = hi
      rate = done / (time.perf_counter() - start)
      print(f"sampled {done}/{len(labels)} images ({rate:.2f} images/s)", flush=True)
    if preemption.reached("sample_batch"):
      raise preemption.Preempted(
          f"SIGTERM: sampling stopped after {hi} of {len(labels)} images; nothing is written "
          "until all are done: run the same command to sample again.")
  return np.concatenate(codes)


def decode_all(tokenizer, codes, num_tokens=None, batch_size=250, image_size=None):
  out = [np.asarray(api.decode(tokenizer, codes[i:i + batch_size], num_tokens, image_size))
         for i in range(0, len(codes), batch_size)]
  return np.concatenate(out)


def class_names(data_source, num_classes):
  """Row labels: Fashion-MNIST's class names, else the class indices as text."""
  if data_source == "fashion_mnist" and num_classes == len(fashion_mnist.CLASS_NAMES):
    return list(fashion_mnist.CLASS_NAMES)
  return [str(c) for c in range(num_classes)]


def tokenizer_data_source(tokenizer_workdir):
  """data.source of the tokenizer's training run (its WORKDIR/config.json); "" when unknown
  (e.g. a run imported from an official PyTorch checkpoint)."""
  try:
    config = workdir_io.load_workdir_config(tokenizer_workdir)
  except ValueError:
    return ""
  return str(config.get("data", {}).get("source", "") or "")


def strip_column_labels(tok_config, token_counts):
  """"n=<tokens>" over "R(n)=<content resolution>" for each column of the strip."""
  schedule = detail.resolution_schedule(tok_config)
  return [f"n={n}\nR(n)={schedule.content_resolution(n)}" for n in token_counts]


def write_outputs(out_dir, tokenizer, codes, labels, num_classes, per_class, row_names=None,
                  tensorboard_step=None, image_size=None):
  """samples.npz, grid.png (<= 10 samples per class, a labelled row per class) and
  coarse_to_fine.png (the first sample of each class, every prefix length). row_names: one per
  class (default: the class indices). tensorboard_step: also write both pictures to
  out_dir/tensorboard at that step (None: PNGs only). image_size: the side the samples are
  decoded at (None: the decoder side of all their codes); the strip goes up to their count."""
  out_dir = pathlib.Path(out_dir)
  row_names = list(row_names) if row_names is not None else class_names("", num_classes)
  images = image_io.to_uint8(np.clip(
      decode_all(tokenizer, codes, codes.shape[1], image_size=image_size), -1, 1))
  workdir_io.replace_atomically(out_dir / "samples.npz",
                                lambda f: np.savez(f, arr_0=images, arr_1=labels))
  cols = min(per_class, 10)
  rows_idx = [c * per_class + i for c in range(num_classes) for i in range(cols)]
  grid = labelled_grid.labelled_grid(images[rows_idx], num_classes, cols, row_names)
  image_io.save_png(grid, out_dir / "grid.png")
  # Coarse-to-fine: the first sample of each class decoded from its first n codes, every n.
  strip_classes = list(range(min(num_classes, STRIP_ROWS)))
  first = codes[[c * per_class for c in strip_classes]]
  token_counts = [n for n in api.decodable_token_counts(tokenizer.config) if n <= codes.shape[1]]
  per_n = {n: image_io.to_uint8(np.clip(decode_all(tokenizer, first, n), -1, 1))
           for n in token_counts}
  strip_rows = [[per_n[n][i] for n in token_counts] for i in range(len(first))]
  strip = labelled_grid.labelled_strip(
      strip_rows, image_size or tokenizer.config.image_size, [row_names[c] for c in strip_classes],
      strip_column_labels(tokenizer.config, token_counts))
  image_io.save_png(strip, out_dir / "coarse_to_fine.png")
  if tensorboard_step is not None:
    metrics_writer.write_images(out_dir, tensorboard_step,
                                {"sample/grid": grid, "sample/coarse_to_fine": strip})
  return images


def image_size(config):
  """sample.image_size: the side to sample at (0 or absent: the tokenizer's own)."""
  return int(config.sample.get("image_size", 0) or 0)


def sampling_record(config):
  """What determines the samples: the settings, the seed, the counts and the checkpoints read
  (and the image size when one is chosen, so records of the tokenizer's own size stay as they
  were)."""
  s = config.sample
  return dict(sample_settings(config), seed=s.seed, per_class=s.per_class,
              tokenizer_workdir=s.tokenizer_workdir, gpt_workdir=s.gpt_workdir,
              tokenizer_step=workdir_io.resolve_step(s.tokenizer_workdir),
              gpt_step=workdir_io.resolve_step(s.gpt_workdir),
              **({"image_size": image_size(config)} if image_size(config) else {}))


def complete_samples(out_dir, record):
  """(images, labels) of samples already written in out_dir with this record; else None."""
  out_dir = pathlib.Path(out_dir)
  settings_path = out_dir / SETTINGS_FILE
  if not settings_path.is_file():
    return None
  written = json.loads(settings_path.read_text())
  written.pop("num_images", None)
  if written != json.loads(json.dumps(record)):
    return None
  with np.load(out_dir / "samples.npz") as data:
    return data["arr_0"], data["arr_1"]


def sample_job(config, workdir):
  """Samples `sample.per_class` images of every class with the trained tokenizer + GPT."""
  s = config.sample
  out_dir = pathlib.Path(workdir)
  record = sampling_record(config)
  done = complete_samples(out_dir, record)
  if done is not None:
    print(f"samples in {out_dir} are complete for these settings and checkpoints; kept",
          flush=True)
    return done
  params = api.load_sampler_params(s.tokenizer_workdir, s.gpt_workdir)
  num_classes = params.gpt_config.num_classes
  labels = class_labels(num_classes, s.per_class)
  settings = sample_settings(config)
  size = image_size(config) or None
  if size is not None:  # the codes of a size x size image (ValueError: the supported sizes)
    settings["num_tokens"] = api.token_count_for_size(params.tokenizer.config, size)
  logging.info("sampling %d images with %s", len(labels), settings)
  codes = generate(params, labels, seed=s.seed, batch_size=s.batch_size, settings=settings)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / SETTINGS_FILE).unlink(missing_ok=True)  # written again last, once all is written
  names = class_names(tokenizer_data_source(s.tokenizer_workdir), num_classes)
  images = write_outputs(out_dir, params.tokenizer, codes, labels, num_classes, s.per_class,
                         names, tensorboard_step=record["gpt_step"], image_size=size)
  workdir_io.replace_atomically(out_dir / "codes.npy", lambda f: np.save(f, codes))
  workdir_io.write_text_atomically(out_dir / SETTINGS_FILE,
                                   json.dumps(dict(record, num_images=len(labels)), indent=2))
  print(f"wrote {len(images)} samples to {out_dir}/samples.npz, grid.png, coarse_to_fine.png",
        flush=True)
  return images, labels
