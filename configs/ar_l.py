"""GPT-L on ImageNet codes (job=train_ar), with the reference's training settings.

get_config(arg): arg is the tokenizer's token count N (128 default, 256 or 512). The same file
runs the code extraction:
  --config=configs/ar_l.py --config.job=extract_codes --config.extract.tokenizer_workdir=TOK
      --config.data.codes_dir=CODES --workdir=WORKDIR
  --config=configs/ar_l.py --config.data.codes_dir=CODES --workdir=WORKDIR
See defaults.imagenet_ar_config for the settings.
"""
from detailflow_jax.config import defaults


def get_config(arg=None):
  return defaults.imagenet_ar_config("L", arg)
