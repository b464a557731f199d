"""The reproduction study of the paper's three claims (docs/reproduction.md), job `study`.

Each arm is the embedded default pipeline (configs/default.py) with one switch flipped
(detailflow_jax/jobs/study_arms.py), trained from scratch in WORKDIR/<arm>; the report reads
every arm found there and writes tables and figures to WORKDIR/report.

  python -m detailflow_jax.main --config=configs/study.py --workdir=STUDY             # all
  python -m detailflow_jax.main --config=configs/study.py:no_degrade --workdir=STUDY  # one arm
  python -m detailflow_jax.main --config=configs/study.py:report --workdir=STUDY      # report

The argument is `all` (the default: every arm, then the report), `report`, or an arm name
(detailflow, no_degrade, bidirectional, no_correction, g1, detailflow_seed1); append `,long` for
the longer pipeline (configs/default.py:long) or `,smoke` for the seconds-per-stage test size,
e.g. `configs/study.py:g1,long`. The same command resumes after an interruption: finished arms
are skipped, the arm in progress resumes stage by stage.

--config.data.folder=FOLDER runs the same study on an image folder (FOLDER/train/<class>/* and
FOLDER/test/<class>/*): the tokenizer of configs/tokenizer_folder64.py (64 px colour, 64 tokens)
and a GPT over the folder's classes; without the Fashion-MNIST judge, the generator tables then
hold Inception figures (--config.study.compute_inception=True).
"""
import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import default  # pylint: disable=g-import-not-at-top,wrong-import-position
import tokenizer_folder64  # pylint: disable=g-import-not-at-top,wrong-import-position

from detailflow_jax.jobs import study_arms  # pylint: disable=g-import-not-at-top


def parse_arg(arg):
  """'what[,scale]' -> (what, scale): what is all | report | an arm; scale None | long | smoke."""
  what, _, scale = (arg or "all").partition(",")
  what = what or "all"
  if what not in ("all", "report") + study_arms.ARM_NAMES:
    raise ValueError(f"configs/study.py: unknown arg {arg!r}; use all, report or an arm "
                     f"({', '.join(study_arms.ARM_NAMES)}), optionally followed by ',long' or "
                     "',smoke'")
  if scale not in ("", "long", "smoke"):
    raise ValueError(f"configs/study.py: unknown scale {scale!r} in {arg!r}; use long or smoke")
  return what, scale or None


def get_config(arg=None):
  what, scale = parse_arg(arg)
  c = default.get_config(scale)
  c.job = "study"
  if what == "all":
    arms, report = study_arms.ARM_NAMES, True
  elif what == "report":
    arms, report = (), True
  else:
    arms, report = (what,), False
  c.study = study_arms.study_section(arms, report, smoke=scale == "smoke")
  if scale == "smoke":
    c.ar_run.extract.max_images = 64   # the GPT's smoke run reads a few codes only
  c.data = ml_collections.ConfigDict(dict(folder=""))   # an image folder instead of Fashion-MNIST
  folder_arg = "smoke" if scale == "smoke" else None
  c.folder_tokenizer = tokenizer_folder64.get_config(folder_arg).tokenizer
  return c
