"""Checks `--config.x=y` overrides against the config file before absl applies them.

ml_collections raises a bare AttributeError for an unknown key; a user deserves the key they typed
and the list of keys that exist.
"""
import importlib.util
import pathlib

import ml_collections


def flatten_keys(config, prefix=""):
  """All dotted leaf keys of a ConfigDict, sorted."""
  keys = []
  for name, value in config.items():
    dotted = f"{prefix}{name}"
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flatten_keys(value, dotted + "."))
    else:
      keys.append(dotted)
  return sorted(keys)


def load_config_file(spec):
  """Loads `path.py[:arg]` the way config_flags does (get_config(arg) or get_config())."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"--config={spec}: no config file at {path}. Configs live in configs/.")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_override_keys(argv, config, flag_name="config"):
  """The dotted keys of `--config.<key>=...` arguments that the config does not have."""
  valid = set(flatten_keys(config))
  sections = {k.rsplit(".", 1)[0] for k in valid if "." in k}
  unknown = []
  marker = f"--{flag_name}."
  for arg in argv:
    if arg.startswith(marker):
      key = arg[len(marker):].split("=", 1)[0]
      if key not in valid and key not in sections:
        unknown.append(key)
  return unknown


def check_overrides(argv, flag_name="config"):
  """Raises ValueError naming unknown override keys and listing the valid ones."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag_name}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag_name}" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None:
    return
  config = load_config_file(spec)
  unknown = unknown_override_keys(argv, config, flag_name)
  if unknown:
    valid = "\n  ".join(flatten_keys(config))
    raise ValueError(
        f"Unknown config key(s): {', '.join(unknown)} (in {spec}).\nValid keys:\n  {valid}")
