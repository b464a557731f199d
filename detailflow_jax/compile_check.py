"""Compiles a config's train step for a device count and mesh on CPU, before a pod job queues.

  python -m detailflow_jax.compile_check --config=configs/ar_l.py --devices=64 \
      [--config.mesh.fsdp=8] [--config.data.batch_size=256] [--variants=all]

Simulates `--devices` CPU devices (no accelerator needed), builds the train state abstractly
(jax.eval_shape: no parameter is materialised), lowers and compiles the trainer's jitted step
with the state and batch shardings of the config's mesh, and prints the per-device memory of
the compiled program (XLA's memory_analysis: arguments, outputs, temporaries), the collectives
of one step (count and bytes per op, and the mesh axes they run over; hlo_collectives.py) and
the number of "Involuntary full rematerialization" warnings XLA's partitioner printed while
compiling (each is a tensor XLA had to replicate because two shardings did not meet; with
--fail_on_remat any makes the check fail). Exits 1 with the message on a config contradiction
(mesh vs device count, batch vs data axes, group size vs N), a sharding/compilation error or,
with --fail_on_remat, a remat warning; 2 on an unknown config key.

Jobs: train_tokenizer (every step variant the run meets with --variants=all, else the largest
decoder output with self-correction) and train_ar. Pretrained weight files that are not on this
machine (SigLIP2, DINO) are replaced by stand-ins of the same shapes, with a note: their sizes
are what memory depends on.

The numbers are XLA:CPU's; a TPU/GPU compile of the same program differs in temporaries
(fusion, layouts, collectives' buffers) but not in the sharded state, which dominates.
"""
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import traceback
from typing import Optional
from unittest import mock

from absl import app
from absl import flags
from ml_collections import config_flags

from detailflow_jax import hlo_collectives
from detailflow_jax.config import files

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).")
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices to simulate (the job's "
                                "global device count).")
_VARIANTS = flags.DEFINE_enum("variants", "largest", ["largest", "all"],
                              "Tokenizer: compile the largest step variant or all of them.")
_FAIL_ON_REMAT = flags.DEFINE_bool("fail_on_remat", False, "Fail when XLA reports an "
                                   "'Involuntary full rematerialization' while compiling.")
flags.mark_flags_as_required(["config", "devices"])
REMAT_WARNING = "Involuntary full rematerialization"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_RELAUNCHED = "DETAILFLOW_COMPILE_CHECK_DEVICES"
GIB, MIB = 1024 ** 3, 1024 ** 2


def simulate_cpu_devices(count):
  """Makes this process see `count` CPU devices. Returns False when JAX's backend already
  started with another count (the caller re-executes the process with the environment set)."""
  if count < 1:
    raise ValueError(f"--devices={count} must be >= 1")
  flags_ = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags_} {_DEVICE_COUNT_FLAG}={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backend is up already
    pass
  return len(jax.devices()) == count


@dataclasses.dataclass
class MemoryReport:
  """Per-device bytes of one compiled program."""
  name: str
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int
  state: int   # the train state's shard on one device (computed from the shardings)
  collectives: list = dataclasses.field(default_factory=list)   # [hlo_collectives.Collective]
  remat_warnings: int = 0

  @property
  def peak(self):
    # Donated state buffers are reused for the outputs (aliased), so they count once.
    return self.arguments + self.outputs - self.aliased + self.temporaries

  def lines(self):
    fmt = lambda b: f"{b / GIB:8.3f} GiB" if b >= GIB else f"{b / MIB:8.2f} MiB"
    return [f"{self.name}: per-device memory",
            f"  train state shard     {fmt(self.state)}",
            f"  arguments             {fmt(self.arguments)}",
            f"  outputs               {fmt(self.outputs)}",
            f"  aliased (donated)     {fmt(self.aliased)}",
            f"  temporaries           {fmt(self.temporaries)}",
            f"  generated code        {fmt(self.code)}",
            f"  total (args + outputs - aliased + temporaries) {fmt(self.peak)}",
            *hlo_collectives.format_lines(self.collectives),
            f"involuntary full rematerialization warnings: {self.remat_warnings}"]


def shard_bytes(abstract_tree):
  """Bytes of one device's shard of a pytree of ShapeDtypeStructs with shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree_util.tree_leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


@contextlib.contextmanager
def captured_stderr(sink):
  """Appends what is written to file descriptor 2 inside the block (XLA's C++ log lines, which
  Python cannot intercept otherwise) to `sink`, and writes it on to the real stderr."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield sink
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors="replace")
      sink.append(text)
      sys.stderr.write(text)
      sys.stderr.flush()


