"""Throughput of the group-parallel GPT sampler on the local devices (codes only: the tokenizer
decode is not included).

Measures, in one run:
  * the machine's matmul rate in the run's --dtype at a group step's shapes (2*batch*g rows x
    dim @ dim x 4*dim @ 4*dim x dim, jit; the faster of the two operand orders), measured after
    every timed run (the machine may be shared);
  * the KV-cache sampler (detailflow_jax.sampling.generate_codes) at each batch size:
    compile time, median wall time over --repeats runs, images/s, analytic FLOPs per image
    (with the cache and guidance), achieved GFLOP/s and its share of the matmul rate;
  * a no-cache group sampler that re-runs the whole prefix at every step, as the official
    generate_group_par does (same sampling code, one jitted forward per prefix length);
  * with --phases, where a batch's time goes: the causal phase alone (num_tokens = causal_num)
    and the whole decode give the time of one causal step and of one group step, each set
    beside its floor on this machine with XLA's kernels: one jitted pass of bare matmuls
    through the model's own weight matrices (every block's wqkv, wo, w1, w3, w2, then the
    head) at the step's row count, without attention, norms, sampling or the cache.

  python benchmarks/sampler.py --size B --batches 1,8,32 --repeats 5 --nocache_batches 8

--layout picks the GPT weights' layout: decoding (transposed, what api.load_sampler_params
gives; the default), stored (as checkpoints hold them), or both, whose samplers are called in
turn, one call each per round, so that a noisy machine loads the two alike.

Weights are random (the head too, so sampling sees non-uniform logits); speed does not depend
on their values.
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax import api
from detailflow_jax import host_memory
from detailflow_jax import sampling
from detailflow_jax.models import gpt


def make_matmul_rate(rows, dim, dtype="float32"):
  """Returns a function measuring GFLOP/s of a chain of jitted (rows x dim) @ (dim x 4 dim) @
  (4 dim x dim) matmuls, the shapes of a group step's MLP, in `dtype` (bfloat16: bfloat16
  operands summed in float32, as the model's projections). Each measurement times the chain in
  both operand orders (x @ w, and w^T . x^T with the weights stored transposed, as the
  decoding layout multiplies) and gives the faster: the machine's rate, whichever form XLA's
  kernels favour."""
  k = jax.random.PRNGKey(0)
  w_in = (jax.random.normal(k, (dim, 4 * dim), jnp.float32) * 0.02).astype(dtype)
  w_out = (jax.random.normal(k, (4 * dim, dim), jnp.float32) * 0.02).astype(dtype)
  x = jax.random.normal(k, (rows, dim), jnp.float32).astype(dtype)
  chain = 20
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)

  @jax.jit
  def rows_first(x, w_in, w_out):
    return jax.lax.fori_loop(0, chain, lambda i, x: x + 1e-3 * dot(dot(x, w_in), w_out), x)

  @jax.jit
  def weights_first(x_t, w_in_t, w_out_t):   # x_t (dim, rows), w_*_t stored transposed
    return jax.lax.fori_loop(0, chain, lambda i, x: x + 1e-3 * dot(w_out_t, dot(w_in_t, x)),
                             x_t)

  forms = [(rows_first, (x, w_in, w_out)),
           (weights_first, (x.T.copy(), w_in.T.copy(), w_out.T.copy()))]
  for fn, args in forms:
    jax.block_until_ready(fn(*args))

  def measure():
    seconds = []
    for fn, args in forms:
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      seconds.append(time.perf_counter() - start)
    return chain * 2 * (2 * rows * dim * 4 * dim) / min(seconds) / 1e9
  return measure


def linear_flops_per_position(c):
  """Matmul FLOPs of one position through the blocks (without the head)."""
  per_layer = c.dim * 3 * c.dim + c.dim * c.dim + 3 * c.dim * c.ffn_hidden
  return 2 * c.num_layers * per_layer


def attention_flops(c, queries, keys):
  """q k^T and p v over all heads for `queries` positions against `keys` keys."""
  return 2 * 2 * c.num_layers * queries * keys * c.dim


def cached_flops_per_image(c, num_tokens, guided=True):
  """FLOPs the KV-cache sampler executes per image (attention over the cache length it uses)."""
  head = 2 * c.dim * c.vocab_size
  causal = min(num_tokens, c.causal_num)
  total = causal * (linear_flops_per_position(c) + head) + attention_flops(c, causal, causal)
  for first, end, window in sampling.group_segments(c, num_tokens) if num_tokens > c.causal_num else []:
    steps = end - first
    total += steps * (c.group_size * (linear_flops_per_position(c) + head)
                      + attention_flops(c, c.group_size, window))
  return total * (2 if guided else 1)


def nocache_lengths(c, num_tokens):
  """Sequence lengths of the official sampler's model calls."""
  causal = [gpt.sequence_length(n, c) for n in range(min(num_tokens, c.causal_num))]
  groups = [gpt.sequence_length(n, c) for n in range(c.causal_num, num_tokens, c.group_size)]
  return causal + groups


