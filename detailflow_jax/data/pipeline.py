"""Grain pipelines: tokenizer training batches (with the degraded target) and evaluation batches.

Training: source -> this process's shard -> shuffle -> repeat -> per-example augmentation ->
batch -> per-batch draw of ONE prefix length n and ONE noise position + the degraded target.
Every stage is index-based (grain MapDataset), so the iterator state is just the next batch
index: a JSON dict the trainer stores in its checkpoint, and restoring it resumes the same
stream. The per-batch draw is seeded by (config.seed, batch index) only, so every process
draws the same n and its decoder output side matches on all hosts.

Compiled variants: the train step is specialised on the target side only (n is a traced
scalar: the decoder masks latents beyond n), so a config has
len(detail.resolution_schedule(config.tokenizer).output_sizes()) of them, e.g. 14 for
N=128 at 256 px. A run at several image sizes (dynamic_resolution.py) has such a set per side.
"""
import dataclasses
import math
from typing import Optional

import grain
import numpy as np

from detailflow_jax import detail
from detailflow_jax import dynamic_resolution
from detailflow_jax.data import degrade
from detailflow_jax.data import sources
from detailflow_jax.data import transforms

# Distinct streams derived from config.seed, so the shuffle, the augmentation and the
# per-batch draws never share random numbers.
_SHUFFLE_STREAM, _AUGMENT_STREAM, _BATCH_DRAW_STREAM, _SIZE_DRAW_STREAM = 1, 2, 3, 4
# Batches are large (b x H x W x 3 float32): keep only a couple in flight per reader.
_READ_THREADS = 2
_PREFETCH_BATCHES = 2


def derive_seed(seed, *stream):
  """A 32-bit seed for grain derived from the config seed and a stream id."""
  if seed < 0:
    raise ValueError(f"seed={seed} must be >= 0")
  return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class DegradeBatch(grain.transforms.MapWithIndex):
  """Adds num_tokens (n), noise_position and the degraded target to a batch of images.

  With `sizes` (dynamic_resolution.TrainingSizes) the batch first draws its side r, is resized
  to it (and cut to sizes.rows(b, r) rows), and n is drawn below the token count of r; the side
  comes from its own random stream, so the n / noise draws of a one-size run (sizes None) are
  unchanged.
  """
  schedule: detail.ResolutionSchedule
  seed: int
  degrade_prob: float
  correction_prob: float
  sizes: Optional[dynamic_resolution.TrainingSizes] = None

  def side(self, batch_index):
    """The image side of the batch with this index; the same on every process."""
    if self.sizes is None:
      return self.schedule.image_size
    return self.sizes.draw(np.random.default_rng([self.seed, _SIZE_DRAW_STREAM, batch_index]))

  def draw(self, batch_index):
    """(n, noise position) for the batch with this index; the same on every process."""
    rng = np.random.default_rng([self.seed, _BATCH_DRAW_STREAM, batch_index])
    s = self.schedule
    tokens = s.decres2besttoken[self.side(batch_index)]  # N at the schedule's own side
    n = detail.sample_prefix_length(rng, tokens, s.group_size, s.causal_num, self.degrade_prob)
    noise = detail.sample_noise_position(rng, n, s.group_size, s.causal_num,
                                         self.correction_prob)
    return n, noise

  def map_with_index(self, index, batch):
    n, noise = self.draw(index)
    images, labels = batch["image"], batch["label"]
    side = self.side(index)
    if self.sizes is not None:
      rows = self.sizes.rows(images.shape[0], side)
      images = degrade.resize_images(images[:rows], side)
      labels = labels[:rows]
    if n == self.schedule.decres2besttoken[side]:
      target = images  # R(n) rounds to this side: the target is the image itself
    else:
      target = degrade.degraded_target(images, self.schedule.content_resolution(n),
                                       self.schedule.decoder_size(n))
    return dict(image=images, target=target, num_tokens=np.int32(n),
                noise_position=np.int32(noise), label=labels.astype(np.int32))


def _check_sharding(batch_size, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count})")
  if batch_size < process_count or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  return batch_size // process_count


def process_rows_of_global_batches(examples, local_batch, process_index, process_count):
  """This process's rows of each global batch of a global example stream.

  Global batch t is examples [t * B, (t + 1) * B) with B = local_batch * process_count, and
  process p takes rows [p * local_batch, (p + 1) * local_batch) of it: the rows its devices
  hold in a batch sharded over the data axes when each process's devices are contiguous in the
  mesh (as jax.devices() lists them; on other layouts the rows are permuted within the global
  batch, which leaves the mean loss unchanged). Every process shuffles and augments the same
  global stream (seeded by example index), but reads and augments only its own rows, lazily.
  So the global batches, and the losses, do not depend on the process count, and a job can
  resume on another topology.
  """
  return examples.batch(local_batch, drop_remainder=True)[process_index::process_count]


def _read(dataset, num_workers):
  iter_ds = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES))
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_ds)


