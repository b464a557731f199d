"""Discriminators: PatchGAN from scratch, the frozen-DINO discriminator and its weight loaders,
and the composed generator / discriminator adversarial losses."""
import collections
import functools
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from detailflow_jax.losses import adversarial
from detailflow_jax.losses import discriminator
from detailflow_jax.losses import gan
from detailflow_jax.models import dino
from detailflow_jax.models import weight_files

@pytest.fixture(autouse=True)
def _fast_compiling_rng():
  # XLA:CPU compiles partitionable threefry several times slower; the random streams differ
  # but every assertion here holds for any stream. Scoped to each test of this module.
  with jax.threefry_partitionable(False):
    yield


# Tiny DINO: width 32, 12 blocks (taps 2, 5, 8, 11 exist), 2 heads, 4x4 patches on a 4x4 grid,
# so the backbone input is 16x16 and every head sees 16 tokens. The discriminator tests use a
# 3-block file (tap 2: 2 heads) to keep compile times short.
WIDTH, DEPTH, HEADS, PATCH, GRID = 32, 12, 2, 4, 4
DISC_DEPTH, DISC_HEADS = 3, 2


def tiny_dino_state_dict(seed=0, depth=DEPTH):
  rng = np.random.RandomState(seed)
  r = lambda *shape: (0.2 * rng.randn(*shape)).astype(np.float32)
  sd = {"cls_token": r(1, 1, WIDTH), "pos_embed": r(1, 1 + GRID * GRID, WIDTH),
        "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
        "norm.weight": r(WIDTH), "norm.bias": r(WIDTH)}
  for i in range(depth):
    p = f"blocks.{i}."
    sd.update({p + "norm1.weight": 1 + r(WIDTH), p + "norm1.bias": r(WIDTH),
               p + "attn.qkv.weight": r(3 * WIDTH, WIDTH), p + "attn.qkv.bias": r(3 * WIDTH),
               p + "attn.proj.weight": r(WIDTH, WIDTH), p + "attn.proj.bias": r(WIDTH),
               p + "norm2.weight": 1 + r(WIDTH), p + "norm2.bias": r(WIDTH),
               p + "mlp.fc1.weight": r(4 * WIDTH, WIDTH), p + "mlp.fc1.bias": r(4 * WIDTH),
               p + "mlp.fc2.weight": r(WIDTH, 4 * WIDTH), p + "mlp.fc2.bias": r(WIDTH)})
  return sd


def numpy_dino_readouts(sd, x):
  """Reference forward of the timm ViT in numpy (x: ImageNet-normalised NHWC 16x16)."""
  b = x.shape[0]
  patches = x.reshape(b, GRID, PATCH, GRID, PATCH, 3).transpose(0, 1, 3, 5, 2, 4)
  w = sd["patch_embed.proj.weight"].reshape(WIDTH, -1)          # (C, 3*P*P) in (ch, i, j)
  tokens = patches.reshape(b, GRID * GRID, -1) @ w.T + sd["patch_embed.proj.bias"]
  h = np.concatenate([np.repeat(sd["cls_token"], b, 0), tokens], 1) + sd["pos_embed"]

  def ln(v, p):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[p + ".weight"] + sd[p + ".bias"]

  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  outs = [h[:, 1:] + h[:, :1]]
  for i in range(DEPTH):
    p = f"blocks.{i}."
    qkv = ln(h, p + "norm1") @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
    qkv = qkv.reshape(b, -1, 3, HEADS, WIDTH // HEADS).transpose(2, 0, 3, 1, 4)
    s = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(WIDTH // HEADS)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ qkv[2]
    h = h + a.transpose(0, 2, 1, 3).reshape(b, -1, WIDTH) @ sd[p + "attn.proj.weight"].T \
        + sd[p + "attn.proj.bias"]
    m = gelu(ln(h, p + "norm2") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    h = h + m @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    if i in (2, 5, 8, 11):
      outs.append(h[:, 1:] + h[:, :1])
  return outs


def write_torch_zip(path, state_dict, monkeypatch):
  """Writes `state_dict` in torch.save's zip layout without torch: the pickle references
  torch._utils._rebuild_tensor_v2 and torch.FloatStorage through stand-in modules."""
  fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise NotImplementedError

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  float_storage = type("FloatStorage", (), {"__module__": "torch"})
  fake_torch.FloatStorage, fake_torch._utils = float_storage, fake_utils
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)
  records = {}

  class StorageRef:
    def __init__(self, key):
      self.key = key

  class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, StorageRef):
        return ("storage", float_storage, obj.key, "cpu", records[obj.key].size)
      return None

    def reducer_override(self, obj):
      if isinstance(obj, np.ndarray):
        key = str(len(records))
        records[key] = np.ascontiguousarray(obj, np.float32).ravel()
        stride = tuple(s // 4 for s in np.ascontiguousarray(obj).strides)
        return _rebuild_tensor_v2, (StorageRef(key), 0, obj.shape, stride, False,
                                    collections.OrderedDict())
      return NotImplemented

  import io
  buf = io.BytesIO()
  TorchPickler(buf, protocol=2).dump(collections.OrderedDict(state_dict))
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    for key, data in records.items():
      zf.writestr(f"archive/data/{key}", data.tobytes())
    zf.writestr("archive/version", "3\n")


def loss_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      discriminator="dino", dino_weights="", dino_num_heads=HEADS, gan_weight=0.2,
      gan_start_step=10, lecam_weight=0.001, consistency_weight=4.0, diff_augment=True))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("dino") / "dino_tiny.safetensors"
  save_file(tiny_dino_state_dict(), str(path))
  return str(path)