def compile_and_inspect(lowered, mesh):
  """(compiled, [hlo_collectives.Collective], number of remat warnings) of `lowered`."""
  logs = []
  with captured_stderr(logs):
    compiled = lowered.compile()
  return (compiled, hlo_collectives.collectives(compiled.as_text(), mesh),
          "".join(logs).count(REMAT_WARNING))


def compile_with_report(name, lowered, abstract_state, mesh):
  """Compiles `lowered` and reads its memory, collectives and remat warnings."""
  compiled, collectives, remat_warnings = compile_and_inspect(lowered, mesh)
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"{name}: this backend gives no memory analysis")
  return MemoryReport(
      name=name, arguments=int(stats.argument_size_in_bytes),
      outputs=int(stats.output_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
      aliased=int(stats.alias_size_in_bytes), code=int(stats.generated_code_size_in_bytes),
      state=shard_bytes(abstract_state),
      collectives=collectives, remat_warnings=remat_warnings)


def _with_shardings(abstract, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def param_count(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------- stand-in weights


def _siglip_standin(original):
  def load(path, config_key="loss.siglip_weights", *args, **kwargs):
    try:
      return original(path, config_key, *args, **kwargs)
    except FileNotFoundError:
      import jax  # pylint: disable=g-import-not-at-top
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      from detailflow_jax.models import siglip2  # pylint: disable=g-import-not-at-top
      print(f"note: {config_key}={path!r} is not on this machine; using SigLIP2 so400m shapes",
            flush=True)
      tower = siglip2.Siglip2VisionTower()
      side = tower.patch_size * tower.pos_grid
      import flax.linen as nn  # pylint: disable=g-import-not-at-top
      params = nn.unbox(jax.eval_shape(tower.init, jax.random.PRNGKey(0),
                                       jnp.zeros((1, side, side, 3), jnp.float32))["params"])
      return siglip2.Siglip2FeatureModel(params=params, width=tower.width,
                                         num_heads=tower.num_heads)
  return load


def _dino_standin(original):
  def load(path, config_key="loss.dino_weights", num_heads=None):
    try:
      return original(path, config_key, num_heads)
    except FileNotFoundError:
      import jax  # pylint: disable=g-import-not-at-top
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top
      from detailflow_jax.models import dino  # pylint: disable=g-import-not-at-top
      print(f"note: {config_key}={path!r} is not on this machine; using DINO ViT-S/16 shapes",
            flush=True)
      arch = dict(width=384, depth=12, num_heads=num_heads or 6, patch_size=16, grid=14)
      module = dino.DinoViT(**arch)
      side = arch["patch_size"] * arch["grid"]
      shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, side, side, 3), jnp.float32))["params"]
      # The discriminator keeps the backbone as arrays: small zeros (ViT-S, 22M weights).
      return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes), arch
  return load


@contextlib.contextmanager
def standin_weights():
  """Pretrained loaders fall back to same-shaped stand-ins when the file is missing."""
  from detailflow_jax.models import dino  # pylint: disable=g-import-not-at-top
  from detailflow_jax.models import siglip2  # pylint: disable=g-import-not-at-top
  with mock.patch.object(siglip2, "load_feature_model",
                         _siglip_standin(siglip2.load_feature_model)), \
       mock.patch.object(dino, "load_dino", _dino_standin(dino.load_dino)):
    yield


# --------------------------------------------------------------------------------- the jobs


