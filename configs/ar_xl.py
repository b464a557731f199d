"""GPT-XL on ImageNet codes (job=train_ar), with the reference's training settings.

get_config(arg): arg is the token count N of the tokenizer (128 default, 256 or 512, i.e.
DetailFlow-16/32/64 with groups of 8). The same file runs the code extraction:
  --config=configs/ar_xl.py --config.job=extract_codes --config.extract.tokenizer_workdir=TOK
      --config.data.codes_dir=CODES --workdir=WORKDIR
  --config=configs/ar_xl.py --config.data.codes_dir=CODES --workdir=WORKDIR
Reference settings: AdamW lr 1e-4, wd 0.05 on matrices, betas (0.9, 0.95), 5% warm-up then
cosine to 1%, clipping 1.0, dropout 0.1, EMA 0.9999, batch 512, 300 epochs, bf16 compute;
codes from TenCrop (crop 281 -> 256, with flips) with one noise position per image, and the
self-correction sequence for 30% of samples.
"""
from detailflow_jax import config_defaults as defaults

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  num_tokens = int(arg) if arg else 128
  if num_tokens not in (128, 256, 512):
    raise ValueError(f"configs/ar_xl.py: arg={arg!r} must be a token count: 128, 256 or 512")
  c = defaults.ar_training_config("XL")
  c.gpt.block_size = num_tokens
  c.gpt.dtype = "bfloat16"
  c.data.batch_size = 512
  c.train.num_steps = 300 * (IMAGENET_TRAIN_IMAGES // c.data.batch_size)  # drop_last epochs

  c.extract.source = "tfds"          # the image source to encode (data.source is "codes")
  c.extract.ten_crop = True
  c.extract.ten_crop_size = 281      # int(256 * 1.1), the reference's crop_range
  c.extract.flips = True
  c.extract.shard_size = 10_000
  c.extract.batch_size = 32          # x 10 views = 320 images per encoder call
  return c