def nocache_flops_per_image(c, num_tokens, guided=True):
  """FLOPs of the official recompute-everything sampler (logits at every position, as it does)."""
  per_position = linear_flops_per_position(c) + 2 * c.dim * c.vocab_size
  total = sum(n * per_position + attention_flops(c, n, n) for n in nocache_lengths(c, num_tokens))
  return total * (2 if guided else 1)


def make_nocache_sampler(config, params, cfg_scale):
  """The official algorithm: every step runs the training-path forward on the whole prefix."""
  forward = jax.jit(lambda codes, labels: gpt.GPT(config).apply({"params": params}, codes, labels))

  @jax.jit
  def draw(logits, uniforms):
    half = logits.shape[0] // 2
    cond, uncond = logits[:half], logits[half:]
    return sampling._draw(uncond + (cond - uncond) * cfg_scale, uniforms, 1.0, 0, None)

  def generate(labels, keys):
    batch = labels.shape[0]
    model_labels = jnp.concatenate([labels, jnp.full_like(labels, config.num_classes)])
    uniforms = sampling.code_uniforms(keys, config.block_size)
    codes = jnp.zeros((batch, 0), jnp.int32)
    c, g = config.causal_num, config.group_size
    while codes.shape[1] < config.block_size:
      n = codes.shape[1]
      count = 1 if n < c else g
      logits = forward(jnp.tile(codes, (2, 1)), model_labels)[:, -count:]
      codes = jnp.concatenate([codes, draw(logits, uniforms[:, n:n + count])], axis=1)
    return codes

  return generate


def project(x, layer):
  """x (rows, in) times a projection's weights in either layout (gpt.to_decoding_layout)."""
  if "kernel_t" in layer:
    return jax.lax.dot_general(layer["kernel_t"], x, (((1,), (1,)), ((), ()))).T
  return x @ layer["kernel"]


def make_weight_pass(params, config, rows):
  """Returns a jitted function: `rows` rows through every weight matrix a decode step reads
  (blocks in order, then the head), matmuls and a residual add only, in the params' layout."""
  blocks = [params[f"layers_{i}"] for i in range(config.num_layers)]
  x = jax.random.normal(jax.random.PRNGKey(0), (rows, config.dim), jnp.float32)

  @jax.jit
  def weight_pass(x, blocks, head):
    for block in blocks:
      attn, ffn = block["attention"], block["feed_forward"]
      # q + k + v uses all of the fused projection's columns (a slice would let XLA skip some).
      qkv = project(x, attn["wqkv"]).reshape(rows, 3, config.dim).sum(axis=1)
      x = x + 1e-3 * project(qkv, attn["wo"])
      hidden = project(x, ffn["w1"]) * project(x, ffn["w3"])
      x = x + 1e-3 * project(hidden, ffn["w2"])
    return project(x, head)

  return lambda: weight_pass(x, blocks, params["output"])


