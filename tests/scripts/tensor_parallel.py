"""Tensor-parallel checks on 8 simulated CPU devices, printed as one line `RESULTS <json>`.

Run by tests/test_tensor_parallel.py in a subprocess (XLA_FLAGS must set the device count
before JAX starts). One process does every check so JAX starts once:
  gpt:       3 train steps of a tiny GPT on 1 device and on a (data 2, fsdp 2, tensor 2) mesh;
             collectives of the sharded step at 1 and 2 layers; remat warnings.
  tokenizer: 2 train steps (self-correction and the PatchGAN on) on both; remat warnings.
  sampler:   codes of the trained tiny GPT on 1 device and under the (2, 2, 2) mesh, and the
             collectives of the sharded sampling program.

usage: python tensor_parallel.py REPO_ROOT
"""
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from detailflow_jax import compile_check
from detailflow_jax import detail
from detailflow_jax import hlo_collectives
from detailflow_jax import sampling
from detailflow_jax.config.files import load_config_file
from detailflow_jax.models import gpt
from detailflow_jax.train import ar_trainer
from detailflow_jax.train import sharding
from detailflow_jax.train import tokenizer_objective
from detailflow_jax.train import tokenizer_trainer

MESH = dict(data=2, fsdp=2, tensor=2)
ONE = dict(data=1, fsdp=1, tensor=1)


def mesh_for(shape):
  devices = jax.devices()[:1] if shape == ONE else jax.devices()
  return sharding.build_mesh(shape, devices)


def sharded_structs(tree, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def counts(records):
  return {f"{op}|{'x'.join(axes)}": n for (op, axes), n in
          hlo_collectives.by_axes(records).items()}


# ------------------------------------------------------------------------------------- GPT


def gpt_config(repo, layers):
  c = load_config_file(str(repo / "configs" / "ar_tiny.py") + ":smoke")
  c.gpt.num_layers, c.gpt.dim, c.gpt.num_heads = layers, 64, 4
  c.optim.learning_rate = 1e-2   # visible steps in 3 updates
  return c


def gpt_batches(config, steps):
  g, b = config.gpt, config.data.batch_size
  rng = np.random.default_rng(0)
  codes = lambda length: rng.integers(0, g.vocab_size, (b, length)).astype(np.int32)
  return [dict(codes_input=codes(g.block_size - g.group_size), targets=codes(g.block_size),
               labels=rng.integers(0, g.num_classes, (b,)).astype(np.int32),
               corrected=np.zeros((b,), bool)) for _ in range(steps)]


def gpt_step_program(config, mesh):
  """(objective, init, AOT-compiled step, collectives, remat warnings) on `mesh`."""
  objective, abstract, shardings, init, step = ar_trainer.compiled_functions(
      ar_trainer.objective_key(config), mesh)
  batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding.batch_sharding(mesh, x.ndim)),
      gpt_batches(config, 1)[0])
  with sharding.use_mesh(mesh):
    lowered = step.lower(abstract, batch)
  compiled, records, remats = compile_check.compile_and_inspect(lowered, mesh)
  return objective, init, compiled, records, remats


def gpt_losses(config, mesh, steps=3):
  _, init, compiled, records, remats = gpt_step_program(config, mesh)
  state = init(jax.random.PRNGKey(config.seed))
  losses = []
  with sharding.use_mesh(mesh):
    for batch in gpt_batches(config, steps):
      state, metrics = compiled(state, sharding.shard_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), records, remats


# ------------------------------------------------------------------------------- tokenizer


def tokenizer_config(repo):
  c = load_config_file(str(repo / "configs" / "tokenizer_tiny.py") + ":smoke")
  c.loss.discriminator, c.loss.gan_weight, c.loss.gan_start_step = "patchgan", 0.1, 0
  c.loss.patchgan_channels, c.loss.patchgan_layers = 8, 2   # the smallest PatchGAN
  return c


