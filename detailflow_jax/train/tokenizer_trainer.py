"""Tokenizer training: config -> sharded state -> jitted steps -> orbax checkpoints.

Compiled variants: one train step per (decoder output size, self-correction on/off, GAN on/off).
The prefix length n and the noise position are traced scalars (the decoder masks latents beyond
n), so n itself never recompiles; `ResolutionSchedule.output_sizes()` lists the sizes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from detailflow_jax import detail
from detailflow_jax.data import pipeline
from detailflow_jax.train import loop
from detailflow_jax.train import sharding
from detailflow_jax.train import tokenizer_objective
from detailflow_jax.train import tokenizer_state
from detailflow_jax.train import tokenizer_visuals


def make_step_fn(objective, state_shardings, mesh):
  """Returns step(state, batch) dispatching to a jitted variant per static setting."""
  compiled = {}

  def step(state, host_batch, step_number):
    use_correction = int(host_batch["noise_position"]) >= 0
    gan_active = objective.gan_active(step_number)
    output_size = host_batch["target"].shape[1]
    key = (output_size, use_correction, gan_active)
    if key not in compiled:
      logging.info("compiling train step for output size %d, correction %s, gan %s", *key)
      fn = functools.partial(objective.train_step, use_correction=use_correction,
                             gan_active=gan_active)
      compiled[key] = jax.jit(fn, in_shardings=(state_shardings, None),
                              out_shardings=(state_shardings, None), donate_argnums=(0,))
    with mesh:
      return compiled[key](state, sharding.shard_batch(host_batch, mesh))

  return step


def train_and_evaluate(config, workdir, on_metrics=None):
  """The `train_tokenizer` job. `on_metrics(dict)` receives each logged set of scalars."""
  mesh = sharding.build_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh)
  schedule = detail.ResolutionSchedule.from_config(config.tokenizer)
  logging.info("decoder output sizes (compiled variants): %s", schedule.output_sizes())

  objective = tokenizer_objective.TokenizerObjective(config)
  state, abstract_state, shardings_ = tokenizer_state.create(config, objective, mesh)
  data = pipeline.make_tokenizer_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count())

  visuals = tokenizer_visuals.ReconstructionStrips(config, objective, workdir)
  hooks = [loop.LoopHooks(config.train.image_every, visuals)] if config.train.image_every else []
  state = loop.run(
      workdir=workdir, state=state, abstract_state=abstract_state,
      step_fn=make_step_fn(objective, shardings_, mesh), data_iterator=data,
      num_steps=config.train.num_steps, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints, hooks=hooks, on_metrics=on_metrics)
  if jax.process_index() == 0:
    visuals(int(jax.device_get(state.step)), state)
  return state