@pytest.fixture(scope="module")
def dino_disc(tmp_path_factory):
  path = tmp_path_factory.mktemp("dino") / "dino_tiny6.npz"
  np.savez(path, **tiny_dino_state_dict(1, DISC_DEPTH))
  module, params, state = discriminator.make_discriminator(
      loss_config(dino_weights=str(path)), 16, jax.random.PRNGKey(0))
  apply = jax.jit(functools.partial(discriminator.discriminator_apply, module))
  return module, params, state, apply


@pytest.fixture(scope="module")
def tiny_patchgan():
  cfg = loss_config(discriminator="patchgan", patchgan_channels=8, patchgan_layers=2,
                    patchgan_spectral_norm=True)
  module, params, state = discriminator.make_discriminator(cfg, 16, jax.random.PRNGKey(0))
  return module, params, state


# ------------------------------------------------------------------------------ DINO loading


def test_dino_weight_formats_agree(dino_file, tmp_path, monkeypatch):
  sd = tiny_dino_state_dict()
  np.savez(tmp_path / "dino.npz", **{"module." + k: v for k, v in sd.items()})
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "dino.pth")
  except ImportError:
    write_torch_zip(tmp_path / "dino.pth", sd, monkeypatch)
  ref, arch = dino.load_dino(dino_file, num_heads=HEADS)
  assert arch == dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, grid=GRID)
  for other in ("dino.npz", "dino.pth"):
    params, _ = dino.load_dino(str(tmp_path / other), num_heads=HEADS)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)
  raw = weight_files.read_weight_file(str(tmp_path / "dino.pth"))
  np.testing.assert_array_equal(raw["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
  # the key third of every qkv bias is zeroed, q and v are kept
  bias = ref["blocks_0"]["attn_qkv"]["bias"]
  assert np.all(bias[WIDTH:2 * WIDTH] == 0)
  np.testing.assert_array_equal(bias[:WIDTH], sd["blocks.0.attn.qkv.bias"][:WIDTH])


def test_torch_reader_on_real_torch_files(tmp_path):
  torch = pytest.importorskip("torch")
  import argparse  # pylint: disable=g-import-not-at-top
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {"t": base.t(),                          # non-contiguous view
           "slice": base[1:, 2:],                  # storage offset
           "half": base.to(torch.bfloat16),
           "param": torch.nn.Parameter(torch.ones(3)),
           "ints": torch.tensor([1, 2, 3]),
           "nested": {"w": torch.full((2,), 7.0)}}
  torch.save({"model": state, "args": argparse.Namespace(lr=1.0), "steps": 5}, tmp_path / "ck.pt")
  out = weight_files.read_weight_file(str(tmp_path / "ck.pt"))
  np.testing.assert_array_equal(out["t"], base.t().numpy())
  np.testing.assert_array_equal(out["slice"], base[1:, 2:].numpy())
  np.testing.assert_array_equal(out["half"].astype(np.float32), base.numpy())
  np.testing.assert_array_equal(out["param"], np.ones(3, np.float32))
  assert out["ints"].dtype == np.int64 and out["nested.w"].tolist() == [7.0, 7.0]
  torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match="not a torch zip archive"):
    weight_files.read_weight_file(str(tmp_path / "legacy.pt"))


def test_dino_loader_errors(tmp_path):
  missing = str(tmp_path / "nope.pth")
  with pytest.raises(FileNotFoundError, match=r"nope\.pth.*loss\.dino_weights"):
    discriminator.make_discriminator(loss_config(dino_weights=missing), 16, jax.random.PRNGKey(0))
  with pytest.raises(FileNotFoundError, match="loss.dino_weights"):
    discriminator.make_discriminator(loss_config(dino_weights=""), 16, jax.random.PRNGKey(0))
  sd = tiny_dino_state_dict()
  with pytest.raises(ValueError, match="unexpected tensors: blocks.0.extra"):
    dino.dino_params_from_state_dict({**sd, "blocks.0.extra": np.zeros(3)}, HEADS)
  del sd["blocks.4.mlp.fc2.bias"]
  with pytest.raises(ValueError, match=r"missing blocks\.4\.mlp\.fc2\.bias"):
    dino.dino_params_from_state_dict(sd, HEADS)
  with pytest.raises(ValueError, match="not one of"):
    discriminator.make_discriminator(loss_config(discriminator="stylegan"), 16,
                                     jax.random.PRNGKey(0))


def test_dino_backbone_matches_numpy_reference(dino_file):
  sd = tiny_dino_state_dict()
  for key in [k for k in sd if k.endswith("attn.qkv.bias")]:
    sd[key] = sd[key].copy()
    sd[key][WIDTH:2 * WIDTH] = 0
  params, arch = dino.load_dino(dino_file, num_heads=HEADS)
  x = np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32)
  ours = jax.jit(lambda p, x: dino.DinoViT(**arch).apply({"params": p}, x))(params, x)
  ref = numpy_dino_readouts(sd, x)
  assert len(ours) == 5
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ DINO discriminator


