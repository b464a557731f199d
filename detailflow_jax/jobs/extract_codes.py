"""Code extraction (job=extract_codes): a dataset through a trained tokenizer, for AR training.

Per image and view (the center crop and its horizontal flip, or the reference's TenCrop) it
stores the index triplet of `DetailFlowTokenizer.self_correct`: the clean codes, the
self-correction input codes and their label codes (format: data/codes.py). Each image gets ONE
noise position, drawn as the tokenizer training draws it for n = N and shared by all its views
(the reference draws one per image and encodes all its crops with it).

Determinism: the noise position and the top-k draw of image i depend only on (config.seed, i),
so the output does not depend on the batch size, the shard size or the number of processes.
Resuming: shards whose codes file exists are skipped; files are written through a temporary
file and a rename. SIGTERM stops the job after the batch in progress (preemption.py): finished
shards stay, the shard in progress is encoded again by the next run. Codes of another tokenizer
checkpoint than the one now in extract.tokenizer_workdir (the tokenizer trained on since) are
replaced: the next run deletes them and extracts again. Processes split the shards (process p
takes shards p, p + P, ...), each using all its local devices. Images are read with the
evaluation crop (deterministic ADM center crop, transforms.center_crop); the encode +
self-correct program is compiled once.
"""
import dataclasses
import functools
import json
import math
import pathlib
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from detailflow_jax import detail
from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.data import codes as codes_format
from detailflow_jax.data import sources
from detailflow_jax.data import transforms
from detailflow_jax.models import tokenizer as tokenizer_model

DEFAULT_SHARD_SIZE = 10_000
_NOISE_STREAM = 21  # np.random stream of config.seed for the per-image noise positions
FIVE_CROPS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def view_names(flips, ten_crop):
  """Names of the stored views, in storage order."""
  base = FIVE_CROPS if ten_crop else ("center",)
  return base + tuple(f"{name}_flip" for name in base) if flips else base


