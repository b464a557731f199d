"""Samples of the tiny Fashion-MNIST GPT + tokenizer (default run) and their FID against the test set.

  python -m detailflow_jax.main --config=configs/eval_generator_tiny.py \
      --workdir=workdirs/default/eval [--config.eval.cfg_scale=2.0]

10,000 samples (1,000 per class) with seed 0, compared with the 10,000 Fashion-MNIST test
images (FID, sFID, precision, recall). Writes WORKDIR/eval_generator/<settings>/samples.npz,
sampling.json and metrics.json. ImageNet settings: --config.eval.labels_per_class=50 (50,000
samples) and --config.eval.reference=VIRTUAL_imagenet256_labeled.npz.
"""
from detailflow_jax.config import eval_jobs


def get_config(arg=None):
  c = eval_jobs.eval_generator_config()
  c.data.source = "fashion_mnist"
  c.eval.gpt_workdir = eval_jobs.DEFAULT_AR_WORKDIR
  c.eval.tokenizer_workdir = eval_jobs.DEFAULT_TOKENIZER_WORKDIR
  c.eval.labels_per_class = 1000
  c.eval.num_samples = 0
  c.eval.seed = 0
  c.eval.cfg_scale = 2.0          # the default run's sampling scale (configs/default.py)
  c.eval.batch_size = 250
  c.eval.inception_batch_size = 125  # Inception activations at 299 px: keep host memory low
  c.eval.reference = ""          # the data section's test split
  c.eval.reference_split = "test"
  if arg:
    raise ValueError(f"configs/eval_generator_tiny.py: unknown arg {arg!r}; it takes none")
  return c