def test_dino_discriminator_shapes_state_and_gradients(dino_disc):
  module, params, state, apply = dino_disc
  assert set(params) == {f"heads_{i}" for i in range(DISC_HEADS)}   # backbone not trainable
  assert "backbone" in state and "batch_stats" in state
  # the heads initialised alone have exactly the layout the full module creates
  full = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)),
                                            train=False))
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
  assert shapes({k: v for k, v in full["params"].items() if k != "backbone"}) == shapes(params)
  assert shapes(full["batch_stats"]) == shapes(state["batch_stats"])
  assert shapes(full["params"]["backbone"]) == shapes(state["backbone"])

  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 24, 24, 3), minval=-1, maxval=1)

  def loss(p, x):   # one compiled program for the forward pass and both gradients
    logits, new_state = apply(p, state, x, jax.random.PRNGKey(2))
    return jnp.mean(logits), (logits, new_state)

  (_, (logits, new_state)), (g_params, g_images) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, images)
  assert logits.shape == (4, DISC_HEADS * GRID * GRID)
  # training calls update BatchNorm running stats and the spectral-norm u vectors
  old, new = state["batch_stats"]["heads_1"], new_state["batch_stats"]["heads_1"]
  for block in ("block_k1", "block_res"):
    assert not np.array_equal(old[block]["norm"]["mean"], new[block]["norm"]["mean"])
    assert not np.array_equal(old[block]["conv_sn"]["conv/kernel/u"],
                              new[block]["conv_sn"]["conv/kernel/u"])
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(g_params))
  assert np.abs(g_params["heads_1"]["to_logit"]["kernel"]).max() > 0
  assert np.abs(g_images).max() > 0