def tokenizer_batches(config, steps):
  schedule = detail.resolution_schedule(config.tokenizer)
  size, s, b = (schedule.decoder_size(schedule.num_tokens), config.tokenizer.image_size,
                config.data.batch_size)
  rng = np.random.default_rng(1)
  image = lambda side: rng.uniform(-1, 1, (b, side, side, 3)).astype(np.float32)
  return size, [dict(image=image(s), target=image(size), num_tokens=np.int32(schedule.num_tokens),
                     noise_position=np.int32(config.tokenizer.causal_num + i),
                     label=np.zeros((b,), np.int32)) for i in range(steps)]


def tokenizer_losses(config, mesh, steps=2):
  objective = tokenizer_objective.TokenizerObjective(config)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(objective.init_state, rng, None)
  shardings = sharding.state_shardings(abstract, mesh, objective.param_logical_axes())
  state = jax.jit(objective.init_state, out_shardings=shardings)(rng, None)
  size, batches = tokenizer_batches(config, steps)
  fn = functools.partial(objective.train_step, use_correction=True,
                         gan_active=objective.gan_active(1))
  step = jax.jit(fn, in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  with sharding.use_mesh(mesh):
    lowered = step.lower(sharded_structs(abstract, shardings),
                         tokenizer_trainer.abstract_batch(config, size, mesh), {})
  compiled, records, remats = compile_check.compile_and_inspect(lowered, mesh)
  losses = []
  with sharding.use_mesh(mesh):
    for batch in batches:
      state, metrics = compiled(state, sharding.shard_batch(batch, mesh), {})
      losses.append({k: float(metrics[k]) for k in ("loss", "mse_loss", "disc_loss")
                     if k in metrics})
  return losses, records, remats


# --------------------------------------------------------------------------------- sampler


def sample(params, config, mesh):
  g = gpt.GPTConfig.from_dict(config.gpt)
  labels = np.arange(8, dtype=np.int32) % g.num_classes
  kwargs = dict(rng=jax.random.PRNGKey(3), cfg_scale=2.0, temperature=1.0)
  axes = gpt.param_logical_axes(g)
  placed = jax.device_put(params, sharding.state_shardings(params, mesh, axes))
  # generate_codes' own program (its arguments and static settings), compiled once ahead of
  # time so its collectives can be read, then run.
  args, static = sampling._prepare(  # pylint: disable=protected-access
      placed, g, labels, kwargs["rng"], kwargs["cfg_scale"], kwargs["temperature"], 0, 1.0,
      False, None, False)
  with sharding.use_mesh(mesh):
    lowered = sampling._decode.lower(*args, **static)  # pylint: disable=protected-access
    compiled, records, _ = compile_check.compile_and_inspect(lowered, mesh)
    codes, _, _ = compiled(*args)
  return np.asarray(codes).tolist(), records


def main():
  repo = pathlib.Path(sys.argv[1])
  flags.FLAGS.mark_as_parsed()
  assert len(jax.devices()) == 8, jax.devices()
  one, eight = mesh_for(ONE), mesh_for(MESH)
  results = {}

  config = gpt_config(repo, 2)
  losses_1, params, _, _ = gpt_losses(config, one)
  losses_8, _, records_2, remats = gpt_losses(config, eight)
  _, _, _, records_1, _ = gpt_step_program(gpt_config(repo, 1), eight)
  results["gpt"] = dict(losses_1=losses_1, losses_8=losses_8, remats=remats,
                        collectives_2_layers=counts(records_2),
                        collectives_1_layer=counts(records_1))

  tconfig = tokenizer_config(repo)
  t1, _, _ = tokenizer_losses(tconfig, one)
  t8, trecords, tremats = tokenizer_losses(tconfig, eight)
  results["tokenizer"] = dict(losses_1=t1, losses_8=t8, remats=tremats,
                              collectives=counts(trecords))

  codes_1, _ = sample(params, config, one)
  codes_8, srecords = sample(params, config, eight)
  results["sampler"] = dict(codes_1=codes_1, codes_8=codes_8, collectives=counts(srecords))
  print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main()
