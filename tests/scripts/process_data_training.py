"""A tiny model trained by train/loop.py in every process of a job, each process reading its own
grain data stream from its own position; prints every logged step's scalars.

usage (one process, or under launch/local_multiprocess.sh N 1):
  python process_data_training.py WORKDIR NUM_STEPS CHECKPOINT_EVERY [SECONDS_PER_STEP]

Process p shuffles with its own seed and starts OFFSET * p batches into its stream, so the
processes' iterator states differ: a process restored with another's state (or none) reads
other rows, and the losses and final weights of a resumed run then differ from an uninterrupted
one. The weights are sharded over the processes (one row each), so every process writes its
own checkpoint shard. Every process prints `METRICS {json}` lines (flushed) with its index.
"""
import json
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from detailflow_jax import distributed
from detailflow_jax import preemption
from detailflow_jax.train import loop

FEATURES, LOCAL_BATCH, OFFSET, LEARNING_RATE = 16, 4, 3, 0.01


def data_iterator(process_index):
  """Infinite (x, y) batches of this process; y is a fixed function of x."""
  true_w = np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32)

  def example(index):
    x = np.random.default_rng(index).standard_normal(FEATURES).astype(np.float32)
    return dict(x=x, y=np.float32(x @ true_w + 0.1 * np.sin(index)))

  dataset = (grain.MapDataset.range(10_000).shuffle(seed=17 + process_index).repeat()
             .map(example).batch(LOCAL_BATCH, drop_remainder=True))
  iterator = iter(dataset.to_iter_dataset())
  for _ in range(OFFSET * process_index):
    next(iterator)
  return iterator


def main(argv):
  workdir, num_steps, checkpoint_every = argv[1], int(argv[2]), int(argv[3])
  seconds_per_step = float(argv[4]) if len(argv) > 4 else 0.0
  distributed.initialize()
  count = jax.process_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  shardings = {"w": rows, "step": replicated}
  state = jax.jit(lambda: {"w": jnp.zeros((count, FEATURES)), "step": jnp.int32(0)},
                  out_shardings=shardings)()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

  def loss_fn(w, batch):
    # Row r of w weighs x ** (r + 1): every process's shard of the weights gets a gradient.
    powers = jnp.stack([batch["x"] ** (r + 1) for r in range(w.shape[0])], axis=1)
    prediction = jnp.einsum("brf,rf->b", powers, w)
    return jnp.mean((prediction - batch["y"]) ** 2)

  def train_step(state, batch):
    loss, grad = jax.value_and_grad(loss_fn)(state["w"], batch)
    return {"w": state["w"] - LEARNING_RATE * grad, "step": state["step"] + 1}, {"loss": loss}

  compiled = jax.jit(train_step, in_shardings=(shardings, None),
                     out_shardings=(shardings, None), donate_argnums=(0,))

  def step_fn(state, host_batch, step):
    del step
    batch = {k: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), v)
             for k, v in host_batch.items()}
    return compiled(state, batch)

  def report(scalars):
    print("METRICS " + json.dumps(dict(scalars, process=jax.process_index())), flush=True)
    time.sleep(seconds_per_step)

  with preemption.sigterm_caught():
    state = loop.run(workdir=workdir, state=state, abstract_state=abstract, step_fn=step_fn,
                     data_iterator=data_iterator(jax.process_index()), num_steps=num_steps,
                     log_every=1, checkpoint_every=checkpoint_every, keep_checkpoints=3,
                     step_of=lambda s: s["step"], on_metrics=report, name="ar")
  print(f"FINISHED process {jax.process_index()} at step {int(state['step'])}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
