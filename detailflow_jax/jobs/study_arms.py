"""The arms of the reproduction study (docs/reproduction.md): the pipeline with one switch flipped.

Every arm is the `pipeline` job's config (configs/default.py, or its `long` variant) with the
switches of one row of ARMS set, trained from scratch in its own folder STUDY/<arm>, with the
same data, seeds and sampling settings as every other arm (except `detailflow_seed1`, whose
training seeds differ: it measures the run-to-run noise the verdicts compare against). The
switches are applied when the study runs, after the command line's overrides, so an override such
as --config.tokenizer_run.train.num_steps=500 changes every arm alike.

`folder_run` turns the whole study onto an image folder: the tokenizer of
configs/tokenizer_folder64.py (64 px colour, 64 tokens in groups of 4) and the folder's classes.
Pure config manipulation: no model, no data read here.
"""
import copy
import dataclasses
from typing import Callable

import ml_collections

from detailflow_jax import detail

# Claims (docs/reproduction.md), each answered by a table of the report.
ORDERING, CORRECTION, GROUP_SIZE, NOISE = "ordering", "correction", "group_size", "noise"


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  claims: tuple        # the claims whose tables this arm enters
  change: str          # what differs from the pipeline, in words
  switches: Callable   # pipeline config -> {dotted key: value}


def _no_switch(_):
  return {}


def _no_degrade(_):
  return {"tokenizer_run.data.degrade_prob": 0.0}


def _bidirectional(_):
  return {"tokenizer_run.tokenizer.latent_mask": "bidirectional"}


def _no_correction(_):
  return {"tokenizer_run.data.correction_prob": 0.0, "ar_run.data.correction_prob": 0.0}


def _group_size_1(config):
  # Checked on the pipeline's own layout: the same prefix lengths are evaluated in both arms (every
  # n is a prefix length at g = 1), so the per-n tables line up.
  t = config.tokenizer_run.tokenizer
  counts = detail.token_list(t.num_tokens, t.group_size, t.causal_num)
  return {"tokenizer_run.tokenizer.group_size": 1, "tokenizer_run.tokenizer.causal_num": 1,
          "ar_run.gpt.group_size": 1, "ar_run.gpt.causal_num": 1,
          "tokenizer_eval.token_counts": tuple(counts)}


def _second_seed(config):
  return {"tokenizer_run.seed": config.tokenizer_run.seed + 1,
          "ar_run.seed": config.ar_run.seed + 1}


ARMS = (
    Arm("detailflow", (ORDERING, CORRECTION, GROUP_SIZE, NOISE),
        "none: the pipeline as it is (degraded targets, group-causal latents, self-correction, "
        "g = 4)", _no_switch),
    Arm("no_degrade", (ORDERING,),
        "tokenizer trained on full-resolution targets only (no R(n)-degraded targets)",
        _no_degrade),
    Arm("bidirectional", (ORDERING,),
        "tokenizer encoder's latents attend to each other both ways (no group-causal latent mask)",
        _bidirectional),
    Arm("no_correction", (CORRECTION,),
        "self-correction off in tokenizer training and in the GPT's training sequences",
        _no_correction),
    Arm("g1", (GROUP_SIZE,),
        "group size 1 in tokenizer and GPT: plain next-token prediction, one code per step",
        _group_size_1),
    Arm("detailflow_seed1", (NOISE,),
        "none, with the tokenizer's and the GPT's training seeds + 1 (run-to-run noise)",
        _second_seed),
)
ARM_NAMES = tuple(arm.name for arm in ARMS)
# Keys of the study config that are not the pipeline's.
STUDY_ONLY_KEYS = ("study", "data", "folder_tokenizer")


def get_arm(name):
  for arm in ARMS:
    if arm.name == name:
      return arm
  raise ValueError(f"unknown study arm {name!r}; arms: {', '.join(ARM_NAMES)}")


