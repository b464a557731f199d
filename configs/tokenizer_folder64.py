"""Tiny DetailFlow tokenizer for a folder of colour pictures at 64x64, CPU-sized.

  python -m detailflow_jax.main --config=configs/tokenizer_folder64.py --workdir=DIR \
      --config.data.folder=FOLDER

FOLDER is in the image-folder layout, FOLDER/train/<class>/* and FOLDER/test/<class>/*
(`python -m detailflow_jax.data.crop_folder` cuts one from a few large pictures; the runs in
docs/tokenizer.md used 72 pictures from four Debian wallpaper packages). The architecture is the
Fashion-MNIST recipe (configs/tokenizer_tiny.py) scaled to the larger picture with the same cost
per token: 8-pixel patches, so the decoder again routes its latents onto 64 patches, and twice
the tokens (64 in groups of 4), because a 64x64 colour picture holds more than a 32x32 grey one.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tokenizer_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

from detailflow_jax.config import defaults  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  c = tokenizer_tiny.get_config(arg)
  if arg == "smoke":
    c.tokenizer.image_size = 64
    c.tokenizer.min_decoder_size = 32
    for tower in (c.tokenizer.encoder, c.tokenizer.decoder):
      tower.patch_size = 8
    c.data.source = "folder"
    c.data.resize_min = c.data.resize_max = 64
    return c
  t = c.tokenizer
  t.image_size = 64
  t.num_tokens = 64
  t.group_size = 4
  t.causal_num = 4
  t.min_decoder_size = 32
  t.encoder = defaults.vit_config(128, 1, 4, 512, 8, 8)
  t.decoder = defaults.vit_config(128, 3, 4, 512, 8, 8)

  c.data.source = "folder"
  c.data.folder = ""          # required: --config.data.folder=FOLDER
  c.data.resize_min = 64
  c.data.resize_max = 64
  c.data.eval_split = "test"
  # The measured run of docs/tokenizer.md: 1,300 steps as one CPU device. The tiny config's two
  # devices and 1,600 steps were measured at 32 px only.
  c.cpu_devices = 1
  c.train.num_steps = 1300
  c.loss.lpips_warmup_steps = 260
  c.loss.gan_start_step = 870
  return c
