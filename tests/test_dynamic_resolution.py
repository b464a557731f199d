"""Any-resolution tokenizers: supported sizes, token counts per size, the per-batch side draw and
the dynamic-resolution batches, against the official ResolutionDegradation tables."""
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from conftest import parity_params

from detailflow_jax import dynamic_resolution
from detailflow_jax import detail
from detailflow_jax.config import defaults
from detailflow_jax.config.files import load_config_file
from detailflow_jax.data import degrade
from detailflow_jax.data import pipeline
from detailflow_jax.train import tokenizer_trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLES = "resolution/tables.json"


class NoGan:
  """The one objective method the variant lists read: a run without a discriminator."""

  def gan_active(self, step):
    del step
    return False


def tokenizer_from_params(p, min_image_size=0):
  """A `tokenizer` config section with the schedule of an official tables.json entry."""
  c = defaults.tokenizer_model_config()
  c.image_size, c.num_tokens, c.group_size = p["max_img_size"], p["max_token_num"], p["group_size"]
  c.causal_num, c.degradation_power, c.min_decoder_size = p["causal_num"], p["p"], p["min_dec_res"]
  c.encoder.patch_size, c.decoder.patch_size = p["enc_patch_size"], p["dec_patch_size"]
  c.min_image_size = min_image_size
  return c


def smallest_usable_side(official):
  """The smallest official best side whose token count the encoder can run (whole groups, at
  least causal_num and group_size + causal_num so batches there can be degraded)."""
  p = official["params"]
  for side in sorted(official["best_res"]):
    n = official["decres2besttoken"][str(side)]
    if side >= p["min_dec_res"] and n % p["group_size"] == 0 and \
        n >= p["group_size"] + p["causal_num"]:
      return side
  raise AssertionError("no usable side")


@pytest.fixture(scope="module")
def official_tables(parity_resolution):
  return json.loads((parity_resolution / "tables.json").read_text())


@pytest.mark.parametrize("key", parity_params(TABLES, list))
def test_sizes_and_token_counts_equal_official(official_tables, key):
  official = official_tables[key]
  p = official["params"]
  smallest = smallest_usable_side(official)
  tok = tokenizer_from_params(p, smallest)
  expected = sorted(r for r in official["best_res"] if smallest <= r <= p["max_img_size"])
  assert list(dynamic_resolution.supported_sizes(tok)) == expected
  for side in expected:
    assert dynamic_resolution.tokens_for_size(tok, side) == official["decres2besttoken"][str(side)]
  assert dynamic_resolution.tokens_for_size(tok, p["max_img_size"]) == p["max_token_num"]
  # The random side snaps to the closest official best side and stays in range: every snapped
  # side of [smallest, max] is reachable, and nothing else.
  sizes = dynamic_resolution.TrainingSizes(
      best_res=tuple(official["best_res"]), min_size=smallest, max_size=p["max_img_size"],
      base_size=p["max_img_size"], dynamic_prob=1.0, max_prob=0.0, reduce_batch=False)
  rng = np.random.default_rng(0)
  drawn = {sizes.draw(rng) for _ in range(2000)}
  assert drawn == set(sizes.sides()) == set(expected)


@pytest.mark.parametrize("key", parity_params(TABLES, list))
def test_dynamic_batches_follow_official_tables(official_tables, key):
  """Each batch: side from the official best sides, n at most that side's official token count
  and on the official token list, target = area to token2res[n], bicubic to token2dec_out_res[n]
  of the batch resized to its side (the image itself when n is the side's token count)."""
  official = official_tables[key]
  p = official["params"]
  smallest = smallest_usable_side(official)
  tok = tokenizer_from_params(p, smallest)
  sizes = dynamic_resolution.TrainingSizes(
      best_res=tuple(official["best_res"]), min_size=smallest, max_size=p["max_img_size"],
      base_size=p["max_img_size"], dynamic_prob=0.8, max_prob=0.0, reduce_batch=False)
  transform = pipeline.DegradeBatch(detail.resolution_schedule(tok), seed=3, degrade_prob=0.5,
                                    correction_prob=1.0, sizes=sizes)
  s = p["max_img_size"]
  images = np.random.default_rng(1).uniform(-1, 1, (2, s, s, 3)).astype(np.float32)
  batch = dict(image=images, label=np.arange(2))
  seen_sides, degraded = set(), 0
  for index in range(24):
    out = transform.map_with_index(index, batch)
    side, n = out["image"].shape[1], int(out["num_tokens"])
    seen_sides.add(side)
    best = official["decres2besttoken"][str(side)]
    assert side in official["best_res"] and smallest <= side <= s
    assert n <= best and n in official["token_list"]
    resized = degrade.resize_images(images, side)
    np.testing.assert_array_equal(out["image"], resized)
    if n == best:
      np.testing.assert_array_equal(out["target"], resized)
    else:
      degraded += 1
      expected = degrade.degraded_target(resized, official["token2res"][str(n)],
                                         official["token2dec_out_res"][str(n)])
      assert out["target"].shape[1] == official["token2dec_out_res"][str(n)]
      np.testing.assert_array_equal(out["target"], expected)
    if 0 <= int(out["noise_position"]):
      assert int(out["noise_position"]) < n
  assert len(seen_sides) >= min(3, len(sizes.sides())) and degraded > 3


