"""Building blocks for the config files in configs/.

Each configs/<name>.py calls these and overrides what differs, so every config has the same
set of keys and `--config.x=y` can only set keys that exist.
"""
import ml_collections

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def vit_config(width, depth, num_heads, mlp_dim, patch_size, pos_grid):
  """A SigLIP2-style ViT tower. `pos_grid` is the side of the learned 2D position table."""
  return ml_collections.ConfigDict(dict(
      width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
      patch_size=patch_size, pos_grid=pos_grid, layer_norm_eps=1e-6))


def tokenizer_model_config():
  """The paper's DetailFlow-16 tokenizer (N=128) at 256 px."""
  c = ml_collections.ConfigDict()
  c.image_size = 256          # the largest side; R(n) is built on it
  # Smallest side of an any-resolution tokenizer (official min_image_size): it encodes and
  # decodes at every best side of R(n) in [min_image_size, image_size], with fewer tokens at
  # smaller sides (dynamic_resolution.py). 0: one size, image_size.
  c.min_image_size = 0
  c.num_tokens = 128          # N
  c.group_size = 8            # g
  c.causal_num = 8            # first tokens decoded one by one
  # Latent-to-latent block of the encoder mask: group_causal (the paper) | bidirectional (the
  # ablation of docs/reproduction.md: every latent sees every latent; no official equivalent).
  c.latent_mask = "group_causal"
  c.degradation_power = 1.5   # alpha in R(n)
  c.min_decoder_size = 16     # official min_dec_res
  c.codebook_size = 8192
  c.codebook_dim = 8
  c.commitment_beta = 0.25
  c.self_correction_top_k = 50
  # First 12 layers of siglip2-so400m-patch16-naflex.
  c.encoder = vit_config(1152, 12, 16, 4304, 16, 16)
  # ViT-B decoder trained from scratch.
  c.decoder = vit_config(768, 12, 12, 3072, 16, 16)
  return c


def data_config():
  c = ml_collections.ConfigDict()
  c.source = "fashion_mnist"   # fashion_mnist | tfds | folder | codes
  c.fashion_mnist_dir = FASHION_MNIST_DIR
  c.tfds_name = "imagenet2012"
  c.tfds_data_dir = ""         # empty: TFDS default (~/tensorflow_datasets)
  c.folder = ""                # ImageNet layout: <folder>/<split>/<class>/<image>
  c.train_split = "train"
  c.eval_split = "test"
  c.batch_size = 256           # global batch
  c.degrade_prob = 0.2         # probability of a prefix n < N (official degradation_prob)
  c.correction_prob = 1.0      # probability of a self-correction noise position when n > 1
  # Training at several sides in [tokenizer.min_image_size, tokenizer.image_size] (official
  # resize_batch_img): per batch, a random side snapped to R(n)'s best sides with
  # dynamic_resolution_prob, the largest with max_resolution_prob, else train_image_size
  # (0: tokenizer.image_size). reduce_batch_at_large_sizes: 50% of the batch at 481-512 px, 60% at
  # 384-480 px (official adjust_bs_by_resolution).
  c.dynamic_resolution_prob = 0.0
  c.max_resolution_prob = 0.0
  c.train_image_size = 0
  c.reduce_batch_at_large_sizes = False
  c.resize_min = 256           # shorter side drawn from U[resize_min, resize_max], then crop
  c.resize_max = 320
  c.random_flip = True
  c.num_workers = 0            # grain worker processes (0: in-process)
  c.skip_corrupt_images = True
  c.codes_dir = ""             # code extraction output (AR training input)
  return c


def loss_config():
  c = ml_collections.ConfigDict()
  c.mse_weight = 1.0
  c.lpips_weight = 1.0
  c.lpips_warmup_steps = 10_000
  c.gan_weight = 0.2
  c.gan_start_step = 40_000
  c.discriminator = "dino"     # dino | patchgan (from scratch, no pretrained weights)
  c.dino_weights = ""          # DINO ViT-S/16 weights file (needed when discriminator=dino)
  c.lecam_weight = 0.001
  c.consistency_weight = 4.0
  c.diff_augment = True
  c.vq_weight = 1.0
  c.align_weight = 1.0         # first-token alignment to mean-pooled SigLIP2 features
  c.siglip_weights = ""        # SigLIP2 so400m weights (safetensors or big_vision npz)
  c.init_encoder_from_siglip = True
  return c


def optim_config():
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-4
  c.scale_lr_by_batch = True   # lr * batch / 256, as the reference
  c.min_learning_rate = 1e-5
  c.warmup_steps = 5_000
  c.b1 = 0.9
  c.b2 = 0.95
  c.weight_decay = 0.0
  c.grad_clip = 1.0
  c.disc_learning_rate = 1e-4
  return c


def train_config():
  c = ml_collections.ConfigDict()
  c.num_steps = 250_000
  c.log_every = 50
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.image_every = 5_000
  c.ema_decay = 0.0            # 0 disables EMA
  c.compute_dtype = "bfloat16" # float32 | bfloat16
  return c


