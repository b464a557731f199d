"""Progressive sampling: the two ways to get a preview after every causal token and every group.

  A. stepwise (what api.sample_progressive does): a Python generator over separately compiled
     pieces (one causal-step program, one group-step program per cache window, one tokenizer
     decode per prefix length); each next() runs one step and decodes its prefix, so the caller
     has the first preview after one step;
  B. one program: the whole decode (the sampler's lax loops) and the tokenizer decode of every
     prefix length compiled as one jitted function that returns all previews at the end.

Measured against `sample` (one program: codes, then the full-size decode), per batch size:
first-call (compile) time, median wall time over --repeats runs, time to the first preview,
time per preview (median over the stages of a run) and the overhead of all previews over
`sample`. Each stage is waited for (block_until_ready) before the next, as a viewer does.

  python benchmarks/progressive.py                          # the default run's model sizes
  python benchmarks/progressive.py --batches 1,8 --repeats 7

Weights are random (GPT head drawn so sampling sees non-uniform logits); speed does not depend
on their values. Time on an idle machine: the stepwise design's per-call dispatch is a fixed
cost that a busy machine inflates.
"""
import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import detailflow_jax as dfj
from detailflow_jax import api
from detailflow_jax import detail
from detailflow_jax import sampling
from detailflow_jax.config.files import load_config_file
from detailflow_jax.models import gpt
from detailflow_jax.models import tokenizer as tokenizer_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_params(tokenizer_config, gpt_config_file):
  tok = load_config_file(str(REPO / "configs" / tokenizer_config)).tokenizer
  tokenizer = dfj.tokenizer_params(tokenizer_model.init_params(tok, jax.random.PRNGKey(0)), tok)
  gcfg = gpt.GPTConfig.from_dict(load_config_file(str(REPO / "configs" / gpt_config_file)).gpt)
  api.check_pairing(tok, gcfg)
  params = gpt.init_params(gcfg, jax.random.PRNGKey(1))
  params["output"]["kernel"] = 0.02 * jax.random.normal(
      jax.random.PRNGKey(2), params["output"]["kernel"].shape)
  # The layout load_sampler_params gives.
  return api.in_decoding_layout(dfj.SamplerParams(tokenizer=tokenizer, gpt=params, gpt_config=gcfg))


def make_one_program(params, cfg_scale):
  """Design B: codes and every prefix's decode in one jitted function (returns all previews)."""
  tok_config, gcfg = params.tokenizer.config, params.gpt_config
  schedule = detail.resolution_schedule(tok_config)
  counts = sampling.decodable_token_counts(gcfg)

  @jax.jit
  def run(gpt_params, tok_params, labels, keys):
    codes, _, _ = sampling._decode(  # pylint: disable=protected-access
        gpt_params, labels, keys, jnp.float32(cfg_scale), jnp.float32(1.0), jnp.float32(1.0),
        jnp.bool_(False), config=gcfg, num_tokens=gcfg.block_size, top_k=0, use_top_p=False,
        guided=cfg_scale != 1.0, record_logits=False)
    return [jnp.clip(api._decode(tok_params, codes, tok_config, n, schedule.decoder_size(n)),  # pylint: disable=protected-access
                     -1.0, 1.0) for n in counts]

  return lambda labels, rng: run(params.gpt, params.tokenizer.params, labels,
                                 jax.random.split(rng, labels.shape[0]))


def time_stepwise(params, labels, rng, cfg_scale):
  """(total s, [s per stage]) of one sample_progressive run, waiting for every stage."""
  start = last = time.perf_counter()
  stages = []
  for preview in dfj.sample_progressive(params, labels, rng=rng, cfg_scale=cfg_scale):
    jax.block_until_ready(preview.images)
    now = time.perf_counter()
    stages.append(now - last)
    last = now
  return last - start, stages, preview.images


def time_call(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokenizer_config", default="tokenizer_tiny.py")
  parser.add_argument("--gpt_config", default="ar_tiny.py")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cfg_scale", type=float, default=2.0)
  args = parser.parse_args()

  params = make_params(args.tokenizer_config, args.gpt_config)
  g = params.gpt_config
  counts = sampling.decodable_token_counts(g)
  print(f"devices: {jax.devices()}")
  print(f"GPT {g.num_layers}x{g.dim}, {g.block_size} tokens, g={g.group_size}, causal "
        f"{g.causal_num}: {len(counts)} stages {counts}; tokenizer "
        f"{params.tokenizer.config.image_size} px; cfg {args.cfg_scale}")
  rows = []
  for batch in [int(b) for b in args.batches.split(",") if b]:
    labels = jnp.arange(batch, dtype=jnp.int32) % g.num_classes
    sample = lambda i: dfj.sample(params, labels, rng=jax.random.PRNGKey(i), cfg_scale=args.cfg_scale)
    one_program = make_one_program(params, args.cfg_scale)
    first = {"sample": time_call(lambda: sample(0))[0],
             "A stepwise": time_stepwise(params, labels, jax.random.PRNGKey(0), args.cfg_scale)[0],
             "B one program": time_call(lambda: one_program(labels, jax.random.PRNGKey(0)))[0]}
    runs = {name: [] for name in first}
    stage_times, same_a, same_b = [], True, True
    for i in range(args.repeats):   # interleaved, so load changes hit all three alike
      t, reference = time_call(lambda: sample(i))
      runs["sample"].append(t)
      total, stages, last = time_stepwise(params, labels, jax.random.PRNGKey(i), args.cfg_scale)
      runs["A stepwise"].append(total)
      stage_times.append(stages)
      same_a &= bool(np.array_equal(np.asarray(last), np.asarray(reference)))
      t, previews = time_call(lambda: one_program(labels, jax.random.PRNGKey(i)))
      runs["B one program"].append(t)
      same_b &= bool(np.array_equal(np.asarray(previews[-1]), np.asarray(reference)))
    base = float(np.median(runs["sample"]))
    stage_median = np.median(np.asarray(stage_times), axis=0)
    for name, times in runs.items():
      median = float(np.median(times))
      to_first = {"sample": median, "A stepwise": float(stage_median[0]), "B one program": median}[name]
      per_preview = "" if name == "sample" else f"{median / len(counts) * 1e3:.1f}"
      same = {"sample": "", "A stepwise": same_a, "B one program": same_b}[name]
      rows.append((name, batch, first[name], median, to_first, per_preview,
                   "" if name == "sample" else f"{100 * (median / base - 1):+.0f}%", same))
    print(f"batch {batch}: per-stage ms (A, median) "
          + ", ".join(f"n={n}: {t * 1e3:.1f}" for n, t in zip(counts, stage_median)), flush=True)

  print("\n| design | batch | first call s | median s | first preview s | ms per preview "
        "| vs sample | last == sample |")
  print("|---|---|---|---|---|---|---|---|")
  for name, batch, first, median, to_first, per_preview, overhead, same in rows:
    print(f"| {name} | {batch} | {first:.2f} | {median:.3f} | {to_first:.3f} | {per_preview} "
          f"| {overhead} | {same} |")


if __name__ == "__main__":
  main()