def test_closest_size_tie_goes_to_the_earlier_side():
  assert dynamic_resolution.closest_size(18, (8, 16, 20, 24)) == 16   # |18-16| = |18-20|
  assert dynamic_resolution.closest_size(19, (8, 16, 20, 24)) == 20
  assert dynamic_resolution.closest_size(3, (8, 16)) == 8


def test_draw_branches_and_batch_reduction():
  sizes = dynamic_resolution.TrainingSizes(
      best_res=(16, 32, 48, 64), min_size=16, max_size=64, base_size=32, dynamic_prob=0.5,
      max_prob=0.25, reduce_batch=True)
  rng = np.random.default_rng(0)
  draws = np.array([sizes.draw(rng) for _ in range(8000)])
  # Side 64: the max branch (25%) and the random sides 57..64 of U{16..64} (56 ties 48 and 64
  # and goes to 48); side 32: the 25% that draw neither branch and the random sides 25..40.
  assert abs(np.mean(draws == 64) - (0.25 + 0.5 * 8 / 49)) < 0.02
  assert abs(np.mean(draws == 32) - (0.25 + 0.5 * 16 / 49)) < 0.02
  assert sizes.sides() == (16, 32, 48, 64)
  # Official adjust_bs_by_resolution thresholds (pixels).
  assert [dynamic_resolution.batch_rows(10, side, True) for side in (383, 384, 480, 481, 512,
                                                                      513)] == [10, 6, 6, 5, 5, 10]
  assert dynamic_resolution.batch_rows(10, 512, False) == 10


def tiny_tokenizer(min_image_size):
  config = load_config_file(str(REPO / "configs" / "tokenizer_tiny.py"))
  config.tokenizer.min_image_size = min_image_size
  return config


def test_tiny_sizes_and_one_size_default():
  config = tiny_tokenizer(16)
  assert dynamic_resolution.supported_sizes(config.tokenizer) == (16, 20, 24, 28, 32)
  assert [dynamic_resolution.tokens_for_size(config.tokenizer, s) for s in (16, 20, 24, 28, 32)] \
      == [12, 16, 20, 24, 32]
  one = tiny_tokenizer(0)
  assert dynamic_resolution.supported_sizes(one.tokenizer) == (32,)
  assert dynamic_resolution.training_sizes(one) is None   # today's single-size pipeline
  assert dynamic_resolution.training_sizes(load_config_file(
      str(REPO / "configs" / "tokenizer_128.py"))) is None
  with pytest.raises(ValueError, match=r"image_size=18 is not supported by this tokenizer; "
                                       r"supported sizes: \[16, 20, 24, 28, 32\]"):
    dynamic_resolution.tokens_for_size(config.tokenizer, 18)


@pytest.mark.parametrize("change, message", [
    (dict(min_image_size=8), r"tokenizer.min_image_size=8 must be in \[min_decoder_size=16, "
                             r"image_size=32\]"),
    (dict(train_image_size=18), r"data.train_image_size=18 must be one of the tokenizer's sizes "
                                r"\[16, 20, 24, 28, 32\]"),
    (dict(dynamic_resolution_prob=0.7, max_resolution_prob=0.5),
     r"dynamic_resolution_prob \+ data.max_resolution_prob = 1.2 must be <= 1"),
    (dict(max_resolution_prob=-0.1), r"data.max_resolution_prob=-0.1 must be in \[0, 1\]"),
])
def test_bad_settings_name_the_key(change, message):
  config = tiny_tokenizer(16)
  config.data.dynamic_resolution_prob = 0.5
  if "min_image_size" in change:
    config.tokenizer.min_image_size = change.pop("min_image_size")
  config.data.update(change)
  with pytest.raises(ValueError, match=message):
    dynamic_resolution.training_sizes(config)