def check_train_ar(config, mesh):
  """Compiles the AR train step; returns [MemoryReport]."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import ar_objective  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import ar_trainer  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import sharding  # pylint: disable=g-import-not-at-top

  from detailflow_jax.models import gpt  # pylint: disable=g-import-not-at-top

  gpt_config = ar_trainer.gpt_config_from(config)
  objective = ar_objective.ARObjective(config, gpt_config)
  abstract = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(abstract, mesh, gpt.param_logical_axes(gpt_config))
  abstract = _with_shardings(abstract, shardings)
  print(f"GPT: {param_count(abstract.params) / 1e6:.1f}M parameters, {gpt_config.num_layers} "
        f"layers x {gpt_config.dim}, dtype {gpt_config.dtype}", flush=True)
  # The batch of data/codes.make_ar_train_iterator, sharded as shard_batch does.
  b, n, g = config.data.batch_size, gpt_config.block_size, gpt_config.group_size
  struct = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  batch = dict(codes_input=struct((b, n - g), jnp.int32), targets=struct((b, n), jnp.int32),
               labels=struct((b,), jnp.int32), corrected=struct((b,), jnp.bool_))
  step = jax.jit(objective.train_step, in_shardings=(shardings, None),
                 out_shardings=(shardings, None), donate_argnums=(0,))
  with sharding.use_mesh(mesh):
    lowered = step.lower(abstract, batch)
  return [compile_with_report(f"train_ar step (batch {b})", lowered, abstract, mesh)]


def check_train_tokenizer(config, mesh, all_variants):
  """Compiles the tokenizer's train-step variants; returns [MemoryReport]."""
  import jax  # pylint: disable=g-import-not-at-top
  from detailflow_jax import detail  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import tokenizer_objective  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import tokenizer_trainer  # pylint: disable=g-import-not-at-top

  schedule = detail.resolution_schedule(config.tokenizer)
  with standin_weights():
    objective = tokenizer_objective.TokenizerObjective(config)
  abstract = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), None)
  shardings = sharding.state_shardings(abstract, mesh, objective.param_logical_axes())
  abstract = _with_shardings(abstract, shardings)
  print(f"tokenizer: {param_count(abstract.params) / 1e6:.1f}M trained parameters", flush=True)
  frozen = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      objective.frozen_params())
  variants = tokenizer_trainer.step_variants(config, schedule, objective)
  if not all_variants:
    variants = [max(variants)]  # largest output, correction on, GAN on when configured
  reports = []
  for size, use_correction, gan_active in variants:
    fn = lambda s, b, f, c=use_correction, g=gan_active: objective.train_step(
        s, b, f, use_correction=c, gan_active=g)
    step = jax.jit(fn, in_shardings=(shardings, None, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    batch = tokenizer_trainer.abstract_batch(config, size, mesh)
    with sharding.use_mesh(mesh):
      lowered = step.lower(abstract, batch, frozen)
    name = (f"train_tokenizer step (output {size}px, correction {use_correction}, "
            f"gan {gan_active}, batch {config.data.batch_size})")
    reports.append(compile_with_report(name, lowered, abstract, mesh))
  return reports


CHECKS = {"train_ar": check_train_ar, "train_tokenizer": check_train_tokenizer}


def compile_check(config, devices, all_variants=False, out=print) -> Optional[list]:
  """Builds the mesh for `devices` simulated devices and compiles the job's train step(s).
  Returns the MemoryReports; raises ValueError on contradictions in the config."""
  from detailflow_jax.train import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if config.job not in CHECKS:
    raise ValueError(f"config.job={config.job!r}: the compile check knows {sorted(CHECKS)}")
  if len(jax.devices()) != devices:
    raise ValueError(f"this process has {len(jax.devices())} devices, not --devices={devices}")
  mesh = sharding.build_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh)
  out(f"mesh {dict(mesh.shape)} over {devices} simulated devices; global batch "
      f"{config.data.batch_size} ({config.data.batch_size // sharding.batch_axes_size(mesh)} "
      "per data x fsdp shard)")
  if config.job == "train_tokenizer":
    reports = check_train_tokenizer(config, mesh, all_variants)
  else:
    reports = CHECKS[config.job](config, mesh)
  for report in reports:
    for line in report.lines():
      out(line)
  return reports


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  devices = _DEVICES.value
  if devices < 1:
    print(f"error: --devices={devices} must be >= 1 (the job's global device count)",
          file=sys.stderr)
    sys.exit(1)
  if not simulate_cpu_devices(devices):
    if os.environ.get(_RELAUNCHED) == str(devices):
      print(f"error: could not simulate {devices} CPU devices", file=sys.stderr)
      sys.exit(1)
    # JAX started its backend during imports: run again with the environment set first.
    os.environ[_RELAUNCHED] = str(devices)
    os.execv(sys.executable, [sys.executable, "-m", "detailflow_jax.compile_check", *sys.argv[1:]])
  try:
    reports = compile_check(_CONFIG.value, devices, _VARIANTS.value == "all")
  except ValueError as error:  # a contradiction in the config: the message says it all
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()
    print(f"error: compile check failed: {type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(1)
  remats = sum(r.remat_warnings for r in reports)
  if remats and _FAIL_ON_REMAT.value:
    print(f"error: XLA reported {remats} involuntary full rematerialization(s) (--fail_on_remat)",
          file=sys.stderr)
    sys.exit(1)
  print("compile check passed", flush=True)


def run():
  try:
    files.check_overrides(sys.argv)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
