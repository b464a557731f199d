"""AR training (train/ar_trainer.py, train/ar_objective.py) on small synthetic codes."""
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.config.files import load_config_file
from detailflow_jax.data import codes
from detailflow_jax.jobs import extract_codes
from detailflow_jax.train import ar_objective
from detailflow_jax.train import ar_trainer
from detailflow_jax.train import checkpoints
from detailflow_jax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_IMAGES, N, CODEBOOK = 48, 32, 64


def write_synthetic_codes(directory, shard_size=20):
  """Codes a GPT can learn: clean code t of an image of class y is (5 y + t) % 64; the noisy
  input replaces group 2 and the label row corrects the codes after it."""
  tok = load_config_file(str(REPO / "configs" / "tokenizer_tiny.py") + ":smoke").tokenizer
  manifest = extract_codes.build_manifest(
      tokenizer_config=tok, num_images=NUM_IMAGES, shard_size=shard_size,
      views=("center", "center_flip"), num_classes=10)
  directory.mkdir(parents=True)
  extract_codes.write_or_check_manifest(directory, manifest)
  labels = np.arange(NUM_IMAGES) % 10
  clean = (5 * labels[:, None] + np.arange(N)[None]) % CODEBOOK
  noisy, label_row = clean.copy(), clean.copy()
  noisy[:, 8:12] = (clean[:, 8:12] + 1) % CODEBOOK
  noisy[:, 12:] = label_row[:, 12:] = (clean[:, 12:] + 2) % CODEBOOK
  triplets = np.stack([clean, noisy, label_row], axis=1)            # (images, 3, N)
  views = np.stack([triplets, triplets[:, :, ::-1]], axis=1).astype(np.int16)
  for s, first, count in extract_codes.shard_plan(NUM_IMAGES, shard_size):
    extract_codes.write_shard(directory, s, views[first:first + count],
                              labels[first:first + count], np.full(count, 8))
  return manifest


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("ar") / "codes"
  write_synthetic_codes(directory)
  return directory


def smoke_config(codes_dir, steps):
  config = load_config_file(str(REPO / "configs" / "ar_tiny.py") + ":smoke")
  config.data.codes_dir = str(codes_dir)
  config.train.num_steps = steps
  config.train.checkpoint_every = 2
  config.optim.learning_rate = 3e-3
  return config


def leaves(tree):
  return jax.tree_util.tree_leaves(jax.device_get(tree))


@pytest.fixture(scope="module")
def straight_run(codes_dir, tmp_path_factory):
  flags.FLAGS.mark_as_parsed()
  workdir = tmp_path_factory.mktemp("straight")
  logged = []
  state = ar_trainer.train_and_evaluate(smoke_config(codes_dir, 4), str(workdir),
                                        on_metrics=logged.append)
  return dict(state=state, logged=logged, workdir=workdir)


def test_loss_decreases_and_metrics_are_logged(straight_run):
  logged = straight_run["logged"]
  assert [m["step"] for m in logged] == [1, 2, 3, 4]
  losses = [m["loss"] for m in logged]
  # The output layer starts at zero: the first loss is exactly log(vocab).
  np.testing.assert_allclose(losses[0], np.log(CODEBOOK), rtol=1e-5)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05
  groups = ar_objective.logged_groups(N // 4)
  assert groups == [0, 1, 2, 4, 6, 7]
  assert {f"acc_group_{g}" for g in groups} <= set(logged[-1])
  assert {"accuracy", "grad_norm", "learning_rate", "tokens_per_sec"} <= set(logged[-1])
  assert "tokens_per_sec" not in logged[0]  # the first call compiles


def test_resume_after_restart_is_bit_exact(straight_run, codes_dir, tmp_path):
  workdir = str(tmp_path / "resumed")

  def preempt_at_step_2(metrics):
    if metrics["step"] == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop saves step 2 and returns

  stopped = ar_trainer.train_and_evaluate(smoke_config(codes_dir, 4), workdir,
                                          on_metrics=preempt_at_step_2)
  assert int(stopped.step) == 2
  preemption.clear()  # the SIGTERM was acted on; a new process would start clear
  logged = []
  resumed = ar_trainer.train_and_evaluate(smoke_config(codes_dir, 4), workdir,
                                          on_metrics=logged.append)
  assert [m["step"] for m in logged] == [3, 4], "the resumed run must start after step 2"
  straight = straight_run["state"]
  assert int(resumed.step) == int(straight.step) == 4
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(leaves(getattr(straight, name)), leaves(getattr(resumed, name))):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(logged[-1]["loss"], straight_run["logged"][-1]["loss"])


def test_ema_follows_the_params(straight_run, codes_dir):
  config = smoke_config(codes_dir, 4)
  mesh = sharding.build_mesh(config.mesh)
  objective, _, _, init, step = ar_trainer.compiled_functions(
      ar_trainer.objective_key(config), mesh)
  state = init(jax.random.PRNGKey(config.seed))
  initial = leaves(state.params)
  batch = next(codes.make_ar_train_iterator(config))
  state, _ = step(state, sharding.shard_batch(batch, mesh))
  decay = config.train.ema_decay
  for e, p, p0 in zip(leaves(state.ema_params), leaves(state.params), initial):
    np.testing.assert_allclose(e, decay * p0 + (1 - decay) * p, rtol=1e-6, atol=1e-7)
  final = straight_run["state"]
  moved = [not np.array_equal(e, p) for e, p in zip(leaves(final.ema_params), leaves(final.params))]
  assert any(moved)
  assert objective.tokens_per_step() == 8 * N


def test_workdir_config_and_load_gpt(straight_run):
  workdir = straight_run["workdir"]
  loaded = workdir_io.load_gpt(workdir)
  assert loaded.step == 4 and loaded.config.block_size == N and loaded.config.vocab_size == CODEBOOK
  for a, b in zip(leaves(loaded.params), leaves(straight_run["state"].params)):
    np.testing.assert_array_equal(a, b)
  ema = workdir_io.load_gpt(workdir, use_ema=True)
  for a, b in zip(leaves(ema.params), leaves(straight_run["state"].ema_params)):
    np.testing.assert_array_equal(a, b)
  assert workdir_io.load_workdir_config(workdir).job == "train_ar"


def test_group_accuracies():
  targets = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
  logits = jax.nn.one_hot(jnp.array([[0, 1, 2, 3, 0, 0, 0, 3]]), 4)
  np.testing.assert_allclose(ar_objective.group_accuracies(logits, targets, 4), [1.0, 0.5])


def test_codes_that_do_not_fit_the_gpt_are_rejected(codes_dir, tmp_path):
  config = smoke_config(codes_dir, 2)
  config.gpt.vocab_size = 128
  with pytest.raises(ValueError, match=r"gpt.vocab_size=128 does not match the codes' "
                                       r"codebook_size=64"):
    ar_trainer.train_and_evaluate(config, str(tmp_path / "w"))
  config = smoke_config(tmp_path / "nothing", 2)
  with pytest.raises(ValueError, match="run job=extract_codes first"):
    ar_trainer.train_and_evaluate(config, str(tmp_path / "w"))
