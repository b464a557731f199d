"""Any-resolution tokenizers: the image sizes one tokenizer trains and decodes at.

A tokenizer whose largest side is S = tokenizer.image_size (the side its R(n) schedule is built
on) supports every side r of the schedule's `best_res` (the decoder-snapped sides of R(n)) in
[tokenizer.min_image_size, S]. At side r the encoder runs the first decres2besttoken[r] latent
queries (the official `cur_max_token_num`), and that many codes decode back to r x r: fewer
tokens for a smaller image, as the official code extracts, samples and evaluates at a chosen
`image_size`. min_image_size 0 (the default) is a one-size tokenizer: sizes (S,), N tokens.

Training at several sizes (official `ResolutionDegradation.resize_batch_img`): each batch draws
one side. With probability data.dynamic_resolution_prob, r ~ U{min..S} snapped to the closest
best_res side (redrawn while the snapped side falls outside [min, S]); with probability
data.max_resolution_prob, S; otherwise data.train_image_size (0: S). The batch is resized to r
(area down), and with data.reduce_batch_at_large_sizes it keeps 50% of its rows at 480 < r <= 512
and 60% at 384 <= r <= 480 (the official thresholds, in pixels). The prefix length n is then
drawn below decres2besttoken[r] and the degraded target is built from the resized batch, so the
targets use the same R(n) tables at every size.

Static shapes: the sides a run can draw are known from the config (`TrainingSizes.sides`), each
with one token count and one batch size, so the compiled train-step variants stay a finite list.
"""
import dataclasses
from typing import Optional

from detailflow_jax import detail

# Official adjust_bs_by_resolution: (lowest side, highest side, fraction of the batch kept).
BATCH_FRACTIONS = ((481, 512, 0.5), (384, 480, 0.6))
# Official resize_batch_img: attempts at a random side inside [min, max] before giving up.
_DRAW_ATTEMPTS = 100


def min_image_size(tokenizer_cfg):
  """The smallest side a tokenizer supports (tokenizer.min_image_size; 0 or absent: its side)."""
  return int(tokenizer_cfg.get("min_image_size", 0) or tokenizer_cfg.image_size)


def closest_size(side, best_res):
  """The side of best_res nearest to `side`; on a tie the earlier one (official
  find_closest_resolution)."""
  closest = best_res[0]
  for r in best_res:
    if abs(r - side) < abs(closest - side):
      closest = r
  return closest


def _usable_token_count(schedule, n):
  # The encoder runs whole groups of latent queries, at least the token-causal ones.
  return n % schedule.group_size == 0 and n >= schedule.causal_num


def supported_sizes(tokenizer_cfg):
  """Sides this tokenizer encodes and decodes at, ascending; (image_size,) for one size.

  ValueError when tokenizer.min_image_size is out of range or admits a side whose token count
  the encoder cannot run.
  """
  schedule = detail.resolution_schedule(tokenizer_cfg)
  largest, smallest = schedule.image_size, min_image_size(tokenizer_cfg)
  if smallest == largest:
    return (largest,)
  if not schedule.min_decoder_size <= smallest <= largest:
    raise ValueError(
        f"tokenizer.min_image_size={smallest} must be in [min_decoder_size="
        f"{schedule.min_decoder_size}, image_size={largest}] (0: one size, image_size)")
  sizes = tuple(sorted(r for r in schedule.best_res if smallest <= r <= largest))
  unusable = {r: schedule.decres2besttoken[r] for r in sizes
              if not _usable_token_count(schedule, schedule.decres2besttoken[r])}
  if unusable:
    usable = [r for r in sizes if r > max(unusable)]
    raise ValueError(
        f"tokenizer.min_image_size={smallest} admits sides {sorted(unusable)} whose token counts "
        f"{list(unusable.values())} are not whole groups of group_size={schedule.group_size} "
        f">= causal_num={schedule.causal_num}; raise min_image_size to {usable[0]} or more")
  return sizes


def tokens_for_size(tokenizer_cfg, side):
  """Latent tokens of an image of `side` (official decres2besttoken[side]); N at image_size.
  ValueError listing the supported sides for any other side."""
  sizes = supported_sizes(tokenizer_cfg)
  if isinstance(side, bool) or not isinstance(side, int) or side not in sizes:
    raise ValueError(f"image_size={side!r} is not supported by this tokenizer; supported "
                     f"sizes: {list(sizes)}")
  return detail.resolution_schedule(tokenizer_cfg).decres2besttoken[side]


