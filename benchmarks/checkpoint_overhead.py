"""What checkpointing costs a training run: train steps with a checkpoint every --every steps
against the same steps with none.

One process, one compiled GPT train step (configs/ar_<--gpt>.py at its batch, through
`ar_trainer.compiled_functions`, the program the trainer runs; random codes). Each run trains
--steps steps from the state the previous run left and, in the checkpointing arms, saves the
state plus an iterator state every --every steps with `train/checkpoints.py` into a fresh
folder, as `train/loop.py` does: `async` as the trainers save, `sync` waiting for every write.
A run ends when its last save is on disk (the default 120 steps put the last save 20 steps
before the end, as in the middle of a long run). The arms run interleaved (none, async, sync,
none, ...) --rounds times, so a change of machine load hits every arm alike; each arm's figure
is the median over its runs of (run time / steps).

  python benchmarks/checkpoint_overhead.py --gpt tiny --steps 120 --every 50 --rounds 5

Prints one line per run, then each arm's median step time and its ratio to no checkpointing.
Time on an otherwise idle machine: runs on a shared one differ by up to 30%.
"""
import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from detailflow_jax.config import files  # pylint: disable=wrong-import-position
from detailflow_jax.train import ar_trainer  # pylint: disable=wrong-import-position
from detailflow_jax.train import checkpoints  # pylint: disable=wrong-import-position
from detailflow_jax.train import sharding  # pylint: disable=wrong-import-position

ARMS = ("none", "async", "sync")


def one_run(arm, compiled, state, batch, steps, every, folder):
  """Seconds per step of one run of `arm` (the checkpoint writes it started included)."""
  checkpointer = None
  if arm != "none":
    checkpointer = checkpoints.Checkpointer(folder, keep=2, async_save=arm == "async")
  start = time.perf_counter()
  for step in range(1, steps + 1):
    state, metrics = compiled(state, batch)
    if checkpointer is not None and step % every == 0:
      checkpointer.save(step, state, {"next_index": step})
  jax.block_until_ready((state, metrics))
  if checkpointer is not None:
    checkpointer.wait()
  seconds = time.perf_counter() - start
  if checkpointer is not None:
    checkpointer.close()
  return seconds / steps, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gpt", default="tiny", help="configs/ar_<name>.py (tiny, B, ...)")
  parser.add_argument("--batch", type=int, default=0, help="0: the config's batch")
  parser.add_argument("--steps", type=int, default=120, help="train steps per run")
  parser.add_argument("--every", type=int, default=50, help="checkpoint interval (steps)")
  parser.add_argument("--rounds", type=int, default=5, help="runs of each arm")
  parser.add_argument("--arms", default="none,async,sync",
                      help=f"comma-separated, of {ARMS}; 'none' is the reference")
  parser.add_argument("--dir", default="", help="where checkpoints go (default: a temp folder)")
  args = parser.parse_args()
  arms = [a for a in args.arms.split(",") if a]
  if "none" not in arms or any(a not in ARMS for a in arms):
    parser.error(f"--arms={args.arms!r}: give 'none' and any of {ARMS[1:]}")
  if args.steps < args.every:
    parser.error(f"--steps={args.steps} < --every={args.every}: no run would checkpoint")

  config = files.load_config_file(str(train_step.ROOT / "configs" / f"ar_{args.gpt.lower()}.py"))
  config.gpt.dtype = "float32"
  if args.batch:
    config.data.batch_size = args.batch
  mesh = sharding.build_mesh(config.mesh)
  _, _, _, init, step = ar_trainer.compiled_functions(ar_trainer.objective_key(config), mesh)
  state = init(jax.random.PRNGKey(config.seed))
  batch = sharding.shard_batch(train_step.gpt_host_batch(config), mesh)
  compiled = step.lower(state, batch).compile()
  state, _ = compiled(state, batch)   # warm: first call's allocations
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  print(f"GPT {args.gpt}: batch {config.data.batch_size}, train state {size / 2**20:.1f} MiB; "
        f"{args.steps} steps per run, a checkpoint every {args.every}; devices "
        f"{jax.devices()}", flush=True)

  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="checkpoint_overhead_"))
  per_step = {arm: [] for arm in arms}
  try:
    for round_index in range(args.rounds):
      for arm in arms:
        folder = root / f"{arm}_{round_index}"
        seconds, state = one_run(arm, compiled, state, batch, args.steps, args.every, folder)
        shutil.rmtree(folder, ignore_errors=True)
        per_step[arm].append(seconds)
        print(f"round {round_index + 1} {arm:5s}: {1000 * seconds:.1f} ms/step", flush=True)
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)

  reference = statistics.median(per_step["none"])
  print("\n| checkpointing | median ms/step | runs | ratio to none |\n| --- | --- | --- | --- |")
  for arm in arms:
    median = statistics.median(per_step[arm])
    print(f"| {arm} | {1000 * median:.1f} | {len(per_step[arm])} | {median / reference:.3f} |")


if __name__ == "__main__":
  main()
