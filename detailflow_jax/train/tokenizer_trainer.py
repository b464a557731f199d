"""Tokenizer training: config -> sharded state -> jitted steps -> orbax checkpoints.

Compiled variants: one train step per (decoder output size, self-correction on/off). The prefix
length n and the noise position are traced scalars (the decoder masks latents beyond n), so n
itself never recompiles; `ResolutionSchedule.output_sizes()` lists the sizes. The GAN weights
are traced too (zero before loss.gan_start_step), so the GAN start adds no variant. A run at
several image sizes (dynamic_resolution.py) has such a set per input side, each with that side's
token count and batch size: `training_variants` lists them all at start-up, and all are warmed.
"""
import concurrent.futures
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from detailflow_jax import detail
from detailflow_jax import dynamic_resolution
from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.data import pipeline
from detailflow_jax.train import checkpoints
from detailflow_jax.train import finetune
from detailflow_jax.train import loop
from detailflow_jax.train import sharding
from detailflow_jax.train import tokenizer_objective
from detailflow_jax.train import tokenizer_state
from detailflow_jax.train import tokenizer_visuals


class StepVariant(NamedTuple):
  """The static shape of one compiled train step."""
  image_size: int     # input side (the side the batch drew; tokenizer.image_size for one size)
  batch_size: int     # global batch at that side
  output_size: int    # decoder output / target side
  correction: bool
  gan: bool


def _variants_for(config, schedule, objective, num_latents, fixed_output=None):
  """(output size, correction, gan) of the prefixes n <= num_latents of one input side.
  fixed_output: the output size when the batch keeps all num_latents (the input side)."""
  n_for_size = {}
  for n in schedule.token_list:
    if n <= num_latents:
      size = fixed_output if n == num_latents and fixed_output else schedule.decoder_size(n)
      n_for_size.setdefault(size, []).append(n)
  full_size = fixed_output or schedule.decoder_size(num_latents)
  gan_settings = sorted({objective.gan_active(1), objective.gan_active(config.train.num_steps)})
  variants = []
  for size, ns in sorted(n_for_size.items()):
    if config.data.degrade_prob == 0 and size != full_size:
      continue
    corrections = {n > 1 for n in ns}
    if config.data.correction_prob < 1:
      corrections.add(False)
    for correction in sorted(corrections):
      for gan_active in gan_settings:
        variants.append((size, correction, gan_active))
  return variants


def step_variants(config, schedule, objective):
  """Every (output size, correction, gan) a run can meet at tokenizer.image_size; n = 1 never
  has a noise position. `gan` is fixed for a run (whether the discriminator exists)."""
  return _variants_for(config, schedule, objective, schedule.num_tokens)


def training_variants(config, schedule, objective, process_count=1):
  """Every StepVariant a run can meet: step_variants at tokenizer.image_size for a one-size
  run, else those of each side the batches can draw (dynamic_resolution.training_sizes)."""
  batch = config.data.batch_size
  sizes = dynamic_resolution.training_sizes(config)
  if sizes is None:
    return [StepVariant(schedule.image_size, batch, *v)
            for v in step_variants(config, schedule, objective)]
  variants = []
  for side in sizes.sides():
    rows = sizes.rows(batch // process_count, side) * process_count
    for v in _variants_for(config, schedule, objective, schedule.decres2besttoken[side], side):
      variants.append(StepVariant(side, rows, *v))
  return variants


def abstract_batch(config, output_size, mesh, image_size=None, batch_size=None):
  """ShapeDtypeStructs of one sharded global batch with targets at `output_size` (inputs at
  image_size, default tokenizer.image_size; batch_size default data.batch_size)."""
  b = batch_size or config.data.batch_size
  s = image_size or config.tokenizer.image_size
  struct = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)) if shape
      else sharding.replicated(mesh))
  return dict(image=struct((b, s, s, 3), jnp.float32),
              target=struct((b, output_size, output_size, 3), jnp.float32),
              num_tokens=struct((), jnp.int32), noise_position=struct((), jnp.int32),
              label=struct((b,), jnp.int32))


def describe_sizes(schedule, variants):
  """One line per input side: its latent tokens, batch and output sizes (the start-up log)."""
  lines = []
  for side in sorted({v.image_size for v in variants}):
    mine = [v for v in variants if v.image_size == side]
    lines.append(f"  side {side}: {schedule.decres2besttoken[side]} tokens, batch "
                 f"{mine[0].batch_size}, outputs {sorted({v.output_size for v in mine})}, "
                 f"{len(mine)} variants")
  return "\n".join(lines)


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
    fn = functools.partial(objective.train_step, use_correction=key.correction,
                           gan_active=key.gan)
    jitted = jax.jit(fn, in_shardings=(state_shardings, None, None),
                     out_shardings=(state_shardings, None), donate_argnums=(0,))
    batch = abstract_batch(config, key.output_size, mesh, key.image_size, key.batch_size)
    with sharding.use_mesh(mesh):
      return jitted.lower(abstract_state, batch, abstract_frozen).compile()

  compiled = {}
  variants = training_variants(config, schedule, objective, jax.process_count())
  for batch in sorted({v.batch_size for v in variants} - {config.data.batch_size}):
    sharding.check_batch_size(batch, mesh, name="data.batch_size reduced at a large side to")
  if dynamic_resolution.training_sizes(config) is not None:
    print(f"training sizes:\n{describe_sizes(schedule, variants)}", flush=True)
  if warm:
    logging.info("compiling %d train-step variants: %s", len(variants), variants)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      compiled.update(zip(variants, pool.map(lower, variants)))
    print(f"compiled {len(variants)} train-step variants in {time.perf_counter() - start:.0f} s",
          flush=True)

  def step(state, host_batch, step_number):
    image = host_batch["image"]
    key = StepVariant(image.shape[1], image.shape[0] * jax.process_count(),
                      host_batch["target"].shape[1], int(host_batch["noise_position"]) >= 0,
                      objective.gan_active(step_number))
    if key not in compiled:
      logging.info("compiling train step %s", key)
      compiled[key] = lower(key)
    with sharding.use_mesh(mesh):
      return compiled[key](state, sharding.shard_batch(host_batch, mesh), frozen)

  step.compiled = compiled  # {StepVariant: compiled step}, for benchmarks/train_step.py
  return step


def train_and_evaluate(config, workdir, on_metrics=None, name="tokenizer"):
  """The `train_tokenizer` job. `on_metrics(dict)` receives each logged set of scalars; `name`
  names the run in its messages and its SIGTERM safe point (train/loop.py)."""
  finetune.check_resume(config, workdir)
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
      name=name)
  if jax.process_index() == 0 and warm and not preemption.stop_requested():
    visuals(int(jax.device_get(state.step)), state)
  return state


def _already_trained(workdir, num_steps):
  checkpointer = checkpoints.Checkpointer(workdir)
  try:
    return (checkpointer.latest_step() or 0) >= num_steps
  finally:
    checkpointer.close()