def five_crop(image, size):
  """torchvision's FiveCrop order: four corners, then the center."""
  height, width = image.shape[:2]
  if size > min(height, width):
    raise ValueError(f"crop size {size} is larger than the image ({height}x{width})")
  top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
  corners = ((0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             (top, left))
  return [image[y:y + size, x:x + size] for y, x in corners]


def make_views(image, image_size, flips, ten_crop):
  """uint8 HWC image (already center-cropped) -> (views, image_size, image_size, 3) uint8."""
  crops = five_crop(image, image_size) if ten_crop else [image]
  if flips:
    mirrored = image[:, ::-1]
    crops = crops + (five_crop(mirrored, image_size) if ten_crop else [mirrored])
  return np.stack(crops)


def noise_position(seed, image_index, schedule):
  """The image's noise position for n = N (always noised, as the reference's p = 1 draw)."""
  rng = np.random.default_rng([seed, _NOISE_STREAM, image_index])
  return detail.sample_noise_position(rng, schedule.num_tokens, schedule.group_size,
                                      schedule.causal_num, 1.0)


@dataclasses.dataclass(frozen=True)
class BatchJob:
  shard: int
  start: int  # first image index of the batch
  stop: int   # one past its last image index


@dataclasses.dataclass(frozen=True)
class LoadBatch(grain.transforms.Map):
  """BatchJob -> padded uint8 views, labels, image indices (-1 = padding), noise positions."""
  source: object
  crop_size: int
  image_size: int
  flips: bool
  ten_crop: bool
  batch_size: int
  seed: int
  schedule: detail.ResolutionSchedule

  def map(self, job):
    views, labels, indices, noise = [], [], [], []
    for index in range(job.start, job.stop):
      record = self.source[index]
      image = transforms.center_crop(np.asarray(record["image"]), self.crop_size)
      views.append(make_views(image, self.image_size, self.flips, self.ten_crop))
      labels.append(int(record["label"]))
      indices.append(index)
      noise.append(noise_position(self.seed, index, self.schedule))
    pad = self.batch_size - len(views)
    views += [np.zeros_like(views[0])] * pad
    return dict(images=np.stack(views), labels=np.asarray(labels + [0] * pad, np.int32),
                indices=np.asarray(indices + [-1] * pad, np.int32),
                noise_positions=np.asarray(noise + [0] * pad, np.int32),
                shard=job.shard, count=job.stop - job.start)


class CodeEncoder:
  """Jitted (images uint8 (B, V, S, S, 3), noise (B,), indices (B,)) -> triplets (B, V, 3, N).

  The batch is split over this process's local devices; params are replicated on them. The
  compiled program is shared by every encoder with the same tokenizer config and seed, so a
  second extraction in the same process (a resume, a test) does not compile again.
  """

  def __init__(self, tokenizer_config, params, seed, batch_size):
    devices = jax.local_devices()
    if batch_size % len(devices):
      raise ValueError(f"extract.batch_size={batch_size} must be a multiple of the "
                       f"{len(devices)} local devices")
    config_json = _to_json(tokenizer_config.to_dict())
    self._fn, replicated, self.rows = _compiled_encoder(
        config_json, int(seed), tuple(d.id for d in devices))
    self.params = jax.device_put(params, replicated)

  def __call__(self, images_uint8, noise_positions, indices):
    put = lambda x: jax.device_put(x, self.rows)
    return np.asarray(self._fn(self.params, put(images_uint8), put(noise_positions), put(indices)))


@functools.lru_cache(maxsize=4)
def _compiled_encoder(tokenizer_config_json, seed, device_ids):
  model = tokenizer_model.DetailFlowTokenizer(
      ml_collections.ConfigDict(json.loads(tokenizer_config_json)))
  by_id = {d.id: d for d in jax.local_devices()}
  mesh = Mesh(np.asarray([by_id[i] for i in device_ids]), ("data",))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def encode(params, images_uint8, noise_positions, indices):
    # Same arithmetic as transforms.to_float_image, done on the device (4x less to transfer).
    images = images_uint8.astype(jnp.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)

    def one_image(views, position, key):
      out = model.apply({"params": params}, views, position, key,
                        method=tokenizer_model.DetailFlowTokenizer.self_correct)
      return out["index_triplet"]  # (V, N, 3)

    triplets = jax.vmap(one_image)(images, noise_positions, keys)
    return jnp.swapaxes(triplets, -1, -2)  # (B, V, 3, N)

  fn = jax.jit(encode, in_shardings=(replicated, rows, rows, rows), out_shardings=rows)
  return fn, replicated, rows


def save_npy_atomically(path, array):
  """np.save through a temporary file in the same folder and a rename."""
  workdir_io.replace_atomically(path, lambda f: np.save(f, array))


def write_shard(codes_dir, shard_index, codes, labels, noise_positions):
  """Writes one shard; the codes file last, since its presence marks the shard complete."""
  names = codes_format.shard_file_names(shard_index)
  save_npy_atomically(pathlib.Path(codes_dir) / names["labels"], np.asarray(labels, np.int32))
  save_npy_atomically(pathlib.Path(codes_dir) / names["noise_positions"],
                      np.asarray(noise_positions, np.int32))
  save_npy_atomically(pathlib.Path(codes_dir) / names["codes"], codes)


def _remove_stale_temporaries(codes_dir, shard_index):
  """Temporary files a killed run left for this shard (only this process writes them)."""
  for name in codes_format.shard_file_names(shard_index).values():
    for path in pathlib.Path(codes_dir).glob(f".{name}.*.tmp"):
      path.unlink(missing_ok=True)


def shard_plan(num_images, shard_size):
  """[(shard index, first image, count)] covering the split in order."""
  if shard_size < 1:
    raise ValueError(f"extract.shard_size={shard_size} must be >= 1")
  return [(s, s * shard_size, min(shard_size, num_images - s * shard_size))
          for s in range(math.ceil(num_images / shard_size))]


def build_manifest(*, tokenizer_config, num_images, shard_size, views, num_classes, **extra):
  """The manifest dict of a codes folder (everything but `extra` is required by readers)."""
  t = tokenizer_config
  return dict(
      format=codes_format.FORMAT_NAME, version=codes_format.FORMAT_VERSION,
      layout="codes[i, view, k, t]: k = 0 clean, 1 self-correction input, 2 label codes",
      num_images=int(num_images), shard_size=int(shard_size), views=len(views),
      view_names=list(views), num_tokens=int(t.num_tokens), group_size=int(t.group_size),
      causal_num=int(t.causal_num), codebook_size=int(t.codebook_size),
      num_classes=int(num_classes),
      dtype=np.dtype(codes_format.code_dtype(t.codebook_size)).name,
      shards=[dict(index=s, first_image=first, count=count, **codes_format.shard_file_names(s))
              for s, first, count in shard_plan(num_images, shard_size)],
      tokenizer=t.to_dict() if hasattr(t, "to_dict") else dict(t), **extra)


# Manifest keys naming the tokenizer checkpoint that made the codes. Codes of another checkpoint
# are stale and get replaced; other differences (split, seed, views ...) are refused, since
# resuming would then mix codes of two settings.
TOKENIZER_KEYS = ("tokenizer", "tokenizer_step", "use_ema")


def write_or_check_manifest(codes_dir, manifest, process_index=None):
  """Writes the manifest (process 0), or checks that an existing one describes the same run.

  Returns True when the existing codes came from another tokenizer checkpoint (TOKENIZER_KEYS
  differ): process 0 then deletes them and writes the new manifest, so every shard is extracted
  again. In a JAX cluster the other processes leave that to process 0 (extract_codes waits for
  it); a separate run with process_index > 0 refuses, as process 0 must replace them first."""
  path = pathlib.Path(codes_dir) / codes_format.MANIFEST_FILE
  pid = jax.process_index() if process_index is None else process_index
  stale = False
  if path.is_file():
    existing = codes_format.read_manifest(codes_dir)
    expected = _json_round_trip(manifest)
    # The tokenizer path is informational (it may be spelled differently on a resume); its
    # config and checkpoint step are what define the codes.
    keys = (set(existing) | set(expected)) - {"tokenizer_workdir"}
    different = sorted(k for k in keys if existing.get(k) != expected.get(k))
    if not different:
      return False
    if not set(different) & set(TOKENIZER_KEYS):
      raise ValueError(
          f"{path} was written by a different extraction (differs in {different}); resuming "
          "would mix codes. Use an empty data.codes_dir (or delete that folder) to start over.")
    if pid != 0:
      if jax.process_count() == 1:
        raise ValueError(
            f"{codes_dir} holds codes of another tokenizer checkpoint (differs in {different});"
            " process 0 replaces them: run it first")
      return True
    print(f"extract_codes: the codes in {codes_dir} come from tokenizer step "
          f"{existing.get('tokenizer_step')}, the tokenizer is now at step "
          f"{expected.get('tokenizer_step')} (differs in {different}); deleting them and "
          "extracting again", flush=True)
    delete_codes(codes_dir, existing)
    stale = True
  if pid == 0:
    workdir_io.write_text_atomically(path, _to_json(manifest))
  return stale


def delete_codes(codes_dir, manifest):
  """Deletes the shard files a manifest lists: every codes file first (their presence marks a
  shard complete), so an interrupted deletion leaves no shard that looks complete."""
  names = [codes_format.shard_file_names(s["index"]) for s in manifest.get("shards", [])]
  for key in ("codes", "labels", "noise_positions"):
    for shard in names:
      (pathlib.Path(codes_dir) / shard[key]).unlink(missing_ok=True)
  for shard in manifest.get("shards", []):
    _remove_stale_temporaries(codes_dir, shard["index"])


def _to_json(value):
  return json.dumps(value, indent=2, sort_keys=True) + "\n"


def _json_round_trip(value):
  return json.loads(_to_json(value))


def image_data_config(config):
  """config.data with `source` set to the image source to encode (extract.source, else
  data.source when that is an image source)."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  source = config.extract.get("source", "") or data.source
  if source not in sources.IMAGE_SOURCES:
    raise ValueError(f"extract.source={source!r} (data.source={data.source!r}) must name an image "
                     f"source to encode: one of {sources.IMAGE_SOURCES}")
  data.source = source
  return data


def codes_dir_for(config, workdir):
  """Where the codes go: data.codes_dir, else WORKDIR/codes."""
  return pathlib.Path(config.data.codes_dir or pathlib.Path(workdir) / "codes")


def extract_codes(config, workdir, process_index=None, process_count=None):
  """The `extract_codes` job. Returns a summary dict (also logged).

  process_index / process_count default to JAX's; giving them splits the shards among
  independent runs (e.g. separate jobs on machines that do not form one JAX cluster).
  """
  workdir_io.save_workdir_config(config, workdir)
  ex = config.extract
  if not ex.tokenizer_workdir:
    raise ValueError("extract.tokenizer_workdir is empty: set it to the workdir of a trained "
                     "tokenizer (job=train_tokenizer)")
  tok = workdir_io.load_tokenizer(ex.tokenizer_workdir, use_ema=ex.use_ema)
  schedule = detail.resolution_schedule(tok.config)
  image_size = int(tok.config.image_size)
  crop_size = int(ex.ten_crop_size) if ex.ten_crop else image_size
  if crop_size < image_size:
    raise ValueError(f"extract.ten_crop_size={crop_size} must be >= the tokenizer's image_size="
                     f"{image_size}")
  data = image_data_config(config)
  source = sources.make_source(data, ex.split)
  num_images = len(source)
  max_images = int(ex.get("max_images", 0))
  if max_images < 0:
    raise ValueError(f"extract.max_images={max_images} must be >= 0 (0 encodes the whole split)")
  if max_images:
    num_images = min(num_images, max_images)
  shard_size = int(ex.get("shard_size", DEFAULT_SHARD_SIZE))
  views = view_names(ex.flips, ex.ten_crop)
  out_dir = codes_dir_for(config, workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  manifest = build_manifest(
      tokenizer_config=tok.config, num_images=num_images, shard_size=shard_size, views=views,
      num_classes=source.num_classes, split=ex.split, image_source=data.source,
      image_size=image_size, crop_size=crop_size, seed=int(config.seed),
      tokenizer_workdir=str(ex.tokenizer_workdir), tokenizer_step=int(tok.step),
      use_ema=bool(ex.use_ema))
  pid = jax.process_index() if process_index is None else int(process_index)
  pcount = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pid < pcount:
    raise ValueError(f"process_index={pid} must be in [0, process_count={pcount})")
  replaced = write_or_check_manifest(out_dir, manifest, pid)
  if jax.process_count() > 1:  # process 0 may be replacing stale codes: wait for it
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("extract_codes_manifest")

  missing = set(codes_format.missing_shards(out_dir, manifest))
  done = {s["index"] for s in manifest["shards"]} - missing
  mine = [(s, first, count) for s, first, count in shard_plan(num_images, shard_size)
          if s % pcount == pid]
  todo = [plan for plan in mine if plan[0] not in done]
  skipped = [s for s, _, _ in mine if s in done]
  for s, _, _ in todo:
    _remove_stale_temporaries(out_dir, s)
  if skipped:
    logging.info("extract_codes: %d shards already complete, skipped: %s", len(skipped), skipped)
  batch = int(ex.batch_size)
  jobs = [BatchJob(s, b, min(b + batch, first + count))
          for s, first, count in todo for b in range(first, first + count, batch)]
  summary = dict(codes_dir=str(out_dir), shards_written=[s for s, _, _ in todo],
                 shards_skipped=skipped, images=sum(c for _, _, c in todo),
                 replaced_stale_codes=replaced)
  if jobs:
    loader = LoadBatch(source, crop_size, image_size, bool(ex.flips), bool(ex.ten_crop), batch,
                       int(config.seed), schedule)
    encoder = CodeEncoder(tok.config, tok.params, int(config.seed), batch)
    summary.update(_run(jobs, loader, encoder, out_dir, manifest, data.num_workers, pid))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("extract_codes_done")
  logging.info("extract_codes: %s", {k: v for k, v in summary.items() if k != "shards_written"})
  return summary


def _run(jobs, loader, encoder, out_dir, manifest, num_workers, process_index):
  """Encodes the batches in order and writes each shard as soon as its last batch is done."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  dtype = codes_format.code_dtype(manifest["codebook_size"])
  dataset = grain.MapDataset.source(jobs).map(loader).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  remaining_batches = {}
  for job in jobs:
    remaining_batches[job.shard] = remaining_batches.get(job.shard, 0) + 1
  parts = {}
  total = sum(j.stop - j.start for j in jobs)
  start_time = time.perf_counter()
  first_batch_time = None
  with tqdm(total=total, unit="img", desc="extract_codes", disable=process_index != 0) as bar:
    for batch in dataset:
      triplets = encoder(batch["images"], batch["noise_positions"], batch["indices"])
      if first_batch_time is None:
        first_batch_time = time.perf_counter()  # compile time excluded from the rate
      count, shard = int(batch["count"]), int(batch["shard"])
      parts.setdefault(shard, []).append(
          (triplets[:count].astype(dtype), batch["labels"][:count],
           batch["noise_positions"][:count]))
      bar.update(count)
      remaining_batches[shard] -= 1
      if remaining_batches[shard] == 0:
        shard_parts = parts.pop(shard)
        write_shard(out_dir, shard, *(np.concatenate(a) for a in zip(*shard_parts)))
      if preemption.reached("extract_batch"):
        complete = len(manifest["shards"]) - len(codes_format.missing_shards(out_dir, manifest))
        raise preemption.Preempted(
            f"SIGTERM: code extraction stopped with {complete} of {len(manifest['shards'])} "
            f"shards complete in {out_dir}; run the same command to extract the rest.")
  seconds = time.perf_counter() - start_time
  first_count = jobs[0].stop - jobs[0].start
  steady = time.perf_counter() - first_batch_time
  rate = (total - first_count) / steady if total > first_count and steady > 0 else float("nan")
  return dict(seconds=round(seconds, 2), images_per_sec=round(rate, 1))
