"""Judging class-conditional samples with a classifier trained on the real data.

The judge is the fixed one of eval/classifier_fd.py (trained once per dataset, epochs and seed,
cached under ~/.cache/detailflow_jax/judge or $DETAILFLOW_JUDGE_CACHE), so its figures compare
across runs; the report adds the samples' classifier FD against the test split.
"""
import functools
import json
import pathlib

import numpy as np

from detailflow_jax import preemption
from detailflow_jax import workdir_io
from detailflow_jax.eval import classifier_fd

fashion_mnist_arrays = classifier_fd.fashion_mnist_arrays  # kept for callers of the old home


def judge_samples(workdir, samples_uint8, labels, fashion_mnist_dir, epochs=3, log=None, seed=0,
                  cache_dir=""):
  """Scores the samples with the fixed judge; writes WORKDIR/judge_report.json and returns it."""
  log = log or functools.partial(print, flush=True)
  judge = classifier_fd.fixed_judge(fashion_mnist_dir, epochs, seed, cache_dir, log)
  if preemption.reached("judge"):
    raise preemption.Preempted("SIGTERM: stopped before scoring the samples (the judge is "
                               "cached); run the same command to score them.")
  scores = classifier_fd.score_samples(judge, np.asarray(samples_uint8), labels)
  report = dict(judge_test_accuracy=judge.test_accuracy,
                sample_class_accuracy=scores["classifier_in_class_fraction"],
                per_class_accuracy=scores["classifier_per_class_accuracy"],
                num_samples=scores["num_images"], classifier_fd=scores["classifier_fd"],
                judge=judge.describe())
  path = pathlib.Path(workdir) / "judge_report.json"
  workdir_io.write_text_atomically(path, json.dumps(report, indent=2))
  log(f"judge: test accuracy {judge.test_accuracy:.4f}; samples in their conditioning class: "
      f"{report['sample_class_accuracy']:.4f} of {report['num_samples']}; classifier FD "
      f"against the test split {report['classifier_fd']:.3f} ({path})")
  return report