def test_dino_backbone_input_preparation():
  from detailflow_jax.losses import discriminator_dino
  prep = jax.jit(discriminator_dino.to_backbone_input, static_argnums=1)
  grey = jnp.zeros((1, 8, 8, 3))
  # [-1, 1] grey (0) maps to (0.5 - mean) / std per channel; 8 -> 16 bicubic keeps constants
  np.testing.assert_allclose(prep(grey, 16, None)[0, 3, 5],
                             (0.5 - discriminator_dino.IMAGENET_MEAN) / discriminator_dino.IMAGENET_STD,
                             rtol=1e-5)
  big = jax.random.uniform(jax.random.PRNGKey(3), (2, 20, 20, 3))
  resized = np.asarray(prep(big, 16, None))       # no rng: always the area resize
  outs = [np.asarray(prep(big, 16, jax.random.PRNGKey(i))) for i in range(8)]
  assert all(o.shape == (2, 16, 16, 3) for o in outs)
  n_resized = sum(np.array_equal(o, resized) for o in outs)
  assert 0 < n_resized < 8       # the rest are 16x16 crops of the normalised input
  norm = np.asarray(prep(big, 20, None))          # equal size: just normalised
  crops = [o for o in outs if not np.array_equal(o, resized)]
  assert all(any(np.allclose(c, norm[:, t:t + 16, l:l + 16], atol=1e-6)
                 for t in range(5) for l in range(5)) for c in crops)


# --------------------------------------------------------------------------------- PatchGAN


def test_patchgan_shapes_state_and_eval(tiny_patchgan):
  module, params, state = tiny_patchgan
  apply = jax.jit(functools.partial(discriminator.discriminator_apply, module),
                  static_argnames="train")
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3), minval=-1, maxval=1)
  logits, new_state = apply(params, state, x)
  assert logits.shape == (3, 4)                  # 32 px resized to 16 -> 8 -> 4 -> 3 -> 2
  old, new = state["batch_stats"], new_state["batch_stats"]
  assert not np.array_equal(old["norm_1"]["mean"], new["norm_1"]["mean"])
  assert not np.array_equal(old["conv_1_sn"]["conv_1/kernel/u"], new["conv_1_sn"]["conv_1/kernel/u"])
  eval_logits, same = apply(params, state, x, train=False)
  assert eval_logits.shape == (3, 4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, same, state)
  assert discriminator_patchgan_output(256, 3) == 30
  with pytest.raises(ValueError, match="too small"):
    discriminator.make_discriminator(loss_config(discriminator="patchgan"), 8,
                                     jax.random.PRNGKey(0))


