"""Tokenizer training: config -> sharded state -> jitted steps -> orbax checkpoints.

Compiled variants: one train step per (decoder output size, self-correction on/off). The prefix
length n and the noise position are traced scalars (the decoder masks latents beyond n), so n
itself never recompiles; `ResolutionSchedule.output_sizes()` lists the sizes. The GAN weights
are traced too (zero before loss.gan_start_step), so the GAN start adds no variant.
"""
import concurrent.futures
import functools
import time

import jax
import jax.numpy as jnp
from absl import logging

from detailflow_jax import detail
from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.data import pipeline
from detailflow_jax.train import checkpoints
from detailflow_jax.train import loop
from detailflow_jax.train import sharding
from detailflow_jax.train import tokenizer_objective
from detailflow_jax.train import tokenizer_state
from detailflow_jax.train import tokenizer_visuals


def step_variants(config, schedule, objective):
  """Every (output size, correction, gan) a run can meet; n = 1 never has a noise position.
  `gan` is fixed for a run (whether the discriminator exists)."""
  n_for_size = {}
  for n in schedule.token_list:
    n_for_size.setdefault(schedule.decoder_size(n), []).append(n)
  gan_settings = sorted({objective.gan_active(1), objective.gan_active(config.train.num_steps)})
  variants = []
  for size, ns in sorted(n_for_size.items()):
    if config.data.degrade_prob == 0 and size != schedule.decoder_size(schedule.num_tokens):
      continue
    corrections = {n > 1 for n in ns}
    if config.data.correction_prob < 1:
      corrections.add(False)
    for correction in sorted(corrections):
      for gan_active in gan_settings:
        variants.append((size, correction, gan_active))
  return variants


def abstract_batch(config, output_size, mesh):
  """ShapeDtypeStructs of one sharded global batch with targets at `output_size`."""
  b, s = config.data.batch_size, config.tokenizer.image_size
  struct = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)) if shape
      else sharding.replicated(mesh))
  return dict(image=struct((b, s, s, 3), jnp.float32),
              target=struct((b, output_size, output_size, 3), jnp.float32),
              num_tokens=struct((), jnp.int32), noise_position=struct((), jnp.int32),
              label=struct((b,), jnp.int32))


def make_step_fn(config, objective, abstract_state, state_shardings, mesh, warm=True):
  """Returns step(state, host_batch, step_number) running the compiled variant it needs.

  With `warm`, every variant is compiled ahead of time, two at a time: XLA compiles outside
  the GIL, and the variants are known from the schedule (see module docstring).
  """
  schedule = detail.resolution_schedule(config.tokenizer)
  frozen = jax.device_put(objective.frozen_params(), sharding.replicated(mesh))
  abstract_frozen = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), frozen)

  def lower(key):
    size, use_correction, gan_active = key
    fn = functools.partial(objective.train_step, use_correction=use_correction,
                           gan_active=gan_active)
    jitted = jax.jit(fn, in_shardings=(state_shardings, None, None),
                     out_shardings=(state_shardings, None), donate_argnums=(0,))
    with sharding.use_mesh(mesh):
      return jitted.lower(abstract_state, abstract_batch(config, size, mesh),
                          abstract_frozen).compile()

  compiled = {}
  if warm:
    variants = step_variants(config, schedule, objective)
    logging.info("compiling %d train-step variants: %s", len(variants), variants)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      compiled.update(zip(variants, pool.map(lower, variants)))
    print(f"compiled {len(variants)} train-step variants in {time.perf_counter() - start:.0f} s",
          flush=True)

  def step(state, host_batch, step_number):
    key = (host_batch["target"].shape[1], int(host_batch["noise_position"]) >= 0,
           objective.gan_active(step_number))
    if key not in compiled:
      logging.info("compiling train step for output size %d, correction %s, gan %s", *key)
      compiled[key] = lower(key)
    with sharding.use_mesh(mesh):
      return compiled[key](state, sharding.shard_batch(host_batch, mesh), frozen)

  step.compiled = compiled  # {variant key: compiled step}, for benchmarks/train_step.py
  return step


def train_and_evaluate(config, workdir, on_metrics=None):
  """The `train_tokenizer` job. `on_metrics(dict)` receives each logged set of scalars."""
  workdir_io.save_workdir_config(config, workdir)
  mesh = sharding.build_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh)
  schedule = detail.resolution_schedule(config.tokenizer)
  logging.info("decoder output sizes (compiled variants): %s", schedule.output_sizes())

  objective = tokenizer_objective.TokenizerObjective(config)
  state, abstract_state, shardings_ = tokenizer_state.create(config, objective, mesh)
  data = pipeline.make_tokenizer_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count())

  # A finished run (a rerun of the pipeline, say) restores its last state without compiling
  # the step variants it will not use.
  warm = not _already_trained(workdir, config.train.num_steps)
  visuals = tokenizer_visuals.ReconstructionStrips(config, objective, workdir)
  hooks = [loop.LoopHooks(config.train.image_every, visuals)] if config.train.image_every else []
  state = loop.run(
      workdir=workdir, state=state, abstract_state=abstract_state,
      step_fn=make_step_fn(config, objective, abstract_state, shardings_, mesh, warm=warm),
      data_iterator=data,
      num_steps=config.train.num_steps, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints, hooks=hooks, on_metrics=on_metrics,
      name="tokenizer")
  if jax.process_index() == 0 and warm and not preemption.stop_requested():
    visuals(int(jax.device_get(state.step)), state)
  return state


def _already_trained(workdir, num_steps):
  checkpointer = checkpoints.Checkpointer(workdir)
  try:
    return (checkpointer.latest_step() or 0) >= num_steps
  finally:
    checkpointer.close()
