"""Ways to stream a GPT's weight matrices through small-row matmuls on this host (the floor of
a decode step, see benchmarks/sampler.py --phases), timed side by side.

A decode step at batch b with guidance multiplies 2*b rows (causal steps) or 2*b*g rows (group
steps) by every block's wqkv, wo, w1, w3, w2. At batch 1 that is 2 or 16 rows, and the time is
that of reading the weights. This script times that bare pass (matmuls and a residual add, no
attention, norms or cache) for the GPT's own weights in several forms:

  * float32 `x @ w`, what the sampler runs;
  * bfloat16 weights, multiplied with float32 accumulation;
  * bfloat16 weights, converted inside a multiply-and-sum (no matmul kernel);
  * two CPU devices, each holding half of every matrix (w1, w3, wqkv split by columns, wo, w2 by
    rows, one psum per half-block), the tensor-parallel layout of the training mesh;
  * the contraction split into chunks (a batched matmul, then a sum over the chunks);
  * w1 and w3 as one matrix (one matmul for the SwiGLU's two inputs);

and, for scale, the host's read rate: a jitted sum over the same bytes, and one matmul of 2
rows by all the blocks' w1 matrices side by side.

  python benchmarks/weight_pass.py --size B --rows 2,16,128 --repeats 30
"""
import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from detailflow_jax import host_devices
from detailflow_jax import host_memory
from detailflow_jax.models import gpt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sampler  # pylint: disable=g-import-not-at-top,wrong-import-position

MATRICES = ("wqkv", "wo", "w1", "w3", "w2")


def block_weights(params, config):
  """[(wqkv, wo, w1, w3, w2)] per block, float32 (in, out) matrices as stored."""
  blocks = []
  for i in range(config.num_layers):
    block = params[f"layers_{i}"]
    attn, ffn = block["attention"], block["feed_forward"]
    wqkv = attn["wqkv"]["kernel"].reshape(config.dim, -1)
    blocks.append((wqkv, attn["wo"]["kernel"], ffn["w1"]["kernel"], ffn["w3"]["kernel"],
                   ffn["w2"]["kernel"]))
  return blocks


