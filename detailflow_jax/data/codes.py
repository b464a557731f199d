"""Extracted codes (the AR model's training data): on-disk format, random-access source, batches.

Layout of a codes folder (written by jobs/extract_codes.py):
  manifest.json          what was extracted: tokenizer config, N, views, shards (see below)
  codes_XXXXX.npy        (count, views, 3, N) int16/int32: [:, v, 0] clean codes, [:, v, 1] the
                         self-correction input codes, [:, v, 2] the self-correction label codes
  labels_XXXXX.npy       (count,) int32 class labels
  noise_XXXXX.npy        (count,) int32 first noised position of each image (one per image,
                         shared by its views, as the reference)
Shard XXXXX holds images [XXXXX * shard_size, ...) of the split, in order. A shard is complete
when its codes file exists: the extraction writes it last, each file atomically.

AR sequences (the official generate_z_input_target): per sample, with probability
data.correction_prob the model input is the noisy `input` row and the target the `label` row
(clean codes through the noised span, the tokenizer's corrected codes after it); otherwise
input and target are the clean codes. The GPT reads the first N - g input codes and predicts
all N targets.
"""
import dataclasses
import json
import pathlib
import threading

import grain
import numpy as np

from detailflow_jax.data import pipeline

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "detailflow_codes"
FORMAT_VERSION = 1
CLEAN, INPUT, LABEL = 0, 1, 2  # rows of the index triplet, as the reference stores them

# Streams of config.seed for the AR pipeline (distinct from each other).
_SHUFFLE_STREAM, _CHOICE_STREAM = 11, 12


def shard_file_names(shard_index):
  """File names of one shard's arrays."""
  return dict(codes=f"codes_{shard_index:05d}.npy", labels=f"labels_{shard_index:05d}.npy",
              noise_positions=f"noise_{shard_index:05d}.npy")


def code_dtype(codebook_size):
  """Smallest integer type that holds every code index."""
  return np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32


def read_manifest(codes_dir):
  """The manifest dict of a codes folder (ValueError naming the folder when absent or foreign)."""
  path = pathlib.Path(codes_dir) / MANIFEST_FILE
  if not path.is_file():
    raise ValueError(f"data.codes_dir='{codes_dir}' has no {MANIFEST_FILE}: run job=extract_codes "
                     "first (it writes the codes there)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT_NAME} manifest (format="
                     f"{manifest.get('format')!r}, version={manifest.get('version')!r})")
  return manifest


def missing_shards(codes_dir, manifest):
  """Indices of the manifest's shards whose codes file is not on disk yet."""
  directory = pathlib.Path(codes_dir)
  return [s["index"] for s in manifest["shards"]
          if not (directory / shard_file_names(s["index"])["codes"]).is_file()]


