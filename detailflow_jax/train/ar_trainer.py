"""AR (GPT) training (job=train_ar): config -> sharded state -> one jitted step -> checkpoints.

Reads the codes of job=extract_codes (data.codes_dir), trains the class-conditional GPT with
AdamW (decay on matrices only), warm-up + cosine, clipping and an optional EMA, on the shared
loop (resume, checkpoints with the data position, NaN stop, SIGTERM). One compiled step: every
batch has the same shapes.

The compute dtype is gpt.dtype (params stay float32); train.compute_dtype is the tokenizer
trainer's key and is not read here.
"""
import functools
import json
import time

import jax
import ml_collections
from absl import logging

from detailflow_jax import workdir_io
from detailflow_jax.data import codes
from detailflow_jax.models import gpt
from detailflow_jax.train import ar_objective
from detailflow_jax.train import loop
from detailflow_jax.train import sharding


def gpt_config_from(config):
  """The GPTConfig of config.gpt (ValueError naming unknown or invalid fields)."""
  return gpt.GPTConfig.from_dict(config.gpt)


def objective_key(config):
  """JSON of exactly the config fields the objective's traced functions depend on."""
  return json.dumps(dict(
      gpt=config.gpt.to_dict(), optim=config.optim.to_dict(),
      train=dict(num_steps=config.train.num_steps, ema_decay=config.train.ema_decay),
      data=dict(batch_size=config.data.batch_size)), sort_keys=True)


@functools.lru_cache(maxsize=4)
def compiled_functions(key_json, mesh):
  """(objective, abstract state, state shardings, jitted init, jitted step) for the JSON of
  `objective_key(config)`.

  Cached, so a second run in the same process (a resume, a test) reuses the compiled programs.
  The state is created inside jit in its shardings: no device holds an unsharded copy.
  """
  config = ml_collections.ConfigDict(json.loads(key_json))
  objective = ar_objective.ARObjective(config, gpt_config_from(config))
  abstract = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(abstract, mesh,
                                       gpt.param_logical_axes(objective.gpt_config))
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  init = jax.jit(objective.init_state, out_shardings=shardings)
  step = jax.jit(objective.train_step, in_shardings=(shardings, None),
                 out_shardings=(shardings, None), donate_argnums=(0,))
  return objective, abstract, shardings, init, step


def make_step_fn(compiled_step, objective, mesh, log_every, num_steps):
  """step(state, host_batch, step_number) -> (state, metrics) for the loop.

  Adds tokens_per_sec (targets per second of wall clock, data loading and checkpoints
  included) at every step the loop logs. The clock starts when the first step of the run
  (which compiles) is done; at a logged step the loop reads the metrics right away, so waiting
  for them here costs nothing, while other steps keep dispatching ahead.
  """
  tokens = objective.tokens_per_step()
  clock = dict(time=None, step=None)

  def step(state, host_batch, step_number):
    with sharding.use_mesh(mesh):
      state, metrics = compiled_step(state, sharding.shard_batch(host_batch, mesh))
    if clock["time"] is None:
      jax.block_until_ready(metrics)
      clock.update(time=time.perf_counter(), step=step_number)
    elif step_number % log_every == 0 or step_number == num_steps:
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      rate = tokens * (step_number - clock["step"]) / max(now - clock["time"], 1e-9)
      metrics = dict(metrics, tokens_per_sec=rate)
      clock.update(time=now, step=step_number)
    return state, metrics

  return step


def train_and_evaluate(config, workdir, on_metrics=None):
  """The `train_ar` job. `on_metrics(dict)` receives each logged set of scalars. Returns the
  final state."""
  workdir_io.save_workdir_config(config, workdir)
  mesh = sharding.build_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh)
  gpt_config = gpt_config_from(config)
  data = codes.make_ar_train_iterator(config, jax.process_index(), jax.process_count())
  objective, abstract_state, _, init, compiled_step = compiled_functions(
      objective_key(config), mesh)
  state = init(jax.random.PRNGKey(config.seed))
  logging.info("GPT: %s parameters, %d layers x %d wide; %d tokens per step",
               f"{ar_objective.param_count(state.params):,}", gpt_config.num_layers,
               gpt_config.dim, objective.tokens_per_step())
  return loop.run(
      workdir=workdir, state=state, abstract_state=abstract_state,
      step_fn=make_step_fn(compiled_step, objective, mesh, config.train.log_every,
                           config.train.num_steps), data_iterator=data,
      num_steps=config.train.num_steps, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints, on_metrics=on_metrics, name="ar")