def make_pass(matmul, dim, fused_w13=False):
  """A jitted pass of x through every block: q+k+v, wo, SwiGLU-like product, w2."""
  @jax.jit
  def weight_pass(x, blocks):
    for block in blocks:
      if fused_w13:
        wqkv, wo, w13, w2 = block
        both = matmul(x, w13)
        hidden_in = (both[:, :w13.shape[1] // 2], both[:, w13.shape[1] // 2:])
      else:
        wqkv, wo, w1, w3, w2 = block
      qkv = matmul(x, wqkv).reshape(x.shape[0], 3, dim).sum(axis=1)
      x = x + 1e-3 * matmul(qkv, wo)
      if not fused_w13:
        hidden_in = (matmul(x, w1), matmul(x, w3))
      x = x + 1e-3 * matmul(hidden_in[0] * hidden_in[1], w2)
    return x
  return weight_pass


def dot_f32(x, w):
  return x @ w


def dot_bf16(x, w):
  return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def multiply_sum(x, w):
  return jnp.sum(x[:, :, None] * w.astype(jnp.float32)[None], axis=1)


def chunked(chunks, x, w):
  k, n = w.shape
  xs = x.reshape(x.shape[0], chunks, k // chunks).transpose(1, 0, 2)
  return jnp.einsum("cbk,ckn->bn", xs, w.reshape(chunks, k // chunks, n))


def make_split_pass(mesh):
  """The pass with every matrix split over the mesh's two devices (Megatron layout)."""
  def local(x, blocks):
    for wqkv, wo, w1, w3, w2 in blocks:
      # Timing only: each device folds its half of wqkv's columns to dim / 2 values, the rows
      # of wo it holds (a real split would keep whole heads together; the bytes are the same).
      qkv = x @ wqkv
      part = qkv.reshape(x.shape[0], 3, -1).sum(axis=1)
      x = x + 1e-3 * jax.lax.psum(part @ wo, "model")
      x = x + 1e-3 * jax.lax.psum((x @ w1) * (x @ w3) @ w2, "model")
    return x
  column, row = P(None, "model"), P("model", None)
  specs = [(column, row, column, column, row)]
  return jax.jit(lambda x, blocks: jax.shard_map(
      local, mesh=mesh, in_specs=(P(), specs * len(blocks)), out_specs=P(),
      check_vma=False)(x, blocks)), specs[0]


def median_ms(fn, repeats):
  return 1e3 * sampler.median_time(fn, repeats)


def main():
  host_memory.restart_with_hugepages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="B", help="GPT size: B, L, XL or XXL")
  parser.add_argument("--rows", default="2,16,128")
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  host_devices.configure(2)   # the split variant; the others run on device 0 only

  config = gpt.gpt_model_config(args.size)
  params = gpt.init_params(config, jax.random.PRNGKey(0))
  blocks = block_weights(params, config)
  device = jax.devices()[0]
  blocks = jax.device_put(blocks, device)
  weight_mb = 4 * sum(np.size(w) for block in blocks for w in block) / 1e6
  print(f"devices: {jax.devices()}; jax {jax.__version__}")
  print(f"GPT-{args.size}: {config.num_layers} blocks, {weight_mb:.0f} MB of float32 weights "
        f"({', '.join(MATRICES)})")

  bf16_blocks = jax.tree.map(lambda w: w.astype(jnp.bfloat16), blocks)
  fused_blocks = [(q, o, jnp.concatenate([w1, w3], axis=1), w2) for q, o, w1, w3, w2 in blocks]
  mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
  split_pass, split_specs = make_split_pass(mesh)
  split_blocks = [tuple(jax.device_put(w, NamedSharding(mesh, s)) for w, s in zip(b, split_specs))
                  for b in blocks]

  variants = [
      ("float32 x @ w (the sampler)", make_pass(dot_f32, config.dim), blocks),
      ("bfloat16 weights, float32 accumulation", make_pass(dot_bf16, config.dim), bf16_blocks),
      ("bfloat16 weights, multiply-and-sum", make_pass(multiply_sum, config.dim), bf16_blocks),
      ("two devices, each half of every matrix", split_pass, split_blocks),
  ]
  for chunks in (2, 4, 8):
    variants.append((f"contraction in {chunks} chunks",
                     make_pass(functools.partial(chunked, chunks), config.dim), blocks))
  variants.append(("w1 and w3 as one matrix", make_pass(dot_f32, config.dim, fused_w13=True),
                   fused_blocks))

  rows = [int(r) for r in args.rows.split(",") if r]
  results = {}
  for r in rows:
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (r, config.dim)), device)
    for name, fn, weights in variants:
      if "multiply-and-sum" in name and r > 16:
        continue   # (rows, in, out) products: gigabytes at 128 rows
      inputs = jax.device_put(x, NamedSharding(mesh, P())) if fn is split_pass else x
      results[(name, r)] = median_ms(functools.partial(fn, inputs, weights), args.repeats)
      print(f"{r:4d} rows | {name}: {results[(name, r)]:.1f} ms", flush=True)

  flat = jax.device_put(jnp.concatenate([w.reshape(-1) for b in blocks for w in b]), device)
  sum_ms = median_ms(functools.partial(jax.jit(jnp.sum), flat), args.repeats)
  wide = jax.device_put(jnp.concatenate([b[2] for b in blocks], axis=1), device)
  two = jax.device_put(jnp.ones((2, config.dim)), device)
  wide_ms = median_ms(functools.partial(jax.jit(dot_f32), two, wide), args.repeats)
  print(f"\nread rate: jitted sum over the {weight_mb:.0f} MB {weight_mb / sum_ms:.1f} GB/s; "
        f"2 rows @ {config.dim} x {wide.shape[1]} (every block's w1 side by side) "
        f"{4 * wide.size / 1e6 / wide_ms:.1f} GB/s; 2 rows through the pass "
        f"{weight_mb / results[(variants[0][0], 2)]:.1f} GB/s" if 2 in rows else "")

  print("\n| variant of the weight pass | " + " | ".join(f"{r} rows" for r in rows) + " |")
  print("|---|" + "---|" * len(rows))
  for name, _, _ in variants:
    cells = [f"{results[(name, r)]:.1f} ms" if (name, r) in results else "" for r in rows]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
