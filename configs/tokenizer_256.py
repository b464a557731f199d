"""DetailFlow tokenizer with N = 256 tokens at 256 px (the paper's DetailFlow-32)."""
from detailflow_jax.config import defaults


def get_config(arg=None):
  del arg
  c = defaults.tokenizer_training_config()
  c.tokenizer.num_tokens = 256
  c.data.source = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.eval_split = "validation"
  # One epoch of ImageNet at batch 256 is ~5k steps; the paper trains 250 epochs.
  c.train.num_steps = 250 * 5004
  return c
