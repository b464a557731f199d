"""Area / bicubic resampling and degraded targets against the official resize_imgs outputs."""
import json

import numpy as np
import pytest
from conftest import max_relative_error

from detailflow_jax.data import degrade


@pytest.fixture(scope="module")
def official(parity_resolution):
  arrays = dict(np.load(parity_resolution / "resize.npz"))
  nhwc = {k: v.transpose(0, 2, 3, 1) for k, v in arrays.items()}
  cases = json.loads((parity_resolution / "resize_cases.json").read_text())
  return nhwc, cases


def test_resize_matches_official(official):
  arrays, cases = official
  x = arrays["x"]
  if not cases["cases"]:
    pytest.skip("resize_cases.json lists no resize cases")
  for case in cases["cases"]:
    down = degrade.resize_images(x, case["tgt_res"])
    up = degrade.resize_images(down, case["dec_res"])
    target = degrade.degraded_target(x, case["tgt_res"], case["dec_res"])
    assert down.shape == arrays[case["down"]].shape and up.shape == arrays[case["up"]].shape
    assert max_relative_error(down, arrays[case["down"]]) < 1e-5, case["t"]
    assert max_relative_error(up, arrays[case["up"]]) < 1e-5, case["t"]
    assert max_relative_error(target, arrays[case["up"]]) < 1e-5, case["t"]


def test_drawn_degraded_target_matches_official(official):
  """get_input_output_img's output for the (t, sizes) it drew, as resize_cases.json records."""
  arrays, cases = official
  drawn = cases.get("get_input_output_img")
  if drawn is None:
    pytest.skip("resize_cases.json records no get_input_output_img draw")
  target = degrade.degraded_target(arrays["x"], drawn["tgt_res"], drawn["dec_res"])
  assert target.shape == arrays[drawn["array"]].shape
  assert max_relative_error(target, arrays[drawn["array"]]) < 1e-5


def test_area_integer_ratio_is_block_mean():
  x = np.random.default_rng(0).standard_normal((2, 12, 12, 3)).astype(np.float32)
  expected = x.reshape(2, 4, 3, 4, 3, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(degrade.resize_images(x, 4), expected, atol=1e-6)


def test_area_fractional_bins_overlap():
  # 5 -> 3: bins [0, 2), [1, 4), [3, 5) (floor start, ceil end), as adaptive average pooling.
  index, weight = degrade.area_taps(5, 3)
  spans = [sorted(set(i[w > 0].tolist())) for i, w in zip(index, weight)]
  assert spans == [[0, 1], [1, 2, 3], [3, 4]]
  np.testing.assert_allclose(weight.sum(axis=1), 1.0, atol=1e-7)


def test_bicubic_keeps_constants_and_equal_size_is_identity():
  x = np.full((1, 3, 3, 3), 0.25, np.float32)
  np.testing.assert_allclose(degrade.resize_images(x, 7), 0.25, atol=1e-6)
  y = np.random.default_rng(1).standard_normal((1, 6, 6, 3)).astype(np.float32)
  assert degrade.resize_images(y, 6) is y
  np.testing.assert_array_equal(degrade.degraded_target(y, 6, 6), y)


def test_degraded_target_errors():
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match=r"content_res=9 must be in \[1, image side 8\]"):
    degrade.degraded_target(x, 9, 16)
  with pytest.raises(ValueError, match="decoder_size=0"):
    degrade.degraded_target(x, 4, 0)
  with pytest.raises(ValueError, match=r"must be \(b, H, W, C\)"):
    degrade.degraded_target(x[0], 4, 8)
  with pytest.raises(ValueError, match="square NHWC"):
    degrade.resize_images(np.zeros((1, 8, 6, 3), np.float32), 4)