@pytest.mark.parametrize("side,cin,cout,stride", [(4, 16, 32, 1), (3, 32, 1, 1), (9, 4, 8, 2)])
def test_small_map_conv_matches_lax_conv_and_its_gradients(side, cin, cout, stride):
  from detailflow_jax.losses import small_map_conv
  x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, cin))
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 4, cin, cout))
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest")
  taps = lambda x, w: small_map_conv.small_map_conv(
      x, w, (stride, stride), ((1, 1), (1, 1)), precision="highest")
  np.testing.assert_allclose(taps(x, w), lax_conv(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  for got, want in zip(jax.grad(loss(taps), (0, 1))(x, w), jax.grad(loss(lax_conv), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="undilated, ungrouped"):
    small_map_conv.small_map_conv(x, w, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2))


def test_patchgan_small_map_layers_give_the_lax_conv_logits(monkeypatch):
  """At a 32 px input the last two convs (4 -> 3 and 3 -> 2 px) take the tap-matmul path;
  the logits equal those of the same params through lax's convolution everywhere."""
  from detailflow_jax.losses import discriminator_patchgan
  module, params, state = discriminator.make_discriminator(
      loss_config(discriminator="patchgan", patchgan_channels=8), 32, jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  calls = []
  real_taps = discriminator_patchgan.small_map_conv
  monkeypatch.setattr(discriminator_patchgan, "small_map_conv",
                      lambda *a, **k: calls.append(a[0].shape) or real_taps(*a, **k))
  taps_logits, _ = discriminator.discriminator_apply(module, params, state, x, train=False)
  assert calls == [(2, 4, 4, 32), (2, 3, 3, 64)]   # conv_3 (32 -> 64 channels), to_logit
  monkeypatch.setattr(discriminator_patchgan, "small_map_conv",
                      lambda *a, dimension_numbers=None, **k: jax.lax.conv_general_dilated(
                          *a, dimension_numbers=dimension_numbers, **k))
  lax_logits, _ = discriminator.discriminator_apply(module, params, state, x, train=False)
  np.testing.assert_allclose(taps_logits, lax_logits, rtol=1e-5, atol=1e-5)


def discriminator_patchgan_output(size, layers):
  from detailflow_jax.losses import discriminator_patchgan
  return discriminator_patchgan.patchgan_output_size(size, layers)


# ---------------------------------------------------------------------- adversarial losses


def test_adversarial_losses_follow_the_schedule():
  # A stand-in discriminator: logits = w * per-image mean; its state counts the calls, so the
  # test also checks that the state is threaded through every call.
  def disc(params, state, images, rng):
    del rng
    return params["w"] * images.mean(axis=(1, 2, 3))[:, None], {"calls": state["calls"] + 1}

  params, state = {"w": jnp.float32(3.0)}, {"calls": jnp.int32(0)}
  # weak DiffAugment off: compiling it is slow on CPU and diff_augment has its own tests; the
  # consistency term still runs the strong augmentation
  cfg = loss_config(diff_augment=False)
  real = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 3), minval=-1, maxval=1)
  fake = real * 0.5

  @jax.jit
  def both(step, rng):
    d_loss, d_aux = adversarial.discriminator_loss(disc, params, state, real, fake,
                                                   gan.lecam_init(), rng, step, cfg)
    g_loss, g_aux = adversarial.generator_adversarial_loss(disc, params, state, fake, rng, step,
                                                           cfg)
    return d_loss, d_aux, g_loss, g_aux

  d_before, aux_before, g_before, _ = both(9, jax.random.PRNGKey(5))
  d_after, aux_after, g_after, g_aux = both(10, jax.random.PRNGKey(5))
  assert float(d_before) == 0.0 and float(g_before) == 0.0      # before gan_start_step
  assert int(aux_after["disc_state"]["calls"]) == 4 and int(g_aux["disc_state"]["calls"]) == 1
  # the LeCAM EMAs move even before the GAN starts, as in the reference
  assert float(aux_before["lecam_state"].real_ema) != 0.0
  expected = (0.2 * (aux_after["hinge"] + 0.001 * aux_after["lecam"])
              + 4.0 * aux_after["consistency"])
  np.testing.assert_allclose(d_after, expected, rtol=1e-5)
  np.testing.assert_allclose(g_after, 0.2 * g_aux["g_loss"], rtol=1e-6)
  assert float(aux_after["consistency"]) > 0
  # without augmentation and with LeCAM/consistency off, D's loss is the weighted hinge loss
  plain = loss_config(diff_augment=False, lecam_weight=0.0, consistency_weight=0.0)
  plain_loss = jax.jit(jax.value_and_grad(
      lambda p, step: adversarial.discriminator_loss(disc, p, state, real, fake, gan.lecam_init(),
                                                     jax.random.PRNGKey(0), step, plain),
      has_aux=True))
  (d_plain, aux), grad = plain_loss(params, 10)
  logits_real, logits_fake = 3.0 * real.mean((1, 2, 3)), 3.0 * fake.mean((1, 2, 3))
  np.testing.assert_allclose(d_plain, 0.2 * gan.hinge_d_loss(logits_real, logits_fake), rtol=1e-6)
  assert int(aux["disc_state"]["calls"]) == 2 and float(grad["w"]) != 0.0
  assert float(plain_loss(params, 9)[1]["w"]) == 0.0      # no gradient before the start step
