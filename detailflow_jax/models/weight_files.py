"""Reads pretrained weight files into flat {name: numpy array} dicts, without torch.

Supported formats, chosen by file extension:
  .safetensors      Hugging Face safetensors (header + raw little-endian data; read with a
                    memory map so that only the selected tensors are loaded; bf16 included).
  .npz              numpy archives, e.g. big_vision checkpoints ("params/img/...") or our exports.
  .pt / .pth / .bin PyTorch `torch.save` zip archives (torch >= 1.6). Parsed with zipfile + a
                    restricted unpickler, so torch need not be installed and no code from the file
                    is run: only tensors, containers and a few torch type names are understood.

Every pretrained file is named by a config key; a missing file raises FileNotFoundError with
both the path and the key, so nothing silently falls back to random weights.
"""
import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Callable, Dict, Optional

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype of its elements.
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def check_weight_file(path: str, config_key: Optional[str] = None) -> str:
  """Returns `path` if it is an existing file, else raises FileNotFoundError naming the key."""
  where = f" (config key {config_key})" if config_key else ""
  if not path:
    raise FileNotFoundError(f"no weight file given{where}: set it to the path of a local file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file {path!r} does not exist{where}. Pretrained weights are "
                            "read from local files only: download it once and point the config "
                            "key at it.")
  return path


def read_weight_file(path: str, config_key: Optional[str] = None,
                     keep: Optional[Callable[[str], bool]] = None) -> Dict[str, np.ndarray]:
  """Reads a .safetensors / .npz / .pt file into a flat dict of numpy arrays.

  `keep(name)` selects tensors (default all); safetensors and npz then read only those. A torch
  checkpoint whose tensors sit under a "state_dict" / "model" / "teacher" entry is unwrapped to
  that dict; nested dicts are flattened with "." separators.
  """
  check_weight_file(path, config_key)
  keep = keep or (lambda name: True)
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return read_safetensors(path, keep)
  if lower.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files if keep(k)}
  if lower.endswith((".pt", ".pth", ".bin", ".ckpt")):
    return {k: v for k, v in _flatten(_unwrap(read_torch_zip(path))).items() if keep(k)}
  raise ValueError(f"weight file {path!r}: unknown format; use .safetensors, .npz or a torch "
                   ".pt/.pth zip archive")


def read_safetensors(path: str, keep: Callable[[str], bool]) -> Dict[str, np.ndarray]:
  """The safetensors layout: u64 header size, JSON header {name: dtype, shape, offsets}, data."""
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  out = {}
  for name, info in header.items():
    if name == "__metadata__" or not keep(name):
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path!r}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    out[name] = np.array(data[start:end].view(dtype).reshape(info["shape"]))
  return out


def _unwrap(obj):
  if isinstance(obj, dict):
    for key in ("state_dict", "model", "teacher"):
      if key in obj and isinstance(obj[key], dict) and not _is_tensor_dict(obj):
        return obj[key]
  return obj


def _is_tensor_dict(obj):
  return all(isinstance(v, np.ndarray) for v in obj.values())


def _flatten(obj, prefix=""):
  out = {}
  if not isinstance(obj, dict):
    raise ValueError("torch checkpoint does not hold a dict of tensors")
  for key, value in obj.items():
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[name] = value
    elif isinstance(value, dict):
      out.update(_flatten(value, name + "."))
  return out


class _Opaque:
  """Stands in for any class the restricted unpickler does not know (argparse.Namespace…)."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


class _StorageType:

  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: a strided view into a flat storage."""
  del unused
  item = storage.dtype.itemsize
  if not size:
    return np.array(storage[offset], copy=True)
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Understands the globals torch.save writes for tensors; everything else becomes _Opaque."""

  def __init__(self, file, read_record):
    super().__init__(file)
    self._read_record = read_record
    self._storages = {}

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(_TORCH_STORAGE_DTYPES[name])
    if module == "torch" and name == "Size":
      return tuple
    return _Opaque

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel)
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise ValueError(f"unsupported persistent id in torch archive: {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"unsupported torch storage type in archive (key {key})")
    if key not in self._storages:
      raw = self._read_record(key)
      self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
    return self._storages[key]


def read_torch_zip(path: str):
  """Unpickles a `torch.save` zip archive into numpy arrays and plain containers."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path!r} is not a torch zip archive (saved by torch < 1.6?). Re-save it "
                     "with a recent torch, or convert it to .safetensors / .npz")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path!r}: expected one data.pkl in the torch archive, found {pickles}")
    root = pickles[0][:-len("data.pkl")]
    read_record = lambda key: archive.read(f"{root}data/{key}")
    with archive.open(pickles[0]) as f:
      return _TorchUnpickler(f, read_record).load()
