"""JAX's persistent compilation cache, on by default for jobs.

Train steps take tens of seconds to compile on CPU; a resumed run, a second job on the same
model (evaluation after training) or a rerun of the README's command reuses them from disk.
DETAILFLOW_COMPILATION_CACHE sets the folder; an empty value turns the cache off.
"""
import os
import pathlib

import jax

DEFAULT_DIR = pathlib.Path.home() / ".cache" / "detailflow_jax" / "xla"


def enable():
  folder = os.environ.get("DETAILFLOW_COMPILATION_CACHE", str(DEFAULT_DIR))
  if not folder:
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
