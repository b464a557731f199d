"""Real-vs-real FID floor of Fashion-MNIST: test set against each half of the train set.

  python -m detailflow_jax.main --config=configs/eval_fid_reference.py \
      --workdir=workdirs/default/fid_reference [--config.eval.max_images_per_set=N]
"""
from detailflow_jax.config import eval_jobs


def get_config(arg=None):
  c = eval_jobs.eval_fid_reference_config()
  c.data.source = "fashion_mnist"
  c.eval.image_size = 32
  if arg == "smoke":  # a few images, for tests
    c.eval.max_images_per_set = 8
    c.eval.batch_size = 4
    c.eval.chunk_size = 4
  return c