def code_reset_config():
  """Dead-code restarts (detailflow_jax.train.code_reset; not in the paper).
  every: steps between restarts (0 = off); decay: of each code's running selection count;
  min_fraction: a code is dead when its running count is below this fraction of an even share
  (tokens per step / codebook size)."""
  return ml_collections.ConfigDict(dict(every=0, decay=0.95, min_fraction=0.05))


def finetune_config():
  """Starting a tokenizer run from another one (train/finetune.py; not in the paper).
  from_workdir: a tokenizer workdir whose latest raw params start this run (same `tokenizer`
  architecture); "" trains from scratch. decoder_only: train only post_quant_conv and the
  decoder, so every image keeps its codes and a GPT trained on them stays valid."""
  return ml_collections.ConfigDict(dict(from_workdir="", decoder_only=False))


def mesh_config():
  # -1 takes the devices the other axes leave. dcn_*: how many of each axis's devices lie in
  # other slices (TPU multislice) or processes (GPU hosts); all 1 = one slice. E.g. 4 slices
  # of 64 chips: data=-1 fsdp=64 dcn_data=4 (train/sharding.py: build_mesh).
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                        dcn_tensor=1))


def tokenizer_training_config():
  """Everything `job=train_tokenizer` reads, with the paper's values."""
  c = ml_collections.ConfigDict()
  c.job = "train_tokenizer"
  c.seed = 42
  c.tokenizer = tokenizer_model_config()
  c.data = data_config()
  c.loss = loss_config()
  c.optim = optim_config()
  c.train = train_config()
  c.code_reset = code_reset_config()   # dead-code restarts: off, as in the paper
  c.finetune = finetune_config()       # from scratch, every param trained, as in the paper
  c.mesh = mesh_config()
  return c


def gpt_config(size="L"):
  """GPT fields (GPTConfig of detailflow_jax.models.gpt) for DetailFlow-16 with a LlamaGen size."""
  layers, dim, heads = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (36, 1280, 20),
                        "XXL": (48, 1536, 24)}[size]
  return ml_collections.ConfigDict(dict(
      vocab_size=8192, num_layers=layers, dim=dim, num_heads=heads, num_classes=1000,
      block_size=128, group_size=8, causal_num=8, cls_token_num=1, ffn_dim=0, norm_eps=1e-5,
      rope_base=10000.0, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1,
      class_dropout_prob=0.1, dtype="float32", dropout_bits=32))


def extract_config():
  """Code extraction: encode a dataset with a trained tokenizer (job=extract_codes)."""
  c = ml_collections.ConfigDict()
  c.tokenizer_workdir = ""     # workdir of a trained tokenizer (or an imported official one)
  c.use_ema = False
  c.flips = True               # also store the horizontally flipped image's codes
  c.ten_crop = False           # the reference's TenCrop (crop 281 -> 256, with flips)
  c.ten_crop_size = 281
  c.batch_size = 256
  c.split = "train"
  c.source = ""                # image source to encode; empty: data.source (when not "codes")
  c.shard_size = 10_000        # images per output shard (the unit of resumption)
  c.max_images = 0             # encode only the first max_images records (0 = the whole split)
  return c


def ar_optim_config():
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-4
  c.scale_lr_by_batch = False
  c.weight_decay = 0.05        # matrices only
  c.b1 = 0.9
  c.b2 = 0.95
  c.warmup_fraction = 0.05
  c.warmup_steps = 0           # used only when warmup_fraction is None
  c.final_lr_fraction = 0.01   # cosine down to 0.01 x peak
  c.grad_clip = 1.0
  return c


def ar_training_config(size="L"):
  """Everything `job=train_ar` reads, with the reference's values."""
  c = ml_collections.ConfigDict()
  c.job = "train_ar"
  c.seed = 0
  c.gpt = gpt_config(size)
  c.data = data_config()
  c.data.source = "codes"
  c.data.codes_dir = ""        # output folder of the extract_codes job
  c.data.correction_prob = 0.3 # use the self-correction sequence for 30% of samples
  c.extract = extract_config()
  c.optim = ar_optim_config()
  c.train = train_config()
  c.train.num_steps = 300 * 5004 // 2   # 300 epochs at batch 512 (DetailFlow-16/32)
  c.train.ema_decay = 0.9999
  c.train.checkpoint_every = 5_000
  del c.train["compute_dtype"]  # the GPT's compute dtype is gpt.dtype
  c.mesh = mesh_config()
  return c


IMAGENET_TRAIN_IMAGES = 1_281_167


def imagenet_ar_config(size, arg=None):
  """configs/ar_{b,l,xl,xxl}.py: a GPT of `size` on ImageNet codes with the reference's settings.

  arg is the tokenizer's token count N (128 default, 256 or 512: DetailFlow-16/32/64). Reference:
  AdamW lr 1e-4, wd 0.05 on matrices, betas (0.9, 0.95), 5% warm-up then cosine to 1%, clipping
  1.0, dropout 0.1, EMA 0.9999, batch 512, 300 epochs, bf16 compute; codes from TenCrop (crop
  281 -> 256, with flips) with one noise position per image, self-correction for 30% of samples.
  """
  num_tokens = int(arg) if arg else 128
  if num_tokens not in (128, 256, 512):
    raise ValueError(f"config arg={arg!r} must be a token count: 128, 256 or 512")
  c = ar_training_config(size)
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
