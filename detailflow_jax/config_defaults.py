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
  c.image_size = 256
  c.num_tokens = 128          # N
  c.group_size = 8            # g
  c.causal_num = 8            # first tokens decoded one by one
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


def mesh_config():
  # -1 takes the devices the other axes leave.
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


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
  c.mesh = mesh_config()
  return c
