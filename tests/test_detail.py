"""R(n) tables against the official ones, prefix/noise sampling statistics, masks."""
import json

import ml_collections
import numpy as np
import pytest

from detailflow_jax.config import defaults
from detailflow_jax import detail
from tests.conftest import parity_params

TABLE_FIELDS = ("token2res", "token2dec_res", "token2enc_res", "token2dec_out_res",
                "decres2besttoken", "encres2besttoken", "decres2mintoken", "decres2maxtoken")


@pytest.fixture(scope="module")
def official_tables(parity_resolution):
  return json.loads((parity_resolution / "tables.json").read_text())


def schedule_from_params(p):
  return detail.ResolutionSchedule(
      image_size=p["max_img_size"], num_tokens=p["max_token_num"], group_size=p["group_size"],
      causal_num=p["causal_num"], power=p["p"], min_decoder_size=p["min_dec_res"],
      encoder_patch_size=p["enc_patch_size"], decoder_patch_size=p["dec_patch_size"])


@pytest.mark.parametrize("key", parity_params("resolution/tables.json", list))
def test_tables_equal_official(official_tables, key):
  official = official_tables[key]
  p = official["params"]
  schedule = schedule_from_params(p)
  assert list(schedule.token_list) == official["token_list"]
  assert list(detail.token_list(p["max_token_num"], p["group_size"], p["causal_num"])) == (
      official["token_list"])
  assert [schedule.content_resolution(n) for n in range(1, p["max_token_num"] + 1)] == (
      official["token_res_map_all"])
  for field in TABLE_FIELDS:
    ours = [(str(k), v) for k, v in getattr(schedule, field).items()]
    assert ours == list(official[field].items()), field  # values and insertion order
  assert list(schedule.best_res) == official["best_res"]
  assert list(schedule.best_token) == official["best_token"]
  assert schedule.output_sizes() == tuple(sorted(set(official["token2dec_out_res"].values())))
  for n, side in official["token2dec_out_res"].items():
    assert schedule.decoder_size(int(n)) == side


def test_paper_config_schedule():
  schedule = detail.resolution_schedule(defaults.tokenizer_model_config())
  # The digest's N=128 mapping (n: content / decoder side).
  expected = {1: (1, 16), 8: (21, 32), 16: (44, 48), 24: (67, 80), 32: (88, 96),
              48: (128, 128), 64: (164, 176), 80: (196, 208), 96: (223, 224), 128: (256, 256)}
  for n, (res, side) in expected.items():
    assert (schedule.content_resolution(n), schedule.decoder_size(n)) == (res, side)
  assert schedule.output_sizes() == (16, 32, 48, 80, 96, 112, 128, 160, 176, 192, 208, 224, 240,
                                     256)
  assert schedule.decoder_size(13) == 48  # off token_list: same rule, R(13)=36 -> 48
  # Built once per schedule: another config object with the same fields gets the same tables.
  assert detail.resolution_schedule(defaults.tokenizer_model_config()) is schedule


def test_snap_to_patch_rounding_down_branch():
  # Side 250 with patch 16 in a 250-px image: 256^2 fits the 16x16-patch grid (256 px), so up.
  assert detail.snap_to_patch(250, 16, 250) == 256
  assert detail.snap_to_patch(5, 16, 256) == 16
  # Largest grid ceil(40/16)*16 = 48; side 47 -> 48 fits. Patch 32 on a 40-px image: grid 64.
  assert detail.snap_to_patch(47, 16, 40) == 48
  assert detail.snap_to_patch(33, 32, 32) == 32  # 64^2 > 32^2: rescaled, rounded down


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tokens=130), "num_tokens=130 must be a positive multiple of group_size=8"),
    (dict(causal_num=12), "causal_num=12 must be a multiple of group_size=8"),
    (dict(causal_num=0), "causal_num=0 must be a multiple of group_size=8"),
    (dict(min_decoder_size=24), "min_decoder_size=24 must be a multiple of the encoder"),
    (dict(encoder_patch_size=32), "encoder patch_size=32 must be <= decoder patch_size=16"),
    (dict(image_size=250), "image_size=250 must be a multiple of the decoder patch_size=16"),
    (dict(power=0.0), "degradation_power=0.0 must be > 0"),
])
def test_schedule_validation(kwargs, message):
  args = dict(image_size=256, num_tokens=128, group_size=8, causal_num=8, power=1.5,
              min_decoder_size=16, encoder_patch_size=16, decoder_patch_size=16)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    detail.ResolutionSchedule(**args)


def test_content_resolution_range_error():
  with pytest.raises(ValueError, match=r"n=0 must be in \[1, num_tokens=128\]"):
    detail.content_resolution(0, 256, 128, 1.5)
  with pytest.raises(ValueError, match=r"n=129"):
    schedule = detail.resolution_schedule(defaults.tokenizer_model_config())
    schedule.decoder_size(129)


