"""Tiny class-conditional GPT on the codes of configs/tokenizer_tiny.py (Fashion-MNIST), CPU-sized.

The tokenizer has N = 32 codes in groups of 4 (first 4 token-causal) from a 1024-code book, so
the GPT sees 1 class token + 28 codes + 3 special tokens and predicts 32 codes; 11 decoding steps (4 single codes, then 7 groups).
One config serves both jobs of the default run:
  --config=configs/ar_tiny.py --config.job=extract_codes --workdir=workdirs/default/codes
  --config=configs/ar_tiny.py --workdir=workdirs/default/ar
Sized for the default run's CPU budget (the whole pipeline in under 20 minutes on two cores):
4 layers x 192 wide (2.2M parameters, 27 GFLOP per step of 64 sequences, about 6.5 steps/s as
two CPU devices with the heap in huge pages), 2,400 steps at lr 3e-3 over the codes of all
60,000 training images (about 2.6 passes, a random clean or self-corrected sequence each time).
Measured on one tokenizer (docs/recipe.md): 500 steps at lr 1e-3 put 0.62 of 1,000 samples in
their class at CFG 2.0, 500 at 3e-3 0.71, 800 at 3e-3 0.84; the two CPU devices' speed bought
300 more steps, and the huge pages (host_memory.py) 1,300 more and the other 30,000 images.
get_config("smoke") is a seconds-long variant for tests.
"""
from detailflow_jax.config import defaults


def tiny_gpt(num_layers, dim, num_heads):
  g = defaults.gpt_config("B")
  g.vocab_size = 1024
  g.num_layers = num_layers
  g.dim = dim
  g.num_heads = num_heads
  g.num_classes = 10
  g.block_size = 32
  g.group_size = 4
  g.causal_num = 4
  # Underfitting regime (about one epoch of codes): dropout only on the labels, for guidance.
  g.token_dropout = 0.0
  g.resid_dropout = 0.0
  g.ffn_dropout = 0.0
  g.class_dropout_prob = 0.1
  g.dtype = "float32"   # bfloat16 is slower than float32 on CPU under XLA
  return g


def get_config(arg=None):
  c = defaults.ar_training_config("B")
  c.gpt = tiny_gpt(num_layers=4, dim=192, num_heads=4)

  # Two JAX devices on the CPU, each with half of every batch: these small models' steps take
  # 1.3x less time on two cores than as one device (host_devices.py, docs/performance.md).
  # No effect on a GPU or TPU host; --config.cpu_devices=1 for JAX's single CPU device.
  c.cpu_devices = 2

  c.data.codes_dir = "workdirs/default/codes"
  c.data.batch_size = 64
  c.data.correction_prob = 0.3

  c.extract.tokenizer_workdir = "workdirs/default/tokenizer"
  c.extract.source = "fashion_mnist"   # the image source to encode (data.source is "codes")
  c.extract.shard_size = 10_000
  c.extract.batch_size = 256
  c.extract.flips = False             # CPU budget: one view per image
  c.extract.max_images = 0            # all 60,000 training images (~60 s to encode)

  c.optim.learning_rate = 3e-3
  c.train.num_steps = 2400
  c.train.ema_decay = 0.995            # a window of ~200 steps, suited to a short run
  c.train.log_every = 50
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2

  if arg == "smoke":  # seconds-long run for tests
    c.gpt = tiny_gpt(num_layers=2, dim=32, num_heads=2)
    c.gpt.vocab_size = 64   # the codebook of configs/tokenizer_tiny.py:smoke
    c.data.batch_size = 8
    c.extract.batch_size = 8
    c.extract.shard_size = 16
    c.extract.flips = True   # tests cover both views
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.ema_decay = 0.9
  elif arg:
    raise ValueError(f"configs/ar_tiny.py: unknown arg {arg!r}; use no arg or 'smoke'")
  return c
