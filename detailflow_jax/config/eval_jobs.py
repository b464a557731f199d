"""Config sections of the evaluation jobs (eval_tokenizer, eval_generator, eval_fid_reference).

Each job config has `job`, `eval` (the job's settings), `data` (where real images come from:
the config.defaults data section, read with an eval split) and `mesh` (the devices of this host
that batches are split over). Trained models are read from workdirs named by config keys; the
defaults are the default run's workdirs.
"""
import ml_collections

from detailflow_jax.config import defaults

DEFAULT_TOKENIZER_WORKDIR = "workdirs/default/decoder"  # the default run's final tokenizer
DEFAULT_AR_WORKDIR = "workdirs/default/ar"


def _inception_fields(c):
  c.inception_weights = ""     # FID Inception .npz; empty: $DETAILFLOW_INCEPTION_WEIGHTS or default
  c.inception_batch_size = 64
  c.fid_method = "sqrtm"       # sqrtm (ADM) | eigvals (same value, faster)


def _judge_fields(c):
  c.judge_cache_dir = ""       # fixed judge cache; empty: $DETAILFLOW_JUDGE_CACHE or
                               # ~/.cache/detailflow_jax/judge
  c.judge_epochs = 3           # the fixed judge's recipe (part of its cache key)
  c.judge_seed = 0


def eval_tokenizer_section():
  """Reconstruction metrics of a trained tokenizer, per prefix length n."""
  c = ml_collections.ConfigDict()
  c.tokenizer_workdir = DEFAULT_TOKENIZER_WORKDIR  # empty: the job's --workdir
  c.step = -1                  # checkpoint step; -1: latest
  c.use_ema = False            # the official evaluation uses the raw (non-EMA) tokenizer
  c.split = "test"
  c.num_images = 0             # 0: the whole split
  c.batch_size = 64
  c.image_size = 0             # side to evaluate at (an any-resolution tokenizer: images cropped
                               # to it, encoded with its token count); 0: the tokenizer's own
  c.token_counts = ()          # prefix lengths n; empty: the schedule's token list
  c.compute_fid = True         # rFID per n (one Inception pass per n: slow on CPU)
  c.fid_token_counts = ()      # the n that get an rFID; empty: every n of token_counts
  c.compute_lpips = True
  c.lpips_token_counts = ()    # the n that get LPIPS; empty: every n of token_counts
  c.reference_cache = ""       # real-image statistics .npz (eval_generator's format): read
                               # when present, else written; empty: computed, not kept
  c.compute_classifier = True  # data.source fashion_mnist only: the fixed judge's accuracy and
                               # classifier FD of the full-size reconstructions, every n
  _judge_fields(c)
  _inception_fields(c)
  return c


def eval_tokenizer_config():
  c = ml_collections.ConfigDict()
  c.job = "eval_tokenizer"
  c.eval = eval_tokenizer_section()
  c.data = defaults.data_config()
  c.mesh = defaults.mesh_config()
  return c


def eval_generator_section():
  """Class-conditional samples of a trained GPT + tokenizer; their FID and classifier FD."""
  c = ml_collections.ConfigDict()
  c.gpt_workdir = DEFAULT_AR_WORKDIR
  c.gpt_step = -1
  c.gpt_use_ema = True         # as the official sampler (use_gpt_ema=True)
  c.tokenizer_workdir = ""     # empty: extract.tokenizer_workdir of the GPT's training config
  c.tokenizer_step = -1
  c.tokenizer_use_ema = False
  c.num_samples = 10_000       # used when labels_per_class is 0 (labels uniformly random)
  c.labels_per_class = 0       # > 0: exactly this many samples of every class (ImageNet: 50)
  c.seed = 0                   # labels and sampling noise; sample i depends only on (seed, i)
  c.cfg_scale = 1.5
  c.gradual_cfg = False
  c.temperature = 1.0
  c.top_k = 0                  # 0: no top-k filter (official eval: 8192 = no filter)
  c.top_p = 1.0
  c.image_size = 0             # side to sample at (an any-resolution tokenizer): its token count,
                               # decoded at that side; 0: the tokenizer's own size
  c.num_tokens = 0             # codes per image; 0: the GPT's block size (all), or the token
                               # count of image_size
  c.output_size = 0            # side of the saved images; 0: the decoder's side for num_tokens
  c.batch_size = 64
  c.run_name = ""              # output subfolder; empty: built from the settings
  c.reuse_samples = True       # keep samples.npz when its sampling settings are unchanged
  c.compute_metrics = True     # False: samples only
  c.compute_inception = True   # FID / sFID / precision / recall (Inception: ~0.2 s per image)
  c.compute_classifier_fd = True  # data.source fashion_mnist only: classifier FD against the
                               # test split, the judge's per-class scores (eval/classifier_fd.py)
  _judge_fields(c)
  c.reference = ""             # ADM .npz or image folder; empty: data section, reference_split
  c.reference_split = "test"
  c.reference_num_images = 0   # 0: every image of the reference
  c.reference_cache = ""       # statistics cache .npz; empty: under WORKDIR/eval_generator
  _inception_fields(c)
  return c


def eval_generator_config():
  c = ml_collections.ConfigDict()
  c.job = "eval_generator"
  c.eval = eval_generator_section()
  c.data = defaults.data_config()
  c.mesh = defaults.mesh_config()
  return c


def eval_fid_reference_section():
  """Real-vs-real FID: the eval split against each half of the halves split, and the halves."""
  c = ml_collections.ConfigDict()
  c.reference_split = "test"
  c.halves_split = "train"
  c.max_images_per_set = 0     # 0: every image (Fashion-MNIST: 10k test, 2 x 30k train)
  c.image_size = 32            # center-crop side (Fashion-MNIST records are 32 x 32)
  c.batch_size = 64
  c.chunk_size = 1000          # images per cached feature file
  c.inception_weights = ""
  c.fid_method = "sqrtm"
  return c


def eval_fid_reference_config():
  c = ml_collections.ConfigDict()
  c.job = "eval_fid_reference"
  c.eval = eval_fid_reference_section()
  c.data = defaults.data_config()
  c.mesh = defaults.mesh_config()
  return c