def test_sides_whose_token_count_the_encoder_cannot_run_are_refused():
  tok = defaults.tokenizer_model_config()   # N = 128 at 256 px: side 16 takes 6 tokens
  tok.min_image_size = 16
  with pytest.raises(ValueError, match=r"admits sides \[16\] whose token counts \[6\] .* raise "
                                       r"min_image_size to 32"):
    dynamic_resolution.supported_sizes(tok)
  one = tiny_tokenizer(0)
  one.data.dynamic_resolution_prob = 0.5
  with pytest.raises(ValueError, match="needs more than one size"):
    dynamic_resolution.training_sizes(one)


def smoke_dynres(fake_fmnist_dir, steps):
  config = load_config_file(str(REPO / "configs" / "tokenizer_tiny.py") + ":smoke_dynres")
  config.data.fashion_mnist_dir = str(fake_fmnist_dir)
  config.train.num_steps = steps
  config.train.checkpoint_every = steps
  return config


def test_pipeline_batches_at_their_drawn_sides(fake_fmnist_dir):
  config = smoke_dynres(fake_fmnist_dir, 4)
  iterator = pipeline.make_tokenizer_train_iterator(config)
  dataset = pipeline.make_tokenizer_train_dataset(config)
  sides = []
  for index in range(12):
    batch = next(iterator)
    side = batch["image"].shape[1]
    sides.append(side)
    assert side == dataset[index]["image"].shape[1]
    assert batch["target"].shape == batch["image"].shape   # degrade_prob 0: n = tokens of side
    assert int(batch["num_tokens"]) == {28: 24, 32: 32}[side]
    assert batch["label"].shape == (8,)
  assert set(sides) == {28, 32}


def test_training_compiles_every_side_and_steps_through_them(tmp_path, fake_fmnist_dir, capsys):
  flags.FLAGS.mark_as_parsed()
  config = smoke_dynres(fake_fmnist_dir, 6)
  schedule = detail.resolution_schedule(config.tokenizer)
  sides = pipeline.DegradeBatch(schedule, config.seed, 0.0, 1.0,
                                dynamic_resolution.training_sizes(config))
  assert {sides.side(i) for i in range(6)} == {28, 32}   # the 6 steps meet both sides
  state = tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "dynres"))
  assert int(jax.device_get(state.step)) == 6
  out = capsys.readouterr().out
  # Start-up lists every side with its token count, batch and output sizes; all are warmed.
  for line in ("side 28: 24 tokens, batch 8, outputs [28], 1 variants",
               "side 32: 32 tokens, batch 8, outputs [32], 1 variants",
               "compiled 2 train-step variants"):
    assert line in out
  variants = tokenizer_trainer.training_variants(config, schedule, NoGan())
  assert [(v.image_size, v.batch_size, v.output_size) for v in variants] == [
      (28, 8, 28), (32, 8, 32)]
  saved = json.loads((tmp_path / "dynres" / "config.json").read_text())
  assert saved["tokenizer"]["min_image_size"] == 28


def test_one_size_variants_are_unchanged():
  config = tiny_tokenizer(0)
  schedule = detail.resolution_schedule(config.tokenizer)
  objective = NoGan()
  old = tokenizer_trainer.step_variants(config, schedule, objective)
  new = tokenizer_trainer.training_variants(config, schedule, objective)
  assert [(v.output_size, v.correction, v.gan) for v in new] == old
  assert {(v.image_size, v.batch_size) for v in new} == {(32, config.data.batch_size)}
  assert sorted({v.output_size for v in new}) == [16, 20, 24, 28, 32]


def test_config_keys_default_to_one_size():
  c = defaults.tokenizer_training_config()
  assert c.tokenizer.min_image_size == 0
  assert (c.data.dynamic_resolution_prob, c.data.max_resolution_prob, c.data.train_image_size,
          c.data.reduce_batch_at_large_sizes) == (0.0, 0.0, 0, False)
  assert isinstance(ml_collections.ConfigDict(c.to_dict()), ml_collections.ConfigDict)