def parse_names(text):
  """'a,b' -> ('a', 'b'), each checked to be an arm; '' -> ()."""
  names = tuple(name.strip() for name in str(text).split(",") if name.strip())
  for name in names:
    get_arm(name)
  return names


def parse_numbers(text, kind=float):
  """'1,1.5' -> (1.0, 1.5)."""
  return tuple(kind(value) for value in str(text).split(",") if value.strip())


def study_section(arms, report, smoke=False):
  """config.study: which arms this command trains, whether it writes the report, and the report's
  evaluation settings (the generator tables use `generator_seed`, the guidance sweep chooses on
  `sweep_seed`, as docs/recipe.md chose its settings on one seed and reported another)."""
  c = ml_collections.ConfigDict()
  c.arms = ",".join(arms)           # the arms this command trains (each in WORKDIR/<arm>)
  c.report = report                 # then the report of every arm found (WORKDIR/report)
  c.report_arms = ",".join(ARM_NAMES)
  c.generator_per_class = 1000      # 10,000 samples per generator arm (eval_generator)
  c.generator_seed = 0
  c.compute_inception = False       # FID / precision / recall (Inception; slow on a CPU)
  c.inception_weights = ""          # empty: $DETAILFLOW_INCEPTION_WEIGHTS or the default file
  c.sweep_arm = "detailflow"
  c.sweep_cfg_scales = "1.0,1.5,2.0,2.5,3.0,3.5,4.0"
  c.sweep_per_class = 300
  c.sweep_seed = 1
  c.speed_batch_sizes = "1,100"     # images/s of the sampler at each batch size
  c.speed_repeats = 5               # timed rounds (arms alternate; the median); 0: no timing
  c.strip_images = 4                # test images in the strip (evenly spaced); 0: no strip
  c.strip_max_columns = 12          # prefix lengths shown (evenly picked, n = N always)
  c.copy_figures_to = ""            # also copy the PNGs here (e.g. docs/images/study)
  if smoke:
    c.generator_per_class = 1
    c.sweep_per_class = 1
    c.sweep_cfg_scales = "1.0,2.0"
    c.speed_batch_sizes = "2"
    c.speed_repeats = 2
    c.strip_images = 2
  return c


def pipeline_part(config):
  """The pipeline's config out of a study config: job 'pipeline', without the study keys."""
  c = copy.deepcopy(config)
  c.unlock()
  for key in STUDY_ONLY_KEYS:
    if key in c:
      del c[key]
  c.job = "pipeline"
  return c


def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def folder_run(config, folder, num_classes):
  """The study config turned onto an image folder: the folder tokenizer (config.folder_tokenizer)
  and a GPT over its codes with the folder's classes; samples are not judged (the fixed judge is
  a Fashion-MNIST classifier), the generator tables then hold Inception figures only."""
  c = copy.deepcopy(config)
  tok = c.tokenizer_run
  tok.tokenizer = copy.deepcopy(c.folder_tokenizer)
  size = tok.tokenizer.image_size
  tok.data.source = "folder"
  tok.data.folder = folder
  tok.data.resize_min = tok.data.resize_max = size
  ar = c.ar_run
  ar.data.folder = folder
  ar.extract.source = "folder"
  ar.gpt.block_size = tok.tokenizer.num_tokens
  ar.gpt.group_size = tok.tokenizer.group_size
  ar.gpt.causal_num = tok.tokenizer.causal_num
  ar.gpt.vocab_size = tok.tokenizer.codebook_size
  ar.gpt.num_classes = int(num_classes)
  return c


def arm_config(config, name):
  """(the pipeline config of arm `name`, {dotted key: (pipeline value, arm value)})."""
  arm = get_arm(name)
  c = pipeline_part(config)
  if "token_counts" not in c.tokenizer_eval:
    c.tokenizer_eval.token_counts = ()   # empty: the tokenizer's own prefix lengths
  changed = {}
  for key, value in arm.switches(c).items():
    before = c
    for part in key.split("."):
      before = before[part]
    changed[key] = (before, value)
    _set(c, key, value)
  return c, changed
