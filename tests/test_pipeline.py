"""The pipeline job (jobs/pipeline.py) under SIGTERM: a test per stage, configs/default.py:smoke.

Each test stops the pipeline inside one stage with a real SIGTERM, sent by the process to itself
at a chosen safe point (DETAILFLOW_SIGTERM_AT, preemption.py), so no test waits on a timer. The
stopped run must exit 0 and start no later stage; the same command must then finish, and the final
params, codes and samples must equal those of an uninterrupted run bit for bit.

To stay fast, one workdir is stopped in every stage in turn (each run resumes the stage the run
before stopped in, then stops in the next), so the module starts 9 pipeline processes (the
uninterrupted one included), and every run shares one compilation cache; most of the time is JAX
tracing the smoke models again in every new process.
"""
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from scripts import training_runs as runs

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "default.py") + ":smoke"
WORKDIR = "run"


@dataclasses.dataclass(frozen=True)
class Stage:
  folder: str        # its sub-workdir
  title: str         # its "==> title" line
  point: str         # DETAILFLOW_SIGTERM_AT: where the stopped run gets SIGTERM
  stopped: str       # what the stopped run prints (regex)
  output: str        # a file (relative to WORKDIR) that exists only once the stage is complete
  resumed: str = ""  # what the rerun prints when it resumes the stage (regex)


STAGES = (
    Stage("tokenizer", "train tokenizer", "tokenizer_step:3",
          r"SIGTERM: saved step 3; exiting \(tokenizer: 3 of 4 steps\)", "tokenizer/checkpoints/4",
          r"resumed from step 3 in "),
    Stage("decoder", "train decoder", "decoder_step:3",
          r"SIGTERM: saved step 3; exiting \(decoder: 3 of 4 steps\)", "decoder/checkpoints/4",
          r"resumed from step 3 in "),
    Stage("tokenizer_eval", "evaluate tokenizer", "eval_tokenizer_batch:1",
          r"SIGTERM: tokenizer evaluation stopped after 8 images", "tokenizer_eval/metrics.json"),
    Stage("codes", "extract codes", "extract_batch:3",
          r"SIGTERM: code extraction stopped with 1 of 4 shards complete", "codes/codes_00003.npy",
          r"1 shards already complete, skipped: \[0\]"),
    Stage("ar", "train GPT", "ar_step:3", r"SIGTERM: saved step 3; exiting \(ar: 3 of 4 steps\)",
          "ar/checkpoints/4", r"resumed from step 3 in "),
    Stage("samples", "sample", "sample_batch:1", r"SIGTERM: sampling stopped after 10 of 20",
          "samples/sample_settings.json"),
    Stage("judge", "judge samples", "judge:1", r"SIGTERM: stopped before scoring the samples",
          "judge/judge_report.json", r"samples in run/samples are complete .*; kept"),
)
# Two sampling batches, so the sample stage can stop between them.
OVERRIDES = ("--config.sample.batch_size=10",)


def pipeline_command(fmnist_dir):
  return [sys.executable, "-m", "detailflow_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
          f"--config.tokenizer_run.data.fashion_mnist_dir={fmnist_dir}",
          f"--config.ar_run.data.fashion_mnist_dir={fmnist_dir}", *OVERRIDES]


def run_pipeline(root, env, fmnist_dir, sigterm_at=None):
  """The pipeline with --workdir=run in `root`; returns (status, merged output)."""
  env = dict(env)
  if sigterm_at:
    env["DETAILFLOW_SIGTERM_AT"] = sigterm_at
  out = subprocess.run(pipeline_command(fmnist_dir), cwd=root, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900, check=False)
  return out.returncode, out.stdout


def started_stages(output):
  return re.findall(r"^==> ([a-zA-Z ]+?)(?::|$)", output, re.MULTILINE)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """One CPU device, a compilation cache and a judge cache shared by every run here."""
  base = tmp_path_factory.mktemp("caches")
  return runs.cpu_env(1, DETAILFLOW_COMPILATION_CACHE=base / "xla",
                      DETAILFLOW_JUDGE_CACHE=base / "judge", PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env, fake_fmnist_dir):
  """The workdir of a pipeline run that nothing stopped."""
  root = tmp_path_factory.mktemp("uninterrupted")
  status, output = run_pipeline(root, env, fake_fmnist_dir)
  assert status == 0, output[-4000:]
  assert started_stages(output) == [s.title for s in STAGES]
  return root / WORKDIR


def checkpoint_state(workdir, folder):
  steps = runs.finished_steps(workdir / folder)
  return steps[-1], runs.flat_with_paths(runs.restore_numpy(workdir / folder, steps[-1]))


def assert_same_results(workdir, expected_dir):
  """Final params (whole train states), codes and samples equal bit for bit."""
  for folder in ("tokenizer", "decoder", "ar"):
    step, state = checkpoint_state(workdir, folder)
    expected_step, expected = checkpoint_state(expected_dir, folder)
    assert step == expected_step and state.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_array_equal(state[key], value, err_msg=f"{folder} {key}")
  expected_codes = sorted(p.name for p in (expected_dir / "codes").glob("*.npy"))
  assert sorted(p.name for p in (workdir / "codes").glob("*.npy")) == expected_codes
  for name in expected_codes:
    assert (workdir / "codes" / name).read_bytes() == (expected_dir / "codes" / name).read_bytes()
  assert ((workdir / "samples" / "codes.npy").read_bytes()
          == (expected_dir / "samples" / "codes.npy").read_bytes())
  with np.load(workdir / "samples" / "samples.npz") as got, \
       np.load(expected_dir / "samples" / "samples.npz") as want:
    for key in ("arr_0", "arr_1"):
      np.testing.assert_array_equal(got[key], want[key])
  report = json.loads((workdir / "judge" / "judge_report.json").read_text())
  expected_report = json.loads((expected_dir / "judge" / "judge_report.json").read_text())
  assert report == expected_report


def test_sigterm_in_every_stage_exits_zero_and_the_same_command_finishes(uninterrupted, env,
                                                                         fake_fmnist_dir, tmp_path):
  """One workdir, stopped once inside every stage in turn: run i resumes stage i - 1 where run
  i - 1 stopped it, then gets SIGTERM inside stage i; a last run finishes the pipeline."""
  workdir = tmp_path / WORKDIR
  previous = None
  for index, stage in enumerate(STAGES):
    status, output = run_pipeline(tmp_path, env, fake_fmnist_dir, sigterm_at=stage.point)
    context = f"stopped in stage '{stage.title}':\n{output[-4000:]}"
    assert status == 0, context
    if previous is not None:
      assert re.search(previous.resumed, output), context
    assert re.search(stage.stopped, output), context
    assert re.search(rf"pipeline stopped (in|after) stage '{stage.title}'", output), context
    started = started_stages(output)
    assert started[-1] == stage.title, started          # it stopped in this stage ...
    for later in STAGES[index:]:                        # ... and nothing after it ran
      assert not (workdir / later.output).exists(), later.output
    assert not (workdir / "summary.json").exists()
    previous = stage

  status, output = run_pipeline(tmp_path, env, fake_fmnist_dir)
  assert status == 0, output[-4000:]
  assert re.search(previous.resumed, output), output[-4000:]
  assert (workdir / "summary.json").is_file()
  assert_same_results(workdir, uninterrupted)