def make_tokenizer_train_dataset(config, *, process_index=0, process_count=1):
  """The training MapDataset (infinite): element i is this process's batch i."""
  data = config.data
  local_batch = _check_sharding(data.batch_size, process_index, process_count)
  schedule = detail.resolution_schedule(config.tokenizer)
  for name in ("degrade_prob", "correction_prob"):
    if not 0.0 <= data[name] <= 1.0:
      raise ValueError(f"data.{name}={data[name]} must be in [0, 1]")
  if data.degrade_prob > 0 and schedule.num_tokens < schedule.group_size + schedule.causal_num:
    raise ValueError(f"data.degrade_prob={data.degrade_prob} needs num_tokens >= group_size + "
                     f"causal_num, got {schedule.num_tokens} < {schedule.group_size} + "
                     f"{schedule.causal_num}")
  sizes = dynamic_resolution.training_sizes(config)
  if sizes is not None and data.degrade_prob > 0:
    few = {r: schedule.decres2besttoken[r] for r in sizes.sides()
           if schedule.decres2besttoken[r] < schedule.group_size + schedule.causal_num}
    if few:
      raise ValueError(f"data.degrade_prob={data.degrade_prob} needs at least group_size + "
                       f"causal_num = {schedule.group_size + schedule.causal_num} tokens at every "
                       f"training side; sides {sorted(few)} have {list(few.values())}: raise "
                       f"tokenizer.min_image_size")
  augment = transforms.TrainAugment(
      image_size=schedule.image_size, resize_min=data.resize_min, resize_max=data.resize_max,
      random_flip=data.random_flip)
  source = sources.make_source(data, data.train_split)
  if len(source) == 0:
    raise ValueError(f"split '{data.train_split}' has no records")
  dataset = grain.MapDataset.source(source)
  dataset = dataset.shuffle(seed=derive_seed(config.seed, _SHUFFLE_STREAM))
  dataset = dataset.repeat()  # each epoch reshuffled and re-augmented differently
  dataset = dataset.random_map(augment, seed=derive_seed(config.seed, _AUGMENT_STREAM))
  dataset = process_rows_of_global_batches(dataset, local_batch, process_index, process_count)
  return dataset.map_with_index(DegradeBatch(
      schedule, config.seed, float(data.degrade_prob), float(data.correction_prob), sizes))


def make_tokenizer_train_iterator(config, *, process_index=0, process_count=1):
  """Infinite iterator of this process's tokenizer training batches.

  Each element is a dict of numpy arrays (b = data.batch_size // process_count):
    image           (b, S, S, 3) float32 in [-1, 1], S = tokenizer.image_size; with several
                    training sizes (dynamic_resolution.training_sizes) S is the side this batch
                    drew and b may be cut at large sides (data.reduce_batch_at_large_sizes)
    target          (b, d, d, 3) float32, d = schedule.decoder_size(n); the image when n is
                    the token count of S (N at tokenizer.image_size)
    num_tokens      int32 scalar n, the same on every process for a given step
    noise_position  int32 scalar, first self-correction token, -1 for none
    label           (b,) int32
  The iterator has get_state() -> JSON-serialisable dict and set_state(state). With
  data.num_workers > 0 the state also records the worker layout, so restore it with the same
  num_workers.
  """
  dataset = make_tokenizer_train_dataset(config, process_index=process_index,
                                         process_count=process_count)
  return _read(dataset, config.data.num_workers)


@dataclasses.dataclass(frozen=True)
class _EvalExample(grain.transforms.Map):
  """Position i of this process's padded eval stream -> example (or zeros when padding)."""
  source: object
  crop: transforms.EvalCrop
  process_index: int
  process_count: int

  def map(self, position):
    index = self.process_index + int(position) * self.process_count
    if index < len(self.source):
      example = self.crop.map(self.source[index])
      return dict(example, mask=np.bool_(True), index=np.int64(index))
    size = self.crop.image_size
    return dict(image=np.zeros((size, size, 3), np.float32), label=np.int32(0),
                mask=np.bool_(False), index=np.int64(-1))


def eval_num_batches(num_examples, batch_size, process_count=1):
  """Batches each process yields for an eval split (the same count on every process)."""
  local_batch = _check_sharding(batch_size, 0, process_count)
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def make_eval_iterator(config, split, batch_size, *, process_index=0, process_count=1):
  """Finite, deterministic iterator over a split: no augmentation, no degradation.

  batch_size is global; each process gets batch_size // process_count examples per batch from
  records process_index, process_index + process_count, ... Every batch has that static size:
  the last one is padded with zero images and `mask` False. Elements: image (b, S, S, 3)
  float32 in [-1, 1] (ADM center crop), label (b,) int32, mask (b,) bool, index (b,) int64
  (record index in the split, -1 for padding). The count is eval_num_batches(...) on every
  process, so collective ops stay in step.
  """
  local_batch = _check_sharding(batch_size, process_index, process_count)
  source = sources.make_source(config.data, split)
  num_batches = eval_num_batches(len(source), batch_size, process_count)
  example = _EvalExample(source, transforms.EvalCrop(config.tokenizer.image_size),
                         process_index, process_count)
  dataset = grain.MapDataset.range(num_batches * local_batch).map(example)
  return _read(dataset.batch(local_batch), config.data.num_workers)