def median_time(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def phase_rows(params, config, batch, cfg_scale, repeats):
  """(phase, steps, ms per step, floor ms per step) for the causal and the group phase."""
  labels = jnp.arange(batch, dtype=jnp.int32) % config.num_classes
  copies = 2 if cfg_scale != 1.0 else 1

  def decode(num_tokens):
    return lambda: sampling.generate_codes(params, config, labels, rng=jax.random.PRNGKey(0),
                                           cfg_scale=cfg_scale, num_tokens=num_tokens)
  causal_steps = config.causal_num
  group_steps = (config.block_size - config.causal_num) // config.group_size
  causal_s = median_time(decode(causal_steps), repeats)
  whole_s = median_time(decode(config.block_size), repeats)
  causal_floor = median_time(make_weight_pass(params, config, copies * batch), repeats)
  group_floor = median_time(make_weight_pass(params, config, copies * batch * config.group_size),
                            repeats)
  return [("causal", causal_steps, 1e3 * causal_s / causal_steps, 1e3 * causal_floor),
          ("group", group_steps, 1e3 * (whole_s - causal_s) / group_steps, 1e3 * group_floor),
          ("whole decode", causal_steps + group_steps, 1e3 * whole_s,
           1e3 * (causal_steps * causal_floor + group_steps * group_floor))]  # ms in all


def wall_time(fn, i):
  start = time.perf_counter()
  jax.block_until_ready(fn(i))
  return time.perf_counter() - start


def timed(fn, repeats, matmul_rate):
  """Results of `repeats` calls of fn(i) (a wall time, or a dict of them when fn times several
  things), each followed by a matmul-rate measurement, so that the rate is taken under the same
  (shared, noisy) machine load as the runs."""
  results, rates = [], []
  for i in range(repeats):
    results.append(fn(i))
    rates.append(matmul_rate())
  return results, float(np.median(rates))


def main():
  # As the jobs run (main.py): the host heap in huge pages; DETAILFLOW_HOST_HUGEPAGES=0 for the
  # 4 KiB pages. The PyTorch rows' subprocess inherits the same setting.
  host_memory.restart_with_hugepages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="B", help="GPT size: B, L, XL or XXL")
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--nocache_batches", default="8", help="'' to skip the no-cache sampler")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cfg_scale", type=float, default=1.5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype; bfloat16 also stores the weight matrices in bfloat16")
  parser.add_argument("--layout", default="decoding", choices=("decoding", "stored", "both"),
                      help="GPT weights as api.load_sampler_params gives them (decoding: "
                           "transposed, gpt.to_decoding_layout) or as checkpoints store them; "
                           "both: the two KV-cache samplers called in turn, run by run")
  parser.add_argument("--phases", action="store_true",
                      help="also time the causal and group phases against their weight floor")
  args = parser.parse_args()

  config = gpt.gpt_model_config(args.size)
  params = gpt.init_params(config, jax.random.PRNGKey(0))
  params["output"]["kernel"] = 0.02 * jax.random.normal(
      jax.random.PRNGKey(1), params["output"]["kernel"].shape)
  if args.dtype == "bfloat16":   # half the bytes each step reads (norm scales stay float32)
    bf16 = api.in_bfloat16(api.SamplerParams(tokenizer=None, gpt=params, gpt_config=config))
    params, config = bf16.gpt, bf16.gpt_config
  layouts = {"stored": params, "decoding": gpt.to_decoding_layout(params)}
  if args.layout != "both":
    layouts = {args.layout: layouts[args.layout]}
  params = list(layouts.values())[-1]   # the no-cache sampler and --phases: decoding if timed
  n = config.block_size
  print(f"devices: {jax.devices()}")
  print(f"GPT-{args.size}: {config.num_layers}x{config.dim}x{config.num_heads}, vocab "
        f"{config.vocab_size}, {n} tokens, g={config.group_size}, causal {config.causal_num}, "
        f"cfg {args.cfg_scale}, {args.dtype}, {args.layout} layout; {len(nocache_lengths(config, n))} steps")
  flops_cached = cached_flops_per_image(config, n)
  flops_nocache = nocache_flops_per_image(config, n)
  print(f"FLOPs per image: {flops_cached / 1e9:.1f} G with the KV cache, "
        f"{flops_nocache / 1e9:.1f} G recomputing the prefix")

  rows = []
  for batch in [int(b) for b in args.batches.split(",") if b]:
    labels = jnp.arange(batch, dtype=jnp.int32) % config.num_classes
    runs, compile_s = {}, {}
    for name, weights in layouts.items():
      runs[name] = functools.partial(
          lambda i, weights: sampling.generate_codes(weights, config, labels,
                                                     rng=jax.random.PRNGKey(i),
                                                     cfg_scale=args.cfg_scale), weights=weights)
      start = time.perf_counter()
      jax.block_until_ready(runs[name](0))
      compile_s[name] = time.perf_counter() - start
    # One call of each layout per round, then the probe: the layouts see the same load.
    times, rate = timed(lambda i: {name: wall_time(run, i) for name, run in runs.items()},
                        args.repeats,
                        make_matmul_rate(2 * batch * config.group_size, config.dim, args.dtype))
    for name in runs:
      label = "KV cache" if len(runs) == 1 else f"KV cache, {name}"
      rows.append((label, batch, compile_s[name], [t[name] for t in times], flops_cached, rate))
      report(rows[-1])
    if len(runs) > 1:
      ratios = [t["stored"] / t["decoding"] for t in times]
      print(f"batch {batch}: stored / decoding time, per round: "
            f"{', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f})")

  for batch in [int(b) for b in args.nocache_batches.split(",") if b]:
    labels = jnp.arange(batch, dtype=jnp.int32) % config.num_classes
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    generate = make_nocache_sampler(config, params, args.cfg_scale)
    start = time.perf_counter()
    jax.block_until_ready(generate(labels, keys))
    compile_s = time.perf_counter() - start
    times, rate = timed(lambda i: wall_time(lambda _: generate(labels, keys), i),
                        max(2, args.repeats // 2),
                        make_matmul_rate(2 * batch * config.group_size, config.dim, args.dtype))
    rows.append(("no cache", batch, compile_s, times, flops_nocache, rate))
    report(rows[-1])

  print("\n| sampler | batch | images/s | s/batch (median) | runs | GFLOP/image | GFLOP/s "
        "| matmul GFLOP/s at 2*batch*g rows | % of it | first call s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, batch, compile_s, times, flops, rate in rows:
    median = float(np.median(times))
    achieved = flops * batch / median / 1e9
    print(f"| {name} | {batch} | {batch / median:.2f} | {median:.2f} | {len(times)} | "
          f"{flops / 1e9:.1f} | {achieved:.0f} | {rate:.0f} | {100 * achieved / rate:.0f}% | "
          f"{compile_s:.1f} |")

  if args.phases:
    weight_mb = 4 * sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(
        [params[f"layers_{i}"] for i in range(config.num_layers)] + [params["output"]])) / 1e6
    print(f"\nWhere a decode's time goes (floor: bare matmuls through the {weight_mb:.0f} MB of "
          "weight matrices a step reads, at the step's rows)")
    print("| batch | phase | steps | ms (per step; whole decode: in all) | floor ms | "
          "time / floor |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",") if b]:
      for phase, steps, ms, floor_ms in phase_rows(params, config, batch, args.cfg_scale,
                                                   args.repeats):
        print(f"| {batch} | {phase} | {steps} | {ms:.1f} | {floor_ms:.1f} | {ms / floor_ms:.2f} |",
              flush=True)


def report(row):
  name, batch, compile_s, times, flops, rate = row
  median = float(np.median(times))
  print(f"{name:9s} batch {batch:3d}: {batch / median:6.2f} images/s, runs "
        f"{', '.join(f'{t:.2f}' for t in times)} s, first call {compile_s:.1f} s, "
        f"{flops * batch / median / 1e9:.0f} GFLOP/s (matmul rate {rate:.0f})", flush=True)


if __name__ == "__main__":
  main()
