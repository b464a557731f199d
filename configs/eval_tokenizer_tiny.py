"""Reconstruction metrics per prefix length of the tiny Fashion-MNIST tokenizer (default run).

  python -m detailflow_jax.main --config=configs/eval_tokenizer_tiny.py \
      --workdir=workdirs/default/eval \
      [--config.eval.tokenizer_workdir=workdirs/default/decoder]

Writes WORKDIR/eval_tokenizer/metrics.json and curve.png: PSNR/SSIM against the R(n) target and
the full image, LPIPS, rFID and codebook usage for every n of the token list, on the 10,000 test
images. rFID runs the Inception network once per n (12 passes of 10k images): use an
accelerator, or --config.eval.fid_token_counts='(32,)' / --config.eval.compute_fid=False on a CPU.
"""
from detailflow_jax.config import eval_jobs


def get_config(arg=None):
  c = eval_jobs.eval_tokenizer_config()
  c.data.source = "fashion_mnist"
  c.eval.tokenizer_workdir = eval_jobs.DEFAULT_TOKENIZER_WORKDIR
  c.eval.split = "test"
  c.eval.num_images = 0
  c.eval.batch_size = 250
  c.eval.inception_batch_size = 125  # Inception activations at 299 px: keep host memory low
  if arg == "quick":  # PSNR/SSIM/codebook only, on 1000 images: seconds on a CPU
    c.eval.num_images = 1000
    c.eval.compute_fid = False
    c.eval.compute_lpips = False
  elif arg:
    raise ValueError(f"configs/eval_tokenizer_tiny.py: unknown arg {arg!r}; use none or 'quick'")
  return c