def batch_rows(batch, side, reduce_batch):
  """Rows of a batch kept at `side` (official adjust_bs_by_resolution when reduce_batch)."""
  if reduce_batch:
    for low, high, fraction in BATCH_FRACTIONS:
      if low <= side <= high:
        rows = int(batch * fraction)
        if rows < 1:
          raise ValueError(f"a batch of {batch} keeps no rows at side {side} (fraction "
                           f"{fraction}); raise data.batch_size")
        return rows
  return batch


@dataclasses.dataclass(frozen=True)
class TrainingSizes:
  """The per-batch side draw of one training config (hashable: it travels in grain transforms).

  best_res: every snapped side of the schedule (the draw snaps to the closest of all of them,
  then checks the range, as the official code); min_size / max_size: the range of the random
  side; base_size: the side of batches that draw neither branch.
  """
  best_res: tuple
  min_size: int
  max_size: int
  base_size: int
  dynamic_prob: float
  max_prob: float
  reduce_batch: bool

  def draw(self, rng):
    """One side for a batch, from a numpy Generator (official resize_batch_img's rule)."""
    u = rng.random()
    if self.min_size < self.max_size and u < self.dynamic_prob:
      for _ in range(_DRAW_ATTEMPTS):
        side = closest_size(int(rng.integers(self.min_size, self.max_size + 1)), self.best_res)
        if self.min_size <= side <= self.max_size:
          return side
      raise ValueError(f"no side of {list(self.best_res)} in [{self.min_size}, "
                       f"{self.max_size}] after {_DRAW_ATTEMPTS} draws")
    if u < self.dynamic_prob + self.max_prob:
      return self.max_size
    return self.base_size

  def sides(self):
    """Every side `draw` can return, ascending (one set of compiled variants each)."""
    sides = set()
    if self.min_size < self.max_size and self.dynamic_prob > 0:
      snapped = {closest_size(r, self.best_res) for r in range(self.min_size, self.max_size + 1)}
      sides |= {r for r in snapped if self.min_size <= r <= self.max_size}
    if self.max_prob > 0 or (self.dynamic_prob > 0 and self.min_size == self.max_size):
      sides.add(self.max_size)
    if self.dynamic_prob + self.max_prob < 1:
      sides.add(self.base_size)
    return tuple(sorted(sides))

  def rows(self, batch, side):
    return batch_rows(batch, side, self.reduce_batch)


def training_sizes(config) -> Optional[TrainingSizes]:
  """The side draw of a tokenizer training config, or None for today's single-size training
  (no random or largest-size draw, train_image_size = image_size, no batch reduction there).

  Config keys: tokenizer.min_image_size / tokenizer.image_size (the range, smallest / largest),
  data.dynamic_resolution_prob, data.max_resolution_prob, data.train_image_size,
  data.reduce_batch_at_large_sizes. ValueError names the key that is out of range.
  """
  tok, data = config.tokenizer, config.data
  dynamic_prob = float(data.get("dynamic_resolution_prob", 0.0))
  max_prob = float(data.get("max_resolution_prob", 0.0))
  reduce_batch = bool(data.get("reduce_batch_at_large_sizes", False))
  for name, p in (("dynamic_resolution_prob", dynamic_prob), ("max_resolution_prob", max_prob)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"data.{name}={p} must be in [0, 1]")
  if dynamic_prob + max_prob > 1.0:
    raise ValueError(f"data.dynamic_resolution_prob + data.max_resolution_prob = "
                     f"{dynamic_prob + max_prob} must be <= 1")
  sizes = supported_sizes(tok)
  largest = int(tok.image_size)
  base = int(data.get("train_image_size", 0) or largest)
  if base not in sizes:
    raise ValueError(f"data.train_image_size={base} must be one of the tokenizer's sizes "
                     f"{list(sizes)} (set tokenizer.min_image_size to widen them; 0: image_size)")
  if dynamic_prob > 0 and len(sizes) == 1:
    raise ValueError(f"data.dynamic_resolution_prob={dynamic_prob} needs more than one size: "
                     f"set tokenizer.min_image_size below image_size={largest}")
  result = TrainingSizes(
      best_res=tuple(detail.resolution_schedule(tok).best_res), min_size=min_image_size(tok),
      max_size=largest, base_size=base, dynamic_prob=dynamic_prob, max_prob=max_prob,
      reduce_batch=reduce_batch)
  one_size = result.sides() == (largest,)
  if one_size and batch_rows(data.batch_size, largest, reduce_batch) == data.batch_size:
    return None
  return result