def test_prefix_length_distribution():
  rng = np.random.default_rng(0)
  draws = np.array([detail.sample_prefix_length(rng, 128, 8, 8, 0.2) for _ in range(20_000)])
  full = np.mean(draws == 128)
  assert abs(full - 0.8) < 0.01, full
  valid = set(detail.token_list(128, 8, 8))
  assert set(np.unique(draws)) <= valid
  degraded = draws[draws != 128]
  # u ~ U{1..120}: each of n = 1..8 has probability 1/120 among degraded draws; n = 16 gets
  # u in 9..16 (8/120); n = 120 gets u in 113..120.
  assert abs(np.mean(degraded == 3) - 1 / 120) < 0.006
  assert abs(np.mean(degraded == 16) - 8 / 120) < 0.015
  assert degraded.max() == 120
  assert all(detail.sample_prefix_length(rng, 128, 8, 8, 0.0) == 128 for _ in range(100))
  assert all(detail.sample_prefix_length(rng, 128, 8, 8, 1.0) < 128 for _ in range(100))


def test_prefix_length_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"degrade_prob=1.5 must be in \[0, 1\]"):
    detail.sample_prefix_length(rng, 128, 8, 8, 1.5)
  with pytest.raises(ValueError, match="num_tokens=8 >= group_size=8 \\+ causal_num=8"):
    detail.sample_prefix_length(rng, 8, 8, 8, 1.0)


def test_noise_position_rule():
  rng = np.random.default_rng(1)
  assert detail.sample_noise_position(rng, 1, 8, 8, 1.0) == -1
  assert all(detail.sample_noise_position(rng, 64, 8, 8, 0.0) == -1 for _ in range(50))
  small = [detail.sample_noise_position(rng, 5, 8, 8, 1.0) for _ in range(2000)]
  assert set(small) == {0, 1, 2, 3, 4}  # n <= causal_num: any single token of the prefix
  large = np.array([detail.sample_noise_position(rng, 32, 8, 8, 1.0) for _ in range(4000)])
  # q ~ U{0..23}: 0..7 stay (1/24 each), 8..15 -> 8, 16..23 -> 16; never the last group (24).
  values, counts = np.unique(large, return_counts=True)
  assert list(values) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 16]
  assert abs(counts[-1] / len(large) - 8 / 24) < 0.03
  assert abs(counts[0] / len(large) - 1 / 24) < 0.015
  half = [detail.sample_noise_position(rng, 32, 8, 8, 0.5) for _ in range(4000)]
  assert abs(np.mean(np.array(half) == -1) - 0.5) < 0.03
  # Every n > causal_num of N=128: noise never reaches the last group.
  for n in detail.token_list(128, 8, 8)[8:]:
    for _ in range(200):
      q = detail.sample_noise_position(rng, n, 8, 8, 1.0)
      assert 0 <= q and detail.noise_span_end(q, 8, 8) <= n - 8


def test_noise_position_errors_and_span():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="n=12 is not a prefix length"):
    detail.sample_noise_position(rng, 12, 8, 8, 1.0)
  with pytest.raises(ValueError, match=r"prob=-0.1 must be in \[0, 1\]"):
    detail.sample_noise_position(rng, 16, 8, 8, -0.1)
  assert detail.noise_span_end(3, 8, 8) == 4
  assert detail.noise_span_end(16, 8, 8) == 24
  with pytest.raises(ValueError, match="position=-1"):
    detail.noise_span_end(-1, 8, 8)


def test_gpt_mask_matches_official(parity_gpt):
  config = parity_gpt.config
  mask = parity_gpt.io["group_causal_mask"]
  np.testing.assert_array_equal(
      detail.gpt_attention_mask(mask.shape[0], config["group_size"], config["causal_num"]), mask)


def test_schedule_reads_tiny_layout():
  tok = defaults.tokenizer_model_config()
  tok.update(ml_collections.ConfigDict(dict(image_size=32, num_tokens=16, group_size=4,
                                            causal_num=4, min_decoder_size=8)))
  tok.encoder.patch_size = tok.decoder.patch_size = 8
  schedule = detail.resolution_schedule(tok)
  assert schedule.output_sizes() == (8, 16, 24, 32)
  assert schedule.token2dec_out_res == {1: 8, 2: 8, 3: 8, 4: 16, 8: 24, 12: 32, 16: 32}


@pytest.mark.parametrize("group_size,causal_num", [(4, 4), (4, 8), (1, 1)])
def test_bidirectional_latent_mask_differs_only_above_the_group_causal_limit(group_size,
                                                                           causal_num):
  p, m = 5, 16
  causal = detail.encoder_attention_mask(p, m, group_size, causal_num)
  both = detail.encoder_attention_mask(p, m, group_size, causal_num, "bidirectional")
  np.testing.assert_array_equal(causal, detail.encoder_attention_mask(
      p, m, group_size, causal_num, "group_causal"))
  # Patch rows and latent-to-patch columns are the same: patches see patches only.
  np.testing.assert_array_equal(both[:p], causal[:p])
  np.testing.assert_array_equal(both[:, :p], causal[:, :p])
  assert both[p:, p:].all()
  # Latent i sees j > i only inside its own group past the causal region; those entries (and
  # only those) are what the bidirectional mask adds.
  i, j = np.arange(m)[:, None], np.arange(m)[None, :]
  limit = np.where(i < causal_num, i, (i // group_size + 1) * group_size - 1)
  np.testing.assert_array_equal(both[p:, p:] & ~causal[p:, p:], j > limit)
  hidden = int((j > limit).sum())
  expected = m * (m - 1) // 2 - (m - causal_num) // group_size * (
      group_size * (group_size - 1) // 2)
  assert hidden == expected
  with pytest.raises(ValueError, match="latent_mask"):
    detail.encoder_attention_mask(p, m, group_size, causal_num, "causal")