class CodesSource:
  """Random-access source (grain-compatible) over a complete codes folder.

  Record i -> dict(codes=(views, 3, N) int array, label=int32). Shards are memory-mapped on
  first access, not at construction, so the object is cheap to pickle into grain workers.
  """

  def __init__(self, codes_dir):
    self.directory = pathlib.Path(codes_dir)
    self.manifest = read_manifest(codes_dir)
    missing = missing_shards(codes_dir, self.manifest)
    if missing:
      names = ", ".join(shard_file_names(i)["codes"] for i in missing[:3])
      more = ", ..." if len(missing) > 3 else ""
      raise ValueError(
          f"codes in '{codes_dir}' are incomplete: {len(missing)} of "
          f"{len(self.manifest['shards'])} shards missing ({names}{more}). Re-run job=extract_codes with the same config: it finishes the missing shards.")
    self.shard_size = int(self.manifest["shard_size"])
    self._length = int(self.manifest["num_images"])
    self._shards = {}
    self._lock = threading.Lock()

  @property
  def num_tokens(self):
    return int(self.manifest["num_tokens"])

  @property
  def num_views(self):
    return int(self.manifest["views"])

  def _shard(self, index):
    shard = self._shards.get(index)
    if shard is None:
      with self._lock:
        names = shard_file_names(index)
        codes = np.load(self.directory / names["codes"], mmap_mode="r")
        labels = np.load(self.directory / names["labels"])
        shard = self._shards[index] = (codes, labels)
    return shard

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_shards"] = {}  # memory maps are reopened in each worker
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"index {index} out of range for {self._length} records")
    codes, labels = self._shard(index // self.shard_size)
    offset = index % self.shard_size
    return dict(codes=np.asarray(codes[offset]), label=np.int32(labels[offset]))


def check_codes_match_gpt(manifest, gpt_config):
  """ValueError (naming the config key) when the codes cannot train this GPT."""
  pairs = (("vocab_size", "codebook_size"), ("block_size", "num_tokens"),
           ("group_size", "group_size"), ("causal_num", "causal_num"))
  for gpt_key, codes_key in pairs:
    if int(gpt_config[gpt_key]) != int(manifest[codes_key]):
      raise ValueError(
          f"gpt.{gpt_key}={gpt_config[gpt_key]} does not match the codes' {codes_key}="
          f"{manifest[codes_key]} (from the tokenizer in {manifest.get('tokenizer_workdir')}); "
          f"set --config.gpt.{gpt_key}={manifest[codes_key]}")
  if int(gpt_config["num_classes"]) < int(manifest["num_classes"]):
    raise ValueError(f"gpt.num_classes={gpt_config['num_classes']} is smaller than the codes' "
                     f"num_classes={manifest['num_classes']}; labels would be out of range")


@dataclasses.dataclass(frozen=True)
class ChooseSequence(grain.transforms.RandomMap):
  """One record -> one AR training sample: a random view, then clean or self-corrected."""
  group_size: int
  correction_prob: float

  def random_map(self, element, rng):
    codes = element["codes"]
    view = int(rng.integers(codes.shape[0])) if codes.shape[0] > 1 else 0
    corrected = rng.random() < self.correction_prob
    triplet = codes[view].astype(np.int32)
    source, target = (INPUT, LABEL) if corrected else (CLEAN, CLEAN)
    return dict(codes_input=triplet[source, :-self.group_size], targets=triplet[target],
                labels=np.int32(element["label"]), corrected=np.bool_(corrected))


def make_ar_train_dataset(config, process_index=0, process_count=1):
  """The AR training MapDataset (infinite): element i is this process's batch i."""
  data = config.data
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if data.batch_size < process_count or data.batch_size % process_count:
    raise ValueError(f"data.batch_size={data.batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  local_batch = data.batch_size // process_count
  if not 0.0 <= data.correction_prob <= 1.0:
    raise ValueError(f"data.correction_prob={data.correction_prob} must be in [0, 1]")
  if not data.codes_dir:
    raise ValueError("data.codes_dir is empty: set it to the output folder of job=extract_codes")
  source = CodesSource(data.codes_dir)
  check_codes_match_gpt(source.manifest, config.gpt)
  dataset = grain.MapDataset.source(source)[process_index::process_count]
  if len(dataset) < local_batch:
    raise ValueError(f"{len(dataset)} code records for process {process_index} are fewer than "
                     f"its batch of {local_batch} (data.batch_size={data.batch_size})")
  dataset = dataset.shuffle(seed=pipeline.derive_seed(config.seed, _SHUFFLE_STREAM))
  dataset = dataset.repeat()  # each epoch in a new order, with new view / correction draws
  dataset = dataset.random_map(
      ChooseSequence(int(source.manifest["group_size"]), float(data.correction_prob)),
      seed=pipeline.derive_seed(config.seed, _CHOICE_STREAM, process_index))
  return dataset.batch(local_batch, drop_remainder=True)


def make_ar_train_iterator(config, process_index=0, process_count=1):
  """Infinite iterator of this process's AR training batches (b = data.batch_size / processes):
    codes_input (b, N - g) int32   the GPT's input codes
    targets     (b, N) int32       the codes it must predict
    labels      (b,) int32         class labels
    corrected   (b,) bool          which samples use the self-correction sequence
  Deterministic for config.seed; get_state() -> JSON dict, set_state(state) resumes.
  """
  dataset = make_ar_train_dataset(config, process_index, process_count)
  options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  iter_ds = dataset.to_iter_dataset(options)
  if config.data.num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(iter_ds)
